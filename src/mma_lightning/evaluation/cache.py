"""A resumable evaluation: per-batch outcomes kept on disk, so an interrupted ``mma-eval`` started again does
not redo the batches (every radius of them) and the checkpoints it has already finished.

A cache file belongs to one stage of one evaluation, named by a SHA-256 of everything its outcomes depend on:
the model's and the data's fingerprints (:mod:`mma_lightning.evaluation.identity`, the ones written into
``results.json``, plus a hash of the input values), the stage's settings, the batch size and the process
layout. Any change gives a new file, never a stale result. Every write goes to a temporary file renamed into
place, so a kill at any moment leaves the previous complete file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mma_lightning.evaluation.atomic import write_atomically
from mma_lightning.evaluation.batches import EvalData, evaluation_batches
from mma_lightning.evaluation.identity import data_identity, tensor_sha256
from mma_lightning.evaluation.sharding import distributed_world

CACHE_FORMAT = 1


def save_atomically(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` into ``path`` through :func:`write_atomically` (never a truncated file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomically(path, buffer.getvalue())


def cache_key(**parts: Any) -> str:
    """SHA-256 (hex) of ``parts`` as canonical JSON (sorted keys; non-JSON values by their ``repr``)."""
    text = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def data_fingerprint(data: EvalData, device: torch.device, *, batch_size: int,
                     max_samples: int | None) -> dict[str, Any]:
    """:func:`data_identity` of the evaluated points plus ``inputs_sha256`` (their values), from one pass over
    ``data`` without the model (on every process: the whole data, not a shard)."""
    xs, index, label = [], [], []
    for x, y, i in evaluation_batches(data, device, batch_size=batch_size, max_samples=max_samples,
                                      shard=False):
        xs.append(x)
        index.append(i)
        label.append(y)
    if not index:
        raise ValueError("data yielded no samples to evaluate")
    index_all, label_all = torch.cat(index), torch.cat(label)
    order = torch.argsort(index_all.cpu())
    return {**data_identity(index_all.cpu()[order], label_all.cpu()[order]),
            "inputs_sha256": tensor_sha256(xs)}


class OutcomeCache:
    """Per-batch outcome columns of one evaluation stage, stored in ``path`` (``None``: memory only).

    ``get(b)`` returns batch ``b``'s columns when a previous run stored them; ``put(b, columns)`` stores them
    and rewrites the file atomically.
    """

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = None if path is None else Path(path)
        self.entries: dict[int, dict[str, Tensor]] = {}
        if self.path is not None and self.path.is_file():
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            self.entries = {int(b): dict(cols) for b, cols in saved.items()}

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, batch: int, device: torch.device) -> dict[str, Tensor] | None:
        """The stored columns of ``batch`` on ``device``, or ``None``."""
        cols = self.entries.get(batch)
        return None if cols is None else {k: v.to(device) for k, v in cols.items()}

    def put(self, batch: int, columns: dict[str, Tensor]) -> None:
        """Store the columns of ``batch`` (copied to the CPU) and save the file."""
        self.entries[batch] = {k: v.detach().cpu() for k, v in columns.items()}
        if self.path is not None:
            save_atomically(self.entries, self.path)


def stage_cache(cache_dir: str | os.PathLike | None, stage: str, **key: Any) -> OutcomeCache | None:
    """The :class:`OutcomeCache` of ``stage`` in ``cache_dir`` for ``key`` and this process's rank and world
    size (``None`` without a directory)."""
    if cache_dir is None:
        return None
    world, rank = distributed_world()
    name = cache_key(stage=stage, world=world, rank=rank, **key)[:32]
    return OutcomeCache(Path(cache_dir) / f"{stage}-{name}.pt")
