"""Packed sweeps: several runs of one method and architecture trained together in one process (issue 17)."""

from mma_lightning.packing.data import PackedDataModule
from mma_lightning.packing.module import PackedModule, check_packable

__all__ = ["PackedDataModule", "PackedModule", "check_packable"]
