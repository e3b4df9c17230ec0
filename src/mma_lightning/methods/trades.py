"""TRADES (Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy", ICML 2019).

Loss ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))`` (KL summed over classes, averaged over the batch), where
``x_adv`` maximises the KL to the clean prediction inside the eps ball. The inner maximisation is this
package's :func:`~mma_lightning.attacks.pgd` with a callable objective (per-sample KL to the clean
probabilities; the labels are unused), not a second PGD loop.

Choices, compared with the authors' code (github.com/yaodongyu/TRADES, ``trades.py``):
- generation runs in eval mode, as theirs (``model.eval()`` around the attack); the clean probabilities the
  attack moves away from are an eval-mode forward too, as theirs, and the loss's forwards run in train mode;
- the random start is ``pgd``'s uniform start inside the ball, not their ``0.001 * randn``: a random start is
  needed because the KL's gradient vanishes at ``x_adv = x``, and ``pgd`` has no other start;
- steps are ``pgd``'s (Linf sign steps; L2 normalised-gradient steps then a radial shrink) of size
  ``step_scale * eps / nb_iter``; their CIFAR10 setting, eps 0.031 with 10 steps of 0.007, is
  ``step_scale`` = 2.26; the KL term's gradient flows through both the clean and the adversarial forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import Unpack

from mma_lightning.attacks import get_norm, pgd
from mma_lightning.attacks.context import model_mode
from mma_lightning.methods.base import AdversarialModule, AdversarialModuleLogic, SkeletonKwargs
from mma_lightning.methods.pgd_at import check_attack_params


def kl_objective(clean_log_probs: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-sample ``KL(p_clean || softmax(logits))`` as a ``pgd`` objective ``(logits, y) -> [N]``."""

    def objective(logits: Tensor, y: Tensor) -> Tensor:
        return per_sample_kl(clean_log_probs, logits)

    return objective


def per_sample_kl(clean_log_probs: Tensor, logits: Tensor) -> Tensor:
    """``KL(p || q)`` per sample, ``p = exp(clean_log_probs)``, ``q = softmax(logits)``, in fp32."""
    return F.kl_div(F.log_softmax(logits.float(), dim=1), clean_log_probs, reduction="none",
                    log_target=True).sum(dim=1)


class TRADESModuleLogic(AdversarialModuleLogic):
    """TRADES (Zhang et al., ICML 2019): ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))`` around any backbone.

    Example:
        >>> import torch
        >>> from mma_lightning import TRADESModule
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
        >>> TRADESModule(net, norm="linf", eps=0.3, nb_iter=40).hparams.beta
        6.0

    Args:
        net: the backbone, inputs in ``[clip_min, clip_max]`` (normalisation inside it), outputs logits.
        norm: ``"linf"`` or ``"l2"``.
        eps: radius of the KL maximisation (Zhang et al.: 0.3 MNIST Linf, 0.031 CIFAR10 Linf).
        nb_iter: PGD steps K of the KL maximisation; step size ``step_scale * eps / nb_iter``.
        step_scale: see ``nb_iter``.
        beta: weight of the KL term, ``1 / lambda`` in the paper (6.0: their CIFAR10 setting; 0: plain CE).
        **kwargs: the shared settings (optimizer, scheduler, eval_*, box) of ``AdversarialModule``.
    """

    train_stat_names: tuple[str, ...] = ("acc", "adv_acc", "clean_loss", "kl")

    def __init__(
        self,
        net: nn.Module,
        norm: str = "linf",
        eps: float = 0.3,
        nb_iter: int = 40,
        step_scale: float = 2.5,
        beta: float = 6.0,
        **kwargs: Unpack[SkeletonKwargs],
    ) -> None:
        check_attack_params(eps, nb_iter, step_scale)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
            raise ValueError(f"beta must be a float >= 0 (6.0: TRADES' CIFAR10 setting), got {beta!r}")
        super().__init__(net, norm=norm, **kwargs)

    def step_inputs(self, x: Tensor, y: Tensor, index: Tensor | None) -> dict[str, Any]:
        """Before the step (eagerly): the KL maximisation's random start from the module's generator."""
        boxed = self.hparams.clip_min is not None
        return {"start_noise": get_norm(self.norm).start_noise(x, self.attack_generator, boxed=boxed)}

    def step_loss(self, net: nn.Module, hp: Any, x: Tensor, y: Tensor,
                  inputs: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """``mean CE(f(x), y) + beta * mean KL(f(x) || f(x_adv))``, ``x_adv`` from the KL maximisation."""
        with torch.no_grad(), model_mode(net, train=False):
            target = F.log_softmax(net(x).float(), dim=1)
        x_adv = pgd(net, x, y, self.norm, eps=hp.eps, nb_iter=hp.nb_iter, step_scale=hp.step_scale,
                    loss=kl_objective(target), rand_init=True, clip_min=hp.clip_min, clip_max=hp.clip_max,
                    start_noise=inputs["start_noise"])
        logits = net(x)
        adv_logits = net(x_adv)
        clean_ce = F.cross_entropy(logits.float(), y, reduction="none")
        kl = per_sample_kl(F.log_softmax(logits.float(), dim=1), adv_logits)
        return clean_ce.mean() + hp.beta * kl.mean(), {
            "acc": (logits.detach().argmax(1) == y).float(),
            "adv_acc": (adv_logits.detach().argmax(1) == y).float(),
            "clean_loss": clean_ce.detach(),
            "kl": kl.detach(),
        }


# The pytorch_lightning classes: the namespace-free logic above on pytorch_lightning's base classes
# (mma_lightning.lightning builds the lightning.pytorch ones from the same logic classes).
class TRADESModule(TRADESModuleLogic, AdversarialModule):
    """:class:`TRADESModuleLogic` on pytorch_lightning (the default namespace)."""
