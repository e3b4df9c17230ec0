"""Packed sweeps: several runs of one method and architecture trained together in one process.

:class:`PackedModule` (the runs' modules trained as one vmapped step) with :class:`PackedDataModule` (each run's
own data), :class:`RunCheckpoint`, :class:`RunLogger` and :class:`RunCallback` (each run's own checkpoints, logs
and callbacks); :func:`mma_lightning.packing.train.train_pack` and the Hydra launcher ``hydra/launcher=packed`` do it for
``mma-train``'s runs.
"""

from mma_lightning.packing.callbacks import RunCallback, RunTrainerView
from mma_lightning.packing.checkpoint import RunCheckpoint
from mma_lightning.packing.data import PackedDataModule
from mma_lightning.packing.logger import RunLogger
from mma_lightning.packing.module import PackedModule, check_packable

__all__ = ["PackedDataModule", "PackedModule", "RunCallback", "RunCheckpoint", "RunLogger", "RunTrainerView",
           "check_packable"]
