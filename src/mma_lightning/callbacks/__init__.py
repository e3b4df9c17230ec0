"""Callbacks for long training runs: clean stops on signals, non-finite value guards."""

from mma_lightning.callbacks.signals import StopOnSignal, StopOnSignalLogic

__all__ = ["StopOnSignal", "StopOnSignalLogic"]
