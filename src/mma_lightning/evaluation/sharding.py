"""Sharding a test set over processes so that every point counts exactly once (docs/lightning-notes.md, item 9).

``torch.utils.data.DistributedSampler`` pads the last shard by repeating indices (or drops the tail with
``drop_last=True``), which would count some test points twice (or never). :class:`ShardSampler` gives rank
``r`` of ``W`` the indices ``r, r + W, r + 2W, ...``: the shards partition ``range(n)``, their sizes differ by
at most one, and nothing is padded.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch.distributed as dist
from torch.utils.data import Sampler


def distributed_world() -> tuple[int, int]:
    """``(world_size, rank)`` of the initialised default process group, ``(1, 0)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ShardSampler(Sampler[int]):
    """Strided, non-padding shard of ``range(num_samples)`` for one rank (every index on exactly one rank).

    Args:
        num_samples: size of the dataset (or of its evaluated prefix).
        num_replicas: number of shards; default the process group's world size (1 without one).
        rank: this shard; default the process's rank (0 without a process group).

    Example:
        >>> [list(ShardSampler(5, num_replicas=2, rank=r)) for r in range(2)]
        [[0, 2, 4], [1, 3]]
    """

    def __init__(self, num_samples: int, num_replicas: int | None = None, rank: int | None = None) -> None:
        world, this_rank = distributed_world()
        num_replicas = world if num_replicas is None else num_replicas
        rank = this_rank if rank is None else rank
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ValueError(f"num_samples must be an integer >= 0, got {num_samples!r}")
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas must be an integer >= 1, got {num_replicas!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be an integer in [0, {num_replicas - 1}], got {rank!r}")
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.num_replicas))
