"""Attacks in plain PyTorch: PGD with per-sample radii and the MMA margin search (no Lightning, no Hydra)."""

from mma_lightning.attacks.losses import (
    cross_entropy,
    cw_loss,
    get_loss,
    is_misclassified,
    is_soft_adversarial,
    logit_margin,
    soft_logit_margin,
)
from mma_lightning.attacks.margin import MarginResult, find_margin
from mma_lightning.attacks.norms import L2Norm, LinfNorm, Norm, get_norm
from mma_lightning.attacks.pgd import pgd

__all__ = [
    "L2Norm",
    "LinfNorm",
    "MarginResult",
    "Norm",
    "cross_entropy",
    "cw_loss",
    "find_margin",
    "get_loss",
    "get_norm",
    "is_misclassified",
    "is_soft_adversarial",
    "logit_margin",
    "pgd",
    "soft_logit_margin",
]
