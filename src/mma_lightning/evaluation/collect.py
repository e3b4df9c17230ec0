"""Per-sample outcomes accumulated with torchmetrics, gathered over ranks, each test point exactly once.

Every column (index, label, correctness, robustness at each eps, margin, ...) is a torchmetrics ``CatMetric``:
``compute()`` all-gathers it across ``torch.distributed`` ranks (uneven shard sizes included), so sharded
evaluation needs no hand-written collective. Values are kept in float64 (exact for indices up to 2**53) and
NaN checks are off (they would sync to the host at every update).
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn
from torchmetrics import CatMetric

INDEX = "index"


class SampleCollector(nn.Module):
    """Named per-sample columns, one ``CatMetric`` each; ``compute()`` returns them sorted by sample index.

    Args:
        columns: names of the columns besides ``"index"``; each ``update`` gives one ``[B]`` tensor per
            column.
        device: where the metric states live (the device the outcomes are computed on).
        sync: gather the columns over the ``torch.distributed`` ranks in ``compute()`` (each rank evaluated
            a shard); ``False`` when every rank evaluated all the data.
    """

    def __init__(self, columns: list[str], device: torch.device | str = "cpu", sync: bool = True) -> None:
        super().__init__()
        if INDEX in columns or len(set(columns)) != len(columns):
            raise ValueError(f"columns must be distinct names other than {INDEX!r}, got {columns!r}")
        self.metrics = nn.ModuleDict({name: CatMetric(nan_strategy="disable", sync_on_compute=sync)
                                      for name in [INDEX, *columns]})
        self.metrics.to(device)
        for metric in self.columns.values():
            metric.set_dtype(torch.float64)  # float32 would round indices above 2**24

    @property
    def columns(self) -> dict[str, CatMetric]:
        """The metrics by column name (typed)."""
        return cast(dict[str, CatMetric], dict(self.metrics.items()))

    def update(self, index: Tensor, **columns: Tensor) -> None:
        """Add one batch: ``index`` ``[B]`` and every column ``[B]`` (bool / int / float)."""
        if set(columns) != set(self.metrics) - {INDEX}:
            expected = sorted(set(self.metrics) - {INDEX})
            raise ValueError(f"update needs the columns {expected}, got {sorted(columns)}")
        self.columns[INDEX].update(index.detach().double())
        for name, value in columns.items():
            self.columns[name].update(value.detach().double())

    def compute(self) -> dict[str, Tensor]:
        """All columns over all ranks, sorted by index (float64; ``"index"`` as int64).

        Raises ``ValueError`` when no sample was seen or an index occurs twice (e.g. a padding
        ``DistributedSampler``): every test point must count exactly once.
        """
        values = {name: metric.compute() for name, metric in self.columns.items()}
        index = values[INDEX]
        if isinstance(index, list) or index.numel() == 0:
            raise ValueError("data yielded no samples to evaluate")
        values = {name: v.reshape(-1) for name, v in values.items()}  # one sample computes to a 0-d tensor
        index = values[INDEX].long()
        order = torch.argsort(index)
        index = index[order]
        if index.numel() > 1 and bool((index[1:] == index[:-1]).any()):
            raise ValueError("a test point was evaluated more than once (duplicate sample indices): a "
                             "padding sampler such as DistributedSampler counts points twice; evaluate on "
                             "one device or let the evaluation shard the data (shard=None) so every point "
                             "counts once")
        out = {name: v[order] for name, v in values.items() if name != INDEX}
        out[INDEX] = index
        return out
