"""Training methods as LightningModules sharing one skeleton (:class:`AdversarialModule`)."""

from mma_lightning.methods.base import AdversarialModule
from mma_lightning.methods.eps_store import EpsStore
from mma_lightning.methods.mma import MMAModule
from mma_lightning.methods.pgd_at import PGDATModule
from mma_lightning.methods.pgdls import PGDLSModule
from mma_lightning.methods.standard import StandardModule
from mma_lightning.methods.trades import TRADESModule

__all__ = ["AdversarialModule", "EpsStore", "MMAModule", "PGDATModule"]
__all__ += ["PGDLSModule", "StandardModule", "TRADESModule"]
