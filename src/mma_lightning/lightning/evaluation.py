"""The evaluation of :mod:`mma_lightning.evaluation` with its training callback on ``lightning.pytorch``.

Everything but the callbacks (:class:`RobustnessCallback`, :class:`MarginPlots`) is plain PyTorch and
re-exported unchanged.
"""

from __future__ import annotations

import lightning.pytorch as L

from mma_lightning.evaluation import *
from mma_lightning.evaluation import __all__ as _default_all
from mma_lightning.evaluation.callbacks import RobustnessCallbackLogic
from mma_lightning.evaluation.margin_plots import MarginPlotsLogic

__all__ = list(_default_all)


class RobustnessCallback(RobustnessCallbackLogic, L.Callback):
    """:class:`~mma_lightning.evaluation.callbacks.RobustnessCallbackLogic` on ``lightning.pytorch``."""


class MarginPlots(MarginPlotsLogic, L.Callback):
    """:class:`~mma_lightning.evaluation.margin_plots.MarginPlotsLogic` on ``lightning.pytorch``."""
