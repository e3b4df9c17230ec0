"""Test data for the evaluation functions: batches ``(x, y, index)`` on the model's device.

Accepted ``data`` (every evaluation function takes the same):

- a ``DataLoader`` (or any iterable of batches) yielding ``(x, y)`` or ``(x, y, index)``; without an index, a
  sample's index is its position in the iteration order, so use a loader that does not shuffle;
- tensors ``(x, y)`` or ``(x, y, index)``, batched here by ``batch_size``.

Under ``torch.distributed`` (``shard=None`` means: when a process group is initialised), each rank evaluates
one :class:`ShardSampler` shard of the data, which pads nothing, and the per-sample outcomes are gathered
afterwards (docs/lightning-notes.md, item 9): a ``DataLoader`` is rebuilt over its map-style dataset with that sampler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeGuard

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm import tqdm  # plain text bars: no ipywidgets warning in notebooks

from mma_lightning.attacks.checks import check_in_box
from mma_lightning.attacks.context import (
    frozen_parameters,
    grad_enabled_outside_inference,
    model_mode,
    usable_for_autograd,
)
from mma_lightning.evaluation.sharding import ShardSampler, distributed_world

EvalData = DataLoader | Sequence[Tensor] | Iterable[Any]
Batch = tuple[Tensor, Tensor, Tensor]


def resolve_shard(shard: bool | None) -> bool:
    """Whether to shard: ``shard`` (``None``: when a process group with more than one rank is initialised)."""
    world, _ = distributed_world()
    return world > 1 and (shard is None or bool(shard))


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model without tensors."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


DEVICE_BATCH_LIMIT = 2048
"""The largest batch :func:`device_batch_size` picks: beyond it a GPU gains little (the passes are kernel-bound
from about batch 512 on, docs/gpu-measurements.md)."""


def device_batch_size(model: nn.Module, example: Tensor, limit: int = DEVICE_BATCH_LIMIT,
                      memory_fraction: float = 0.5) -> int:
    """An evaluation batch size for ``model`` on its CUDA device: the largest power of two up to ``limit`` whose
    attack passes fit in ``memory_fraction`` of the free memory, measured by one forward and input-gradient pass
    on a batch of 64 copies of ``example`` (one input, without the batch dimension). On the CPU: 256."""
    device = model_device(model)
    if device.type != "cuda":
        return 256
    probe = 64
    x = example.to(device).unsqueeze(0).expand(probe, *example.shape).clone().requires_grad_(True)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with grad_enabled_outside_inference(), frozen_parameters(model), model_mode(model, train=False):
        (grad,) = torch.autograd.grad(model(x).float().logsumexp(dim=1).sum(), x)
    per_sample = max(1, torch.cuda.max_memory_allocated(device) - before) / probe
    del grad, x
    free, _ = torch.cuda.mem_get_info(device)
    fits = int(memory_fraction * free / per_sample)
    size = 1 << max(0, min(limit, fits).bit_length() - 1)
    return max(1, min(size, limit))


def check_positive_int(name: str, value: int | None, optional: bool = False) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is an integer >= 1 (or ``None`` when ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "an integer >= 1 or None" if optional else "an integer >= 1"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


class _WithPosition(Dataset):
    """Item ``i`` of ``dataset`` together with ``i`` (the index of a sample whose loader yields none)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.dataset[i], i

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


class _CollateWithPosition:
    """Collate items with the loader's own ``collate_fn``; positions become a separate int64 tensor."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: list[tuple[Any, int]]) -> tuple[Any, Tensor]:
        return self.collate_fn([item for item, _ in items]), torch.tensor([i for _, i in items])


def _is_tensor_data(data: Any) -> TypeGuard[Sequence[Tensor]]:
    return isinstance(data, (tuple, list)) and len(data) in (2, 3) and all(torch.is_tensor(t) for t in data)


def _split(batch: Any, position: Tensor) -> Batch:
    """``(x, y)`` or ``(x, y, index)`` -> ``(x, y, index)``; ``position`` is used when there is no index."""
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        length = f" of length {len(batch)}" if hasattr(batch, "__len__") else ""
        raise ValueError(f"data must yield batches (x, y) or (x, y, index), "
                         f"got {type(batch).__name__}{length}")
    x, y = batch[0], batch[1]
    index = torch.as_tensor(batch[2]) if len(batch) == 3 else position
    if not torch.is_tensor(x) or not torch.is_tensor(y):
        raise ValueError(f"batches must hold tensors x and y, got {type(x).__name__} and {type(y).__name__}")
    if index.shape != (x.shape[0],):
        raise ValueError(f"the index of a batch must have shape [{x.shape[0]}], got {tuple(index.shape)}")
    return x, y, index.long()


def _tensor_batches(tensors: Sequence[Tensor], batch_size: int, limit: int, world: int, rank: int,
                    shard: bool) -> Iterator[tuple[Any, Tensor]]:
    x, y = tensors[0], tensors[1]
    if x.shape[0] != y.shape[0] or (len(tensors) == 3 and tensors[2].shape[0] != x.shape[0]):
        raise ValueError(f"data tensors must have the same length, got {[t.shape[0] for t in tensors]}")
    rows = torch.arange(rank, limit, world) if shard else torch.arange(limit)
    for chunk in rows.split(batch_size):
        yield tuple(t[chunk.to(t.device)] for t in tensors), chunk


def _loader_batches(loader: Iterable[Any], limit: int | None) -> Iterator[tuple[Any, Tensor]]:
    start = 0
    for batch in loader:
        if limit is not None and start >= limit:
            return
        n = len(batch[0]) if isinstance(batch, (tuple, list)) and batch else 0
        if limit is not None and start + n > limit:
            batch = tuple(t[: limit - start] for t in batch)
            n = limit - start
        yield batch, torch.arange(start, start + n)
        start += n


def _sharded_loader(loader: DataLoader, limit: int, world: int, rank: int, batch_size: int) -> DataLoader:
    """The same dataset, batch size, workers and collate function over this rank's :class:`ShardSampler`.

    A loader built with a ``batch_sampler`` (no ``batch_size`` of its own) gets ``batch_size``.
    """
    return DataLoader(
        _WithPosition(loader.dataset),
        batch_size=loader.batch_size or batch_size,
        sampler=ShardSampler(limit, num_replicas=world, rank=rank),
        num_workers=loader.num_workers,
        collate_fn=_CollateWithPosition(loader.collate_fn),
        pin_memory=loader.pin_memory,
    )


def data_size(data: EvalData, max_samples: int | None = None) -> int | None:
    """How many points :func:`evaluation_batches` yields over all ranks (``None``: an iterable of unknown
    length without ``max_samples``)."""
    if _is_tensor_data(data):
        n: int | None = int(data[0].shape[0])
    elif isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset):
        n = len(data.dataset)  # type: ignore[arg-type]
    else:
        n = None
    if max_samples is None:
        return n
    return max_samples if n is None else min(n, max_samples)


def evaluation_batches(
    data: EvalData,
    device: torch.device,
    *,
    batch_size: int = 256,
    max_samples: int | None = None,
    shard: bool | None = None,
    progress: bool = False,
    desc: str = "eval",
    box: tuple[float | None, float | None] | None = None,
    box_settable: bool = True,
) -> Iterator[Batch]:
    """Iterate ``data`` as ``(x, y, index)`` batches on ``device`` (see the module docstring for ``data``).

    Args:
        data: a DataLoader / iterable of batches, or tensors ``(x, y[, index])``.
        device: where the batches go (the model's device; the model itself is never moved).
        batch_size: batch size for tensor data (a DataLoader keeps its own, if it has one).
        max_samples: evaluate only the first ``max_samples`` points of ``data`` (all ranks together).
        shard: split the data over the ``torch.distributed`` ranks with a non-padding sampler; ``None``:
            when a process group is initialised.
        progress: show a tqdm progress bar (rank 0 only).
        box: the data box ``(clip_min, clip_max)``: the first batch must lie in it
            (:func:`~mma_lightning.attacks.checks.check_in_box`; one host sync, none after);
            ``box_settable``: whether the caller takes ``clip_min`` / ``clip_max`` (named as a fix).
    """
    check_positive_int("batch_size", batch_size)
    check_positive_int("max_samples", max_samples, optional=True)
    world, rank = distributed_world()
    shard = resolve_shard(shard)
    if _is_tensor_data(data):
        n = int(data[0].shape[0])
        limit: int | None = n if max_samples is None else min(n, max_samples)
        assert limit is not None
        total: int | None = len(range(rank, limit, world)) if shard else limit
        source: Iterable[tuple[Any, Tensor]] = _tensor_batches(data, batch_size, limit, world, rank, shard)
    elif isinstance(data, DataLoader) or (isinstance(data, Iterable) and not isinstance(data, (str, bytes))):
        sized = isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset)
        n_data = len(data.dataset) if sized else None  # type: ignore[union-attr, arg-type]
        limit = max_samples if n_data is None else n_data
        if max_samples is not None and limit is not None:
            limit = min(limit, max_samples)
        if shard:
            if not sized:
                raise ValueError("sharded evaluation needs a DataLoader over a map-style dataset (with "
                                 f"__len__), got {type(data).__name__}; pass shard=False to evaluate "
                                 "everything on every rank")
            assert limit is not None
            source = _sharded_loader(data, limit, world, rank, batch_size)  # type: ignore[arg-type]
            total = len(range(rank, limit, world))
        else:
            source = _loader_batches(data, limit)
            total = limit
    else:
        raise ValueError("data must be a DataLoader, an iterable of (x, y[, index]) batches, or tensors "
                         f"(x, y[, index]); got {type(data).__name__}")
    bar = tqdm(total=total, desc=desc, unit="img", disable=not progress or rank != 0, leave=False)
    try:
        for batch, position in source:
            x, y, index = _split(batch, position)
            if x.shape[0] == 0:
                continue
            if box is not None:
                check_in_box(x, *box, where="evaluation", box_settable=box_settable)
                box = None  # the first batch only
            x = usable_for_autograd(x.to(device, non_blocking=True))
            y = usable_for_autograd(y.to(device, non_blocking=True))
            yield x, y, index.to(device, non_blocking=True)
            bar.update(x.shape[0])
    finally:
        bar.close()
