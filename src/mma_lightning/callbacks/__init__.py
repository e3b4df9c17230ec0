"""Callbacks for long training runs: clean stops on signals, non-finite value guards, resume-aware progress
bars."""

from mma_lightning.callbacks.nonfinite import NonFiniteError, NonFiniteGuard, NonFiniteGuardLogic
from mma_lightning.callbacks.progress import (
    RichProgressBar,
    RichProgressBarLogic,
    TQDMProgressBar,
    TQDMProgressBarLogic,
)
from mma_lightning.callbacks.signals import StopOnSignal, StopOnSignalLogic

__all__ = ["NonFiniteError", "NonFiniteGuard", "NonFiniteGuardLogic", "RichProgressBar", "RichProgressBarLogic",
           "StopOnSignal", "StopOnSignalLogic", "TQDMProgressBar", "TQDMProgressBarLogic"]
