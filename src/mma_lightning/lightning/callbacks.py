"""The training-run callbacks of :mod:`mma_lightning.callbacks` (signal stops, non-finite guards, progress bars) on
``lightning.pytorch``; their logic classes and :class:`NonFiniteError` are re-exported unchanged."""

from __future__ import annotations

import lightning.pytorch as L

from mma_lightning.callbacks import *
from mma_lightning.callbacks import __all__ as _default_all
from mma_lightning.callbacks.nonfinite import NonFiniteGuardLogic
from mma_lightning.callbacks.progress import RichProgressBarLogic, TQDMProgressBarLogic
from mma_lightning.callbacks.signals import StopOnSignalLogic

__all__ = list(_default_all)


class NonFiniteGuard(NonFiniteGuardLogic, L.Callback):
    """:class:`~mma_lightning.callbacks.nonfinite.NonFiniteGuardLogic` on ``lightning.pytorch``."""


class StopOnSignal(StopOnSignalLogic, L.Callback):
    """:class:`~mma_lightning.callbacks.signals.StopOnSignalLogic` on ``lightning.pytorch``."""


class RichProgressBar(RichProgressBarLogic, L.callbacks.RichProgressBar):
    """:class:`~mma_lightning.callbacks.progress.RichProgressBarLogic` on ``lightning.pytorch``."""


class TQDMProgressBar(TQDMProgressBarLogic, L.callbacks.TQDMProgressBar):
    """:class:`~mma_lightning.callbacks.progress.TQDMProgressBarLogic` on ``lightning.pytorch``."""
