"""Callbacks for long training runs: clean stops on signals, non-finite value guards."""

from mma_lightning.callbacks.nonfinite import NonFiniteError, NonFiniteGuard, NonFiniteGuardLogic
from mma_lightning.callbacks.signals import StopOnSignal, StopOnSignalLogic

__all__ = ["NonFiniteError", "NonFiniteGuard", "NonFiniteGuardLogic", "StopOnSignal", "StopOnSignalLogic"]
