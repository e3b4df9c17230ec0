"""The training methods (:mod:`mma_lightning.methods`) as ``lightning.pytorch`` LightningModules.

Each class is its namespace-free logic class on this namespace's :class:`AdversarialModule`, mirroring the
default classes' hierarchy (``PGDLSModule`` is a ``PGDATModule``, every method an ``AdversarialModule``).
"""

from __future__ import annotations

import lightning.pytorch as L

from mma_lightning.methods import EpsStore  # noqa: F401  (namespace-free, re-exported unchanged)
from mma_lightning.methods import __all__ as _default_all
from mma_lightning.methods.base import AdversarialModuleLogic
from mma_lightning.methods.mma import MMAModuleLogic
from mma_lightning.methods.pgd_at import PGDATModuleLogic
from mma_lightning.methods.pgdls import PGDLSModuleLogic
from mma_lightning.methods.standard import StandardModuleLogic
from mma_lightning.methods.trades import TRADESModuleLogic

__all__ = list(_default_all)


class AdversarialModule(AdversarialModuleLogic, L.LightningModule):
    """:class:`~mma_lightning.methods.base.AdversarialModuleLogic` on ``lightning.pytorch``."""


class MMAModule(MMAModuleLogic, AdversarialModule):
    """MMA (Ding et al., ICLR 2020): :class:`~mma_lightning.methods.mma.MMAModuleLogic` on lightning."""


class PGDATModule(PGDATModuleLogic, AdversarialModule):
    """:class:`~mma_lightning.methods.pgd_at.PGDATModuleLogic` (PGD-AT) on ``lightning.pytorch``."""


class PGDLSModule(PGDLSModuleLogic, PGDATModule):
    """:class:`~mma_lightning.methods.pgdls.PGDLSModuleLogic` (PGDLS) on ``lightning.pytorch``."""


class StandardModule(StandardModuleLogic, AdversarialModule):
    """Clean training: :class:`~mma_lightning.methods.standard.StandardModuleLogic` on lightning."""


class TRADESModule(TRADESModuleLogic, AdversarialModule):
    """:class:`~mma_lightning.methods.trades.TRADESModuleLogic` (TRADES) on ``lightning.pytorch``."""

