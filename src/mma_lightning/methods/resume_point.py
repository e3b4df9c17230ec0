"""Exact resume from a checkpoint written once the last training step of ``fit`` is done: saved by
``trainer.save_checkpoint`` after ``fit`` returns, or by a callback while ``fit`` closes (docs/lightning-notes.md, item 10).

A checkpoint written during a training step (``ModelCheckpoint(every_n_train_steps=...)``, a signal stop) holds
the fit loop's counters in the middle of the loop, and Lightning resumes it where it stopped. Once the last step
of ``fit`` is done, the loop closes its epoch: at the end of a ``max_steps`` fit that stops in the middle of an
epoch, Lightning's ``on_train_epoch_end`` still runs, and a checkpoint written there (the default
``ModelCheckpoint``'s ``epoch=1-step=165.ckpt``) or after ``fit`` returned counts the epoch as processed. A later
``fit(ckpt_path=..., max_steps=larger)`` then starts a new epoch: the rest of the stopped one is never seen and
the sampler moves to the next epoch's order (after ``fit``, at an epoch boundary, an empty epoch runs first).
Either way the resumed run drifts from the uninterrupted one, without a word from Lightning.

:class:`ResumePoint` fixes this from the module: at the end of a training step that can be the last one of
``fit`` (``max_steps`` reached, a stop requested, the epoch's last batch), it records the fit loop's state and
the random streams, which is what a ``ModelCheckpoint(every_n_train_steps=...)`` at that step writes. A
checkpoint saved later in that same step gets them in place of the closing loop's (:func:`apply`): saved after
``fit`` finished, or while ``fit`` closes an epoch that its last step left half done (validation end, epoch end,
train end). The weights, optimiser, schedulers (non-plateau ones step before ``on_train_batch_end``) and MMA's
eps table do not change after the last step, so the checkpoint is then the one written during training, and
resumes bitwise. The end of a whole epoch is Lightning's own case when ``fit`` counts epochs (``max_epochs``),
and such a checkpoint is kept as is; under ``max_steps`` Lightning closes that epoch a second time on resume and
orders the next one as the epoch after it, so there too the step's state is written.

A run that ended elsewhere (``EarlyStopping`` after a mid-epoch validation) has no such point: its checkpoint
saved after ``fit``, or while the half-done epoch closes, is marked, and both saving and resuming it warn
(:data:`INEXACT_MESSAGE`, :data:`SKIPPED_MESSAGE`), naming the step and the batches a resume skips.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

INEXACT_KEY = "mma_inexact_resume"
"""Checkpoint key of the reason why a checkpoint saved after ``fit``, or while ``fit`` closes a half-done epoch,
does not resume exactly."""

EXACT_CHECKPOINTS = ("checkpoints written during training (ModelCheckpoint, last.ckpt, StopOnSignal), those "
                     "written while a fit closes, and trainer.save_checkpoint after a fit, when the fit ended at "
                     "max_steps, max_epochs, or a stop requested during a training step (trainer.should_stop, "
                     "Timer), resume exactly")
INEXACT_MESSAGE = ("this checkpoint was saved after fit returned at step {step}, which was not the end of a "
                   "training step that could close the run (e.g. EarlyStopping after a mid-epoch validation): "
                   "Lightning resumes it at the start of the next epoch, so the "
                   "resumed run is not bitwise the uninterrupted one. " + EXACT_CHECKPOINTS)
SKIPPED_MESSAGE = ("this checkpoint was saved at step {step} while fit closed epoch {epoch} after {seen} of its "
                   "{total} batches, without the state of a training step that could end the run (e.g. "
                   "EarlyStopping after a mid-epoch validation): Lightning resumes it at the start of epoch "
                   "{next_epoch} and skips the last {skipped} batches of epoch {epoch}, so the resumed run is not "
                   "bitwise the uninterrupted one. " + EXACT_CHECKPOINTS)


@dataclass
class ResumePoint:
    """The fit loop's state and this process's random streams at the end of training step ``step``."""

    step: int
    fit_loop: dict[str, Any]
    streams: dict[str, Any]


def may_end_fit(trainer: Any) -> bool:
    """Whether ``fit`` can return after the current training step (read at ``on_train_batch_end``): the step
    reaches ``max_steps``, a stop was requested (a callback's ``on_train_batch_end`` ran already), or the epoch's
    last batch (``max_epochs``, a stop requested by the epoch-end validation). Host-side reads only."""
    loop = trainer.fit_loop
    return ((loop.max_steps != -1 and trainer.global_step >= loop.max_steps) or bool(trainer.should_stop)
            or bool(loop.epoch_loop.batch_progress.is_last_batch))


def fit_finished(trainer: Any) -> bool:
    """Whether ``fit`` ran and returned normally (a checkpoint saved now sees the loop's closed state)."""
    return trainer.state.fn == "fit" and trainer.state.status == "finished"


def closing_half_epoch(trainer: Any) -> bool:
    """Whether a checkpoint saved now is written while ``fit`` closes an epoch that its last step left half done
    (``on_train_epoch_end``: the epoch counted as processed, its last batch not reached)."""
    loop = trainer.fit_loop
    epoch = loop.epoch_progress.current
    return epoch.processed > epoch.completed and not loop.epoch_loop.batch_progress.is_last_batch


def apply(checkpoint: dict[str, Any], trainer: Any, point: ResumePoint | None) -> dict[str, Any] | None:
    """Write ``point``'s fit-loop state into ``checkpoint`` when it is saved after its step: after ``fit``
    finished at that point's step, or during ``fit`` later in that step (validation end, epoch end, train end)
    when the step ended the epoch early (``max_steps``, a stop) or ended it under ``max_steps``. Returns the random
    streams to save in place of the current ones (``None``: keep the current ones).

    A checkpoint saved after ``fit``, or while ``fit`` closes a half-done epoch, at a step without a point is
    marked (:data:`INEXACT_KEY`) and warned about, naming the step (and the batches a resume skips).
    """
    if trainer is None or "loops" not in checkpoint or trainer.state.fn != "fit":
        return None
    step = int(trainer.global_step)
    at_point = point is not None and point.step == step
    if fit_finished(trainer):
        if at_point:
            assert point is not None
            checkpoint["loops"]["fit_loop"] = point.fit_loop
            return point.streams
        if step > 0:
            _mark(checkpoint, INEXACT_MESSAGE.format(step=step))
        return None
    if at_point:
        assert point is not None
        # Lightning resumes a checkpoint of an epoch's end exactly when fit counts epochs; with max_steps it closes
        # that epoch a second time on resume and orders the next one as the epoch after it.
        mid_epoch = not point.fit_loop["epoch_loop.batch_progress"]["is_last_batch"]
        if mid_epoch or trainer.fit_loop.max_steps != -1:
            checkpoint["loops"]["fit_loop"] = point.fit_loop
            return point.streams
        return None
    if closing_half_epoch(trainer):
        loop = trainer.fit_loop
        epoch, seen = int(loop.epoch_progress.current.completed), int(loop.epoch_loop.batch_progress.current.ready)
        total = trainer.num_training_batches
        skipped = "remaining" if total == float("inf") else str(int(total) - seen)
        _mark(checkpoint, SKIPPED_MESSAGE.format(step=step, epoch=epoch, seen=seen, total=total,
                                                 next_epoch=epoch + 1, skipped=skipped))
    return None


def _mark(checkpoint: dict[str, Any], message: str) -> None:
    """Mark ``checkpoint`` as not resuming exactly (:func:`warn_if_inexact` repeats it) and warn now."""
    checkpoint[INEXACT_KEY] = message
    warnings.warn(message, stacklevel=3)


def warn_if_inexact(checkpoint: dict[str, Any]) -> None:
    """On resuming ``fit`` from ``checkpoint``: repeat the warning of a checkpoint marked by :func:`apply`."""
    message = checkpoint.get(INEXACT_KEY)
    if message:
        warnings.warn(message, stacklevel=2)
