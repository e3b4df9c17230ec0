"""Per-sample eps memory for MMA, keyed by dataset index (reference: a Python dict ``index -> eps``).

MMA starts each sample's AN-PGD at the eps found on its previous visit (Ding et al., ICLR 2020, Sec. 4), so
the table spans the whole training set: with DDP the sampler reshuffles indices across ranks every epoch, so
each step's updates are gathered from all ranks and applied identically everywhere (docs/lightning-notes.md, item 4).
The table is a persistent buffer: it follows the module's device and lives in its ``state_dict`` (and thus in
every Lightning checkpoint).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class EpsStore(nn.Module):
    """A table of ``num_samples`` eps values, 0 meaning "no margin known" (the sample restarts at ``min_eps``).

    ``seen`` marks the samples visited at least once (an unvisited sample and a misclassified one both hold 0;
    the margin plots draw the visited ones only).
    """

    eps: Tensor
    seen: Tensor

    def __init__(self, num_samples: int = 0) -> None:
        super().__init__()
        self.register_buffer("eps", torch.zeros(num_samples))
        self.register_buffer("seen", torch.zeros(num_samples, dtype=torch.bool))

    def __len__(self) -> int:
        return self.eps.shape[0]

    def resize(self, num_samples: int) -> None:
        """Re-create the table with ``num_samples`` zeros (no-op when the size already matches)."""
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if num_samples != len(self):
            self.eps = torch.zeros(num_samples, dtype=self.eps.dtype, device=self.eps.device)
            self.seen = torch.zeros(num_samples, dtype=torch.bool, device=self.seen.device)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Take the size of the incoming table (checkpoint, resume, ``ddp_spawn``'s return) before loading it."""
        saved = state_dict.get(prefix + "eps")
        if saved is not None:
            self.resize(saved.shape[0])
            if prefix + "seen" not in state_dict:  # a checkpoint from before ``seen``: the non-zero entries
                state_dict[prefix + "seen"] = saved > 0
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def check_index(self, index: Tensor) -> None:
        """Clear error for indices outside the table (one host sync; call it once, not every step)."""
        if index.numel() and (bool((index < 0).any()) or bool((index >= len(self)).any())):
            raise ValueError(f"dataset index must be in [0, {len(self) - 1}] (the eps table holds {len(self)} "
                             f"samples), got values in [{int(index.min())}, {int(index.max())}]; "
                             "is num_train_samples the size of the training set?")

    def lookup(self, index: Tensor) -> Tensor:
        """The stored eps of each index, shape like ``index``."""
        return self.eps[index]

    def update(self, index: Tensor, eps: Tensor) -> None:
        """Write ``eps[i]`` at ``index[i]``. Duplicate indices (``DistributedSampler`` padding) resolve to
        their maximum: order-independent, so every rank holding the same gathered updates ends identical."""
        self.eps.scatter_reduce_(0, index.reshape(-1).long(), eps.detach().reshape(-1).to(self.eps.dtype),
                                 reduce="amax", include_self=False)
        self.seen.index_fill_(0, index.reshape(-1).long(), True)
