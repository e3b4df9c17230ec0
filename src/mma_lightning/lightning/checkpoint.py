"""``mma-train``'s checkpoint callback (:mod:`mma_lightning.cli.checkpoint`) on ``lightning.pytorch``."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint

from mma_lightning.cli.checkpoint import BestAndLastCheckpointLogic


class BestAndLastCheckpoint(BestAndLastCheckpointLogic, ModelCheckpoint):
    """:class:`~mma_lightning.cli.checkpoint.BestAndLastCheckpointLogic` on ``lightning.pytorch``."""
