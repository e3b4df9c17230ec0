"""PGD adversarial training (Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
ICLR 2018): train on K-step PGD points at one fixed eps, random start, cross-entropy objective.

"PGD-eps" in the MMA paper's comparisons (Ding et al., ICLR 2020). The attack runs in eval mode (no BatchNorm
statistics of adversarial points, no dropout; :func:`~mma_lightning.attacks.pgd`'s default); the training
forward on the PGD points runs in the mode Lightning set (train mode).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import Unpack

from mma_lightning.attacks import get_norm, pgd
from mma_lightning.attacks.checks import check_positive_int
from mma_lightning.methods.base import AdversarialModule, AdversarialModuleLogic, SkeletonKwargs


class PGDATModuleLogic(AdversarialModuleLogic):
    """Madry PGD-AT ("PGD-eps" in the MMA paper) around any backbone: mean CE at the PGD points.

    Example:
        >>> import torch
        >>> from mma_lightning import PGDATModule
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
        >>> PGDATModule(net, norm="linf", eps=0.3, nb_iter=40).training_eps()
        0.3

    Args:
        net: the backbone, inputs in ``[clip_min, clip_max]`` (normalisation inside it), outputs logits.
        norm: ``"linf"`` or ``"l2"``.
        eps: the training radius (Madry et al.: 0.3 MNIST Linf, 8/255 CIFAR10 Linf).
        nb_iter: PGD steps K; step size ``step_scale * eps / nb_iter`` (2.5, as for MMA's AN-PGD).
        step_scale: see ``nb_iter``.
        rand_init: random start uniformly inside the ball (Madry et al.).
        **kwargs: the shared settings (optimizer, scheduler, eval_*, box) of ``AdversarialModule``.
    """

    train_stat_names: tuple[str, ...] = ("adv_acc",)

    def __init__(
        self,
        net: nn.Module,
        norm: str = "linf",
        eps: float = 0.3,
        nb_iter: int = 40,
        step_scale: float = 2.5,
        rand_init: bool = True,
        **kwargs: Unpack[SkeletonKwargs],
    ) -> None:
        check_attack_params(eps, nb_iter, step_scale)
        super().__init__(net, norm=norm, **kwargs)

    def training_eps(self) -> float:
        """The radius of this step's attack (constant here; a linear ramp in :class:`PGDLSModule`)."""
        return float(self.hparams.eps)

    def step_inputs(self, x: Tensor, y: Tensor, index: Tensor | None) -> dict[str, Any]:
        """Before the step (eagerly): this step's radius :meth:`training_eps` as a device tensor (a graph input,
        so PGDLS's ramp compiles once) and PGD's random start from the module's generator."""
        hp = self.hparams
        # A device tensor filled in place: a Python float copied to the device would be a host sync.
        eps = torch.full((), self.training_eps(), device=x.device, dtype=x.dtype)
        noise = (get_norm(self.norm).start_noise(x, self.attack_generator, boxed=hp.clip_min is not None)
                 if hp.rand_init else None)
        return {"eps": eps, "start_noise": noise}

    def step_loss(self, net: nn.Module, hp: Any, x: Tensor, y: Tensor,
                  inputs: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean cross-entropy at the PGD points of radius ``inputs["eps"]``."""
        x_adv = pgd(net, x, y, self.norm, eps=inputs["eps"], nb_iter=hp.nb_iter, step_scale=hp.step_scale,
                    rand_init=hp.rand_init, clip_min=hp.clip_min, clip_max=hp.clip_max,
                    start_noise=inputs["start_noise"])
        logits = net(x_adv)
        return F.cross_entropy(logits.float(), y), {"adv_acc": (logits.detach().argmax(1) == y).float(),
                                                    "eps": inputs["eps"]}

    def record_step(self, index: Tensor | None, outputs: dict[str, Tensor]) -> None:
        """Log ``train/eps`` (this step's radius) and the statistics."""
        if self._trainer is not None:  # also usable outside a Trainer (as log_train_stat)
            self.log("train/eps", outputs["eps"], on_step=True, on_epoch=False)
        super().record_step(index, outputs)


def check_attack_params(eps: float, nb_iter: int, step_scale: float) -> None:
    """``ValueError`` naming the parameter unless ``eps >= 0``, ``nb_iter >= 1`` and ``step_scale > 0``."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    check_positive_int("nb_iter", nb_iter)
    if isinstance(step_scale, bool) or not isinstance(step_scale, (int, float)) or not step_scale > 0:
        raise ValueError(f"step_scale must be a float > 0, got {step_scale!r}")


# The pytorch_lightning classes: the namespace-free logic above on pytorch_lightning's base classes
# (mma_lightning.lightning builds the lightning.pytorch ones from the same logic classes).
class PGDATModule(PGDATModuleLogic, AdversarialModule):
    """:class:`PGDATModuleLogic` on pytorch_lightning (the default namespace)."""
