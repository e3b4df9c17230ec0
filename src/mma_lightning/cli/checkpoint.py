"""The checkpoints of an ``mma-train`` run: the best by a monitored metric and ``last.ckpt``, the latest
state.

Lightning's ``ModelCheckpoint(save_last=True)`` (2.5+) refreshes ``last.ckpt`` only at steps where it also
saved a top-k checkpoint, so a validation that is not the best leaves ``last.ckpt`` at an older step, and
resuming from it (``ckpt_path=<run>/checkpoints/last.ckpt``) would silently repeat training steps with an
older optimiser state and MMA eps table. :class:`BestAndLastCheckpoint` writes ``last.ckpt`` wherever
Lightning considers saving (after validation or at epoch end) and when training ends, whatever the monitored
value.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint


class BestAndLastCheckpointLogic:
    """``ModelCheckpoint`` (same arguments) whose ``last.ckpt`` always holds the latest training state.

    The MMA reference keeps the checkpoint with the highest average validation margin
    (``monitor="val/avg_eps"``, ``mode="max"``); ``last.ckpt`` is the point to resume from.
    """

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning's top-k / last saving, then ``last.ckpt`` if it was not written at this step."""
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):  # else Lightning saves at train epoch end
            self._save_latest(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning's top-k / last saving (when it saves at epoch ends), then ``last.ckpt`` likewise."""
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_latest(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``last.ckpt`` of the final step (Lightning writes it only when no checkpoint was saved at all)."""
        super().on_train_end(trainer, pl_module)
        self._save_latest(trainer)

    def _save_latest(self, trainer: pl.Trainer) -> None:
        # Skipped when not fitting, in the sanity check, or when a checkpoint was saved at this step.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


# The pytorch_lightning classes: the namespace-free logic above on pytorch_lightning's base classes
# (mma_lightning.lightning builds the lightning.pytorch ones from the same logic classes).
class BestAndLastCheckpoint(BestAndLastCheckpointLogic, ModelCheckpoint):
    """:class:`BestAndLastCheckpointLogic` on pytorch_lightning (the default namespace)."""
