"""Each run of a pack gets its own checkpoints, as if it had trained alone.

:class:`RunCheckpoint` is the run's ``ModelCheckpoint`` (the library's :class:`~mma_lightning.cli.checkpoint.
BestAndLastCheckpoint`: the best by ``<run>/val/avg_eps`` and ``last.ckpt``), which writes the run's own checkpoint
(:meth:`~mma_lightning.packing.module.PackedModuleLogic.run_checkpoint`: its weights, eps table, settings, step,
random stream and optimiser state) instead of the whole pack's: ``MMAModule.load_from_checkpoint`` and ``mma-eval``
load it alone. A stopped run (non-finite loss) writes no checkpoint after it stopped. Resuming a pack takes the
pack's own checkpoint (a plain ``ModelCheckpoint`` of the pack).
"""

from __future__ import annotations

from typing import Any
from weakref import proxy

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor

from mma_lightning.cli.checkpoint import BestAndLastCheckpointLogic


class RunCheckpointLogic(BestAndLastCheckpointLogic):
    """``BestAndLastCheckpoint`` (same arguments) of run ``run`` of a :class:`~mma_lightning.packing.PackedModule`:
    its ``monitor`` is a metric of that run (``run0/val/avg_eps``) and it writes that run's checkpoint alone."""

    def __init__(self, run: int, **kwargs: Any) -> None:
        if isinstance(run, bool) or not isinstance(run, int) or run < 0:
            raise ValueError(f"run must be the index of a run of the pack (an int >= 0), got {run!r}")
        super().__init__(**kwargs)
        self.run = run

    @property
    def state_key(self) -> str:
        """``ModelCheckpoint``'s key with the run's index: two runs' checkpoints may have the same settings."""
        return f"{super().state_key}[run={self.run}]"

    def _stopped(self, trainer: pl.Trainer) -> bool:
        pack: Any = trainer.lightning_module
        if self.run >= len(pack.runs):
            raise ValueError(f"RunCheckpoint(run={self.run}) but the pack has {len(pack.runs)} runs")
        return self.run in pack.stopped

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        if not self._stopped(trainer):  # a stopped run logs no more validation: its best stays
            super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        pack: Any = trainer.lightning_module
        checkpoint = pack.run_checkpoint(self.run)
        if checkpoint is None:  # stopped after a non-finite loss
            return
        trainer.strategy.save_checkpoint(checkpoint, filepath)  # rank 0 writes, through the trainer's IO
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


class RunCheckpoint(RunCheckpointLogic, ModelCheckpoint):
    """:class:`RunCheckpointLogic` on pytorch_lightning (the default namespace)."""
