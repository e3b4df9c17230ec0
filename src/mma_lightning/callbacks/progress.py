"""Progress bars that stay right when a run is resumed or extended (``mma-train ckpt_path=...``).

Lightning's bars (2.x) count the batches of the current epoch from its start, but with ``max_epochs=-1`` (runs
measured in steps, as every preset) size the bar by the steps left at the resume, so a run resumed mid-epoch
at step 200 of 240 shows ``220/19``; the rich bar also titles it ``Epoch 0/-2`` (``max_epochs - 1``). Here the
total is the batches of this epoch the run will reach (those done before the resume included), and an
unbounded epoch count is left out of the title.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl


class ResumedTotalLogic:
    """``total_train_batches`` counted as the bar counts: from the start of the epoch, up to ``max_steps``."""

    @property
    def total_train_batches(self) -> int | float:
        """This epoch's batches up to ``max_steps``: those done before a resume plus those the steps left
        allow (with gradient accumulation, ``accumulate_grad_batches`` batches a step)."""
        trainer: Any = self.trainer  # type: ignore[attr-defined]
        total = trainer.num_training_batches
        if trainer.max_steps is not None and trainer.max_steps > 0:
            done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
            left = (trainer.max_steps - trainer.global_step) * trainer.accumulate_grad_batches
            total = min(total, done + left)
        return total


class RichProgressBarLogic(ResumedTotalLogic):
    """Lightning's rich bar, resume-aware, titled ``Epoch 3`` (not ``Epoch 3/-2``) when epochs are unbounded."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer: Any = self.trainer  # type: ignore[attr-defined]
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)  # type: ignore[misc]
        description = f"Epoch {current_epoch}"
        width = len(self.validation_description)  # type: ignore[attr-defined]
        return f"{description:{width}}" if width > len(description) else description


class TQDMProgressBarLogic(ResumedTotalLogic):
    """Lightning's tqdm bar, resume-aware."""


# The pytorch_lightning classes: the namespace-free logic above on pytorch_lightning's base classes
# (mma_lightning.lightning builds the lightning.pytorch ones from the same logic classes).
class RichProgressBar(RichProgressBarLogic, pl.callbacks.RichProgressBar):
    """:class:`RichProgressBarLogic` on pytorch_lightning (the default namespace; needs ``rich``)."""


class TQDMProgressBar(TQDMProgressBarLogic, pl.callbacks.TQDMProgressBar):
    """:class:`TQDMProgressBarLogic` on pytorch_lightning (the default namespace)."""
