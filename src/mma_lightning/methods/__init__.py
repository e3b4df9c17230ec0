"""Training methods as LightningModules sharing one skeleton (:class:`AdversarialModule`)."""

from mma_lightning.methods.base import AdversarialModule
from mma_lightning.methods.eps_store import EpsStore
from mma_lightning.methods.mma import MMAModule
from mma_lightning.methods.pgd_at import PGDATModule

__all__ = ["AdversarialModule", "EpsStore", "MMAModule", "PGDATModule"]
