"""Packed runs (:mod:`mma_lightning.packing`) on ``lightning.pytorch``: the same logic classes on this
namespace's base classes; :func:`check_packable` is re-exported unchanged."""

from __future__ import annotations

import lightning.pytorch as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

from mma_lightning.packing import *
from mma_lightning.packing import __all__ as _default_all
from mma_lightning.packing.callbacks import RunCallbackLogic
from mma_lightning.packing.checkpoint import RunCheckpointLogic
from mma_lightning.packing.data import PackedDataModuleLogic
from mma_lightning.packing.logger import RunLoggerLogic
from mma_lightning.packing.module import PackedModuleLogic

__all__ = list(_default_all)


class PackedModule(PackedModuleLogic, L.LightningModule):
    """:class:`~mma_lightning.packing.module.PackedModuleLogic` on ``lightning.pytorch``."""


class PackedDataModule(PackedDataModuleLogic, L.LightningDataModule):
    """:class:`~mma_lightning.packing.data.PackedDataModuleLogic` on ``lightning.pytorch``."""


class RunCheckpoint(RunCheckpointLogic, ModelCheckpoint):
    """:class:`~mma_lightning.packing.checkpoint.RunCheckpointLogic` on ``lightning.pytorch``."""


class RunLogger(RunLoggerLogic, Logger):
    """:class:`~mma_lightning.packing.logger.RunLoggerLogic` on ``lightning.pytorch``."""


class RunCallback(RunCallbackLogic, L.Callback):
    """:class:`~mma_lightning.packing.callbacks.RunCallbackLogic` on ``lightning.pytorch``."""
