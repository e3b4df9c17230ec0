"""Exact resume from a checkpoint saved after ``fit`` returns (``trainer.fit(...); trainer.save_checkpoint(p)``;
issue 18, lightning-notes 10).

A checkpoint written during training (``ModelCheckpoint``, ``last.ckpt``, a signal stop) holds the fit loop's
counters as they stand in the middle of the loop, and Lightning resumes it where it stopped. Once ``fit`` has
returned, the loop has closed its epoch: it counts the epoch as completed even when ``max_steps`` ended it
half-way, and a later ``fit(ckpt_path=..., max_steps=larger)`` starts a new epoch (the rest of the stopped one is
never seen, the sampler moves to the next epoch's order) or, at an epoch boundary, runs an empty epoch first.
Either way the resumed run drifts from the uninterrupted one.

:class:`ResumePoint` fixes this from the module: at the end of a training step that can be the last one of
``fit`` (``max_steps`` reached, a stop requested, the epoch's last batch), it records the fit loop's state and
the random streams, which is what a ``ModelCheckpoint`` at that step would write. A checkpoint saved after
``fit`` finished at that same step gets them in place of the closed loop's. The weights, optimiser, schedulers
(non-plateau ones step before ``on_train_batch_end``) and MMA's eps table do not change after the last step, so
the checkpoint is then the one written during training, and resumes bitwise.

A run that ended elsewhere (``EarlyStopping`` after a mid-epoch validation) has no such point:
its after-``fit`` checkpoint is marked, and both saving and resuming it warn (:data:`INEXACT_MESSAGE`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

INEXACT_KEY = "mma_inexact_resume"
"""Checkpoint key of the reason why a checkpoint saved after ``fit`` does not resume exactly."""

EXACT_CHECKPOINTS = ("checkpoints written during training (ModelCheckpoint, last.ckpt, StopOnSignal) and "
                     "trainer.save_checkpoint after a fit that ended at max_steps, max_epochs, or a stop "
                     "requested during a training step (trainer.should_stop, Timer) resume exactly")
INEXACT_MESSAGE = ("this checkpoint was saved after fit returned at step {step}, which was not the end of a "
                   "training step that could close the run (e.g. EarlyStopping after a mid-epoch validation): "
                   "Lightning resumes it at the start of the next epoch, so the "
                   "resumed run is not bitwise the uninterrupted one. " + EXACT_CHECKPOINTS)


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


def apply(checkpoint: dict[str, Any], trainer: Any, point: ResumePoint | None) -> dict[str, Any] | None:
    """Write ``point``'s fit-loop state into ``checkpoint`` when it is saved after ``fit`` finished at that point's
    step; returns the random streams to save in place of the current ones (``None``: keep the current ones).

    A checkpoint saved after ``fit`` at a step without a point is marked (:data:`INEXACT_KEY`) and warned about.
    """
    if trainer is None or not fit_finished(trainer) or "loops" not in checkpoint:
        return None
    step = int(trainer.global_step)
    if point is not None and point.step == step:
        checkpoint["loops"]["fit_loop"] = point.fit_loop
        return point.streams
    if step > 0:
        message = INEXACT_MESSAGE.format(step=step)
        checkpoint[INEXACT_KEY] = message
        warnings.warn(message, stacklevel=2)
    return None


def warn_if_inexact(checkpoint: dict[str, Any]) -> None:
    """On resuming ``fit`` from ``checkpoint``: repeat the warning of a checkpoint marked by :func:`apply`."""
    message = checkpoint.get(INEXACT_KEY)
    if message:
        warnings.warn(message, stacklevel=2)
