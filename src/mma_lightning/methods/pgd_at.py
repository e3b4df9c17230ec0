"""PGD adversarial training (Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
ICLR 2018): train on K-step PGD points at one fixed eps, random start, cross-entropy objective."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from mma_lightning.attacks import pgd
from mma_lightning.methods.base import AdversarialModule


class PGDATModule(AdversarialModule):
    """Madry PGD-AT ("PGD-eps" in the MMA paper) around any backbone.

    Args:
        net: the backbone.
        norm: ``"linf"`` or ``"l2"``.
        eps: the training radius.
        nb_iter: PGD steps K; step size ``step_scale * eps / nb_iter`` (2.5, as for MMA's AN-PGD).
        rand_init: random start inside the ball.
        **kwargs: optimiser and evaluation settings of :class:`AdversarialModule`.
    """

    train_stat_names = ("adv_acc",)

    def __init__(self, net: nn.Module, norm: str = "linf", eps: float = 0.3, nb_iter: int = 40,
                 step_scale: float = 2.5, rand_init: bool = True, **kwargs: Any) -> None:
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        super().__init__(net, norm=norm, **kwargs)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)

    def training_eps(self) -> float:
        """The radius of this step's attack (constant here; a ramp in PGDLS)."""
        return self.hparams.eps

    def training_loss(self, x: Tensor, y: Tensor, index: Tensor | None) -> Tensor:
        """Mean cross-entropy at the PGD points."""
        hp = self.hparams
        x_adv = pgd(self.net, x, y, self.norm, eps=self.training_eps(), nb_iter=hp.nb_iter,
                    step_scale=hp.step_scale, rand_init=hp.rand_init, clip_min=hp.clip_min, clip_max=hp.clip_max)
        logits = self.net(x_adv)
        self.log_train_stat("adv_acc", (logits.detach().argmax(1) == y).float())
        return F.cross_entropy(logits.float(), y)
