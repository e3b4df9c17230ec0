"""Standard training ("STD" in the comparisons of Ding et al., "MMA Training: Direct Input Space Margin
Maximization through Adversarial Training", ICLR 2020): clean cross-entropy, no attack during training.

Validation still measures robustness (PGD accuracy and average margin) through the shared skeleton.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from mma_lightning.methods.base import AdversarialModule, AdversarialModuleLogic


class StandardModuleLogic(AdversarialModuleLogic):
    """Standard (non-adversarial) training, the STD baseline of Ding et al. 2020: mean clean cross-entropy.

    Its constructor is :class:`AdversarialModule`'s (``net``, ``norm`` of the validation attack, optimiser,
    scheduler, ``eval_*``, box); it logs the clean training accuracy as ``train/acc``.

    Example:
        >>> import torch
        >>> from mma_lightning import StandardModule
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> loss = StandardModule(net).training_loss(torch.rand(2, 4), torch.tensor([0, 2]), None)
        >>> loss.shape
        torch.Size([])
    """

    train_stat_names: tuple[str, ...] = ("acc",)

    def step_loss(self, net: nn.Module, hp: Any, x: Tensor, y: Tensor,
                  inputs: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean cross-entropy of the clean batch."""
        logits = net(x)
        return F.cross_entropy(logits.float(), y), {"acc": (logits.detach().argmax(1) == y).float()}


# The pytorch_lightning classes: the namespace-free logic above on pytorch_lightning's base classes
# (mma_lightning.lightning builds the lightning.pytorch ones from the same logic classes).
class StandardModule(StandardModuleLogic, AdversarialModule):
    """:class:`StandardModuleLogic` on pytorch_lightning (the default namespace)."""
