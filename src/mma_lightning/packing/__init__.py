"""Packed sweeps: several runs of one method and architecture trained together in one process (issue 17).

:class:`PackedModule` (the runs' modules trained as one vmapped step) with :class:`PackedDataModule` (each run's
own data), :class:`RunCheckpoint` and :class:`RunLogger` (each run's own checkpoints and logs);
:func:`mma_lightning.packing.train.train_pack` and the Hydra launcher ``hydra/launcher=packed`` do it for
``mma-train``'s runs.
"""

from mma_lightning.packing.checkpoint import RunCheckpoint
from mma_lightning.packing.data import PackedDataModule
from mma_lightning.packing.logger import RunLogger
from mma_lightning.packing.module import PackedModule, check_packable

__all__ = ["PackedDataModule", "PackedModule", "RunCheckpoint", "RunLogger", "check_packable"]
