"""``mma-train``'s checkpoint callback and checkpoint plugin (:mod:`mma_lightning.cli.checkpoint`) on
``lightning.pytorch`` (whose ``Trainer`` accepts only ``lightning.fabric`` plugins)."""

from __future__ import annotations

from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from mma_lightning.cli.checkpoint import AtomicCheckpointIOLogic, BestAndLastCheckpointLogic


class BestAndLastCheckpoint(BestAndLastCheckpointLogic, ModelCheckpoint):
    """:class:`~mma_lightning.cli.checkpoint.BestAndLastCheckpointLogic` on ``lightning.pytorch``."""


class AtomicCheckpointIO(AtomicCheckpointIOLogic, TorchCheckpointIO):
    """:class:`~mma_lightning.cli.checkpoint.AtomicCheckpointIOLogic` on ``lightning.fabric``'s
    ``TorchCheckpointIO`` (``lightning.pytorch``'s)."""
