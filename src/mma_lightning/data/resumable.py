"""A training data order that a checkpoint can stop and resume mid-epoch, on one device or under DDP.

Lightning saves and restores the state of a train loader that has ``state_dict`` / ``load_state_dict``
(its fit loop stores them under ``loops.fit_loop.state_dict.combined_loader`` and calls ``load_state_dict``
before iterating again; a plain ``DataLoader`` makes it warn "your dataloader is not resumable" instead,
docs/lightning-notes.md, item 10). :class:`ResumableDataLoader` is that loader: it counts the batches it yielded in the
current epoch, and on resume its :class:`ResumableSampler` skips the samples already seen, so a resumed run
sees exactly the batches the uninterrupted run would have seen.

The order itself is ``torch.utils.data.DistributedSampler``'s (a permutation seeded by ``seed + epoch``,
padded to a multiple of the world size, rank ``r`` taking every ``num_replicas``-th index from ``r``), so
Lightning keeps the sampler under DDP instead of replacing it. The position is saved as a number of GLOBAL
samples, so resuming on another number of processes continues the same epoch's permutation from the same
place (the order is then the same as a run on that many processes, not bitwise the old one).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

STATE_KEYS = ("epoch", "samples")


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (same order, same arguments) that can start an epoch after its first samples.

    :meth:`skip` says how many global samples of which epoch were already consumed; the next iteration of
    that epoch leaves them out (an iteration of any other epoch is the full epoch). ``__len__`` stays the
    full epoch's length, which is what Lightning expects of a resumed loader.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False) -> None:
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas must be a positive int, got {num_replicas!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be an int in [0, {num_replicas - 1}], got {rank!r}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self._skip: tuple[int, int] | None = None  # (epoch, global samples to leave out)

    def skip(self, epoch: int, samples: int) -> None:
        """Leave out the first ``samples`` global samples of ``epoch``'s order on its next iteration."""
        if samples < 0:
            raise ValueError(f"samples must be >= 0, got {samples!r}")
        self._skip = (int(epoch), int(samples))

    def resume_offset(self) -> int:
        """Global samples the next iteration leaves out (0 unless :meth:`skip` named the current epoch)."""
        return self._skip[1] if self._skip is not None and self._skip[0] == self.epoch else 0

    def global_order(self) -> list[int]:
        """This epoch's indices over all ranks, padded (or cut, with ``drop_last``) as ``DistributedSampler``."""
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            indices = torch.randperm(n, generator=g).tolist()
        else:
            indices = list(range(n))
        if self.drop_last:
            return indices[: self.total_size]
        padding = self.total_size - len(indices)
        while padding > 0:
            indices += indices[:padding]
            padding = self.total_size - len(indices)
        return indices

    def __iter__(self) -> Iterator[int]:
        indices = self.global_order()
        if self._skip is not None:
            epoch, samples = self._skip
            self._skip = None
            if epoch == self.epoch:
                indices = indices[samples:]
                # Another world size than the one that saved: keep every rank's share equal.
                indices = indices[: len(indices) - len(indices) % self.num_replicas]
        return iter(indices[self.rank:: self.num_replicas])


class ResumableDataLoader(DataLoader):
    """``DataLoader`` over a :class:`ResumableSampler` whose position in the epoch is saved by Lightning.

    ``state_dict()`` is ``{"epoch": e, "samples": n}``: ``n`` global samples of epoch ``e`` were yielded
    (batches yielded on this rank x batch size x world size; DDP ranks yield equal batches).
    ``load_state_dict`` makes the next iteration of epoch ``e`` start after them.
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, **kwargs: Any) -> None:
        if not isinstance(sampler, ResumableSampler):
            raise ValueError(f"sampler must be a ResumableSampler, got {type(sampler).__name__}")
        if kwargs.get("batch_size", 1) is None or "batch_sampler" in kwargs or kwargs.get("shuffle"):
            raise ValueError("ResumableDataLoader needs a batch_size and its sampler's order "
                             "(no batch_sampler, no shuffle=True: the sampler shuffles)")
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._epoch = sampler.epoch
        self._samples = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        # A generator: this runs at the first next(), after Lightning's set_epoch.
        self._epoch = sampler.epoch
        self._samples = sampler.resume_offset()
        for batch in super().__iter__():
            self._samples += self.batch_size * sampler.num_replicas  # type: ignore[operator]
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Epoch and global samples yielded so far in it (Lightning stores this in every checkpoint)."""
        return {"epoch": self._epoch, "samples": self._samples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume epoch ``state_dict["epoch"]`` after its first ``state_dict["samples"]`` global samples."""
        missing = [key for key in STATE_KEYS if key not in state_dict]
        if missing:
            raise ValueError(f"a ResumableDataLoader state needs the keys {list(STATE_KEYS)}, missing {missing}")
        self.sampler.skip(int(state_dict["epoch"]), int(state_dict["samples"]))  # type: ignore[attr-defined]
