"""The random streams of a training run, kept in its checkpoints so that a resumed run is bitwise the
uninterrupted one (docs/lightning-notes.md, item 10).

A Lightning checkpoint restores weights, optimiser, schedulers, loop counters and buffers, not the random
generators. Two kinds of stream drive adversarial training:

- the attacks' random starts (PGD-AT, TRADES, MMA's AN-PGD when it starts at random): drawn from a
  ``torch.Generator`` owned by the module (:class:`RandomStreams`), so that their randomness is part of the
  module's state and not of the process-wide stream;
- the process-wide streams (torch CPU and CUDA, numpy, Python ``random``): dropout, augmentation in the main
  process.

The validation attacks draw from a third generator restarted from ``EVAL_SEED`` at every validation or
test pass: a validation is then a function of the weights alone, and it consumes no stream that training
uses, whether or not it runs between a checkpoint and the next step (on resume, Lightning does not repeat
it).

Under DDP every rank's streams are gathered into the checkpoint (rank 0 writes it) and each rank restores its
own. The data order is the loader's business (:mod:`mma_lightning.data.resumable`).
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

CHECKPOINT_KEY = "mma_random_streams"
ATTACK_SEED_OFFSET = 0x5EED  # the attack stream is not the global stream of the same seed
EVAL_SEED = 0  # every validation / test pass restarts its attacks' stream from this seed


def _global_states() -> dict[str, Any]:
    """torch (CPU, CUDA), numpy and Python states, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # type: ignore[misc]
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(gauss)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_global_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`_global_states` (CUDA states only where the same number of GPUs is visible)."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    cuda = states.get("torch.cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class RandomStreams:
    """The attacks' generator of one module, and the snapshot / restore of every stream for its checkpoints.

    The generator lives on the device of the data it perturbs (``torch.rand(..., generator=g)`` needs the
    same device) and is seeded ``seed + ATTACK_SEED_OFFSET + rank`` when first used, ``seed`` being
    ``torch.initial_seed()`` unless :attr:`seed` is set, so ``pl.seed_everything(seed)`` fixes it and DDP ranks
    draw different starts. A run of a pack (:mod:`mma_lightning.packing`) sets :attr:`seed` to its own.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        """The run's seed (``None``: the process's, ``torch.initial_seed()``)."""
        self._generator: torch.Generator | None = None
        self._pending: tuple[str, Tensor] | None = None  # a saved (device type, state) to apply on creation
        self._eval: torch.Generator | None = None

    def eval_generator(self, device: torch.device | str) -> torch.Generator:
        """The evaluation attacks' generator: seeded ``EVAL_SEED`` again after each :meth:`restart_eval`."""
        device = torch.device(device)
        if self._eval is None or self._eval.device.type != device.type:
            self._eval = torch.Generator(device=device)
            self._eval.manual_seed(EVAL_SEED)
        return self._eval

    def restart_eval(self) -> None:
        """Make the next :meth:`eval_generator` start from ``EVAL_SEED`` (called as each eval pass starts)."""
        self._eval = None

    def generator(self, device: torch.device | str, rank: int = 0) -> torch.Generator:
        """The attacks' generator on ``device`` (created, or re-created after a device move, on demand)."""
        device = torch.device(device)
        if self._generator is None or self._generator.device.type != device.type:
            g = torch.Generator(device=device)
            seed = torch.initial_seed() if self.seed is None else self.seed
            g.manual_seed((seed + ATTACK_SEED_OFFSET + rank) % 2**63)
            if self._pending is not None:
                kind, state = self._pending
                self._pending = None
                if kind == device.type:
                    g.set_state(state)
                else:
                    warnings.warn(f"the attacks' random stream was saved on {kind} and cannot continue on "
                                  f"{device.type}: it restarts from its seed (the resumed run is not bitwise "
                                  "the uninterrupted one)", stacklevel=2)
            self._generator = g
        return self._generator

    def state(self) -> dict[str, Any]:
        """This process's streams: the process-wide ones and the attacks' generator (``None`` if unused)."""
        g = self._generator
        attack = None if g is None else (g.device.type, g.get_state())
        if g is None and self._pending is not None:
            attack = self._pending
        return {"global": _global_states(), "attack": attack}

    def load_state(self, state: dict[str, Any], restore_global: bool = True) -> None:
        """Continue from :meth:`state`'s output (the process-wide streams too unless ``restore_global`` is off)."""
        if restore_global:
            _set_global_states(state["global"])
        self._generator, self._pending = None, state.get("attack")

    def gathered_state(self, mine: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Every rank's :meth:`state` (or ``mine``, a state it recorded earlier), in rank order (a collective
        under DDP: all ranks must call it)."""
        mine = self.state() if mine is None else mine
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return [mine]
        states: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(states, mine)
        return states

    def restore(self, saved: list[dict[str, Any]] | None, rank: int, world_size: int,
                restore_global: bool = True) -> None:
        """Restore rank ``rank``'s streams from :meth:`gathered_state`'s output saved in a checkpoint.

        A checkpoint without streams (older ones) leaves them as they are; one saved by another number of
        processes restores the ranks it has and warns that the run is not bitwise the uninterrupted one.
        """
        if not saved:
            return
        if len(saved) != world_size and rank == 0:
            warnings.warn(f"the checkpoint holds the random streams of {len(saved)} processes and training "
                          f"resumes on {world_size}: ranks below {len(saved)} continue their streams, the "
                          "others start fresh ones (the data order and the eps table are unaffected)",
                          stacklevel=2)
        if rank < len(saved):
            self.load_state(saved[rank], restore_global=restore_global)
