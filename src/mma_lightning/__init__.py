"""mma-lightning: MMA training (Ding et al., ICLR 2020, arXiv 1812.02637) for PyTorch Lightning.

The algorithm lives in :mod:`mma_lightning.attacks` (plain PyTorch); :class:`MMAModule` composes it into a
``pytorch_lightning.LightningModule``.
"""

__version__ = "0.1.0"

from mma_lightning.attacks import MarginResult, find_margin, pgd
from mma_lightning.methods import (
    AdversarialModule,
    EpsStore,
    MMAModule,
    PGDATModule,
    PGDLSModule,
    StandardModule,
    TRADESModule,
)

__all__ = ["AdversarialModule", "EpsStore", "MMAModule", "MarginResult", "PGDATModule", "find_margin", "pgd"]
__all__ += ["PGDLSModule", "StandardModule", "TRADESModule"]
