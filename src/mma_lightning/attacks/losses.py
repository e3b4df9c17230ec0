"""Per-sample losses and margins on logits (all return shape ``[N]``, larger = closer to misclassified).

- cross-entropy: the usual PGD objective (Madry et al. 2018).
- soft logit margin, SLM(z, y) = logsumexp_{j != y} z_j - z_y: the MMA reference's AN-PGD objective and its
  training-time success test (SLM >= 0), Ding et al. 2020, Sec. 3 / reference ``mma_training``.
- logit margin, LM(z, y) = max_{j != y} z_j - z_y: the plain margin; LM > 0 iff argmax != y (up to ties).
- CW margin loss (Carlini & Wagner 2017): LM clamped at ``-kappa``, used by the evaluation protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

LossName = Literal["ce", "slm", "lm", "cw"]


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy."""
    return F.cross_entropy(logits.float(), y, reduction="none")


def _other_logits(logits: Tensor, y: Tensor) -> Tensor:
    """Logits with the true class masked to -inf (fp32, so margins are compared in full precision)."""
    z = logits.float()
    return z.scatter(1, y.unsqueeze(1), float("-inf"))


def soft_logit_margin(logits: Tensor, y: Tensor) -> Tensor:
    """SLM(z, y) = logsumexp_{j != y} z_j - z_y (MMA reference)."""
    z_y = logits.float().gather(1, y.unsqueeze(1)).squeeze(1)
    return torch.logsumexp(_other_logits(logits, y), dim=1) - z_y


def logit_margin(logits: Tensor, y: Tensor) -> Tensor:
    """LM(z, y) = max_{j != y} z_j - z_y; positive iff the point is misclassified."""
    z_y = logits.float().gather(1, y.unsqueeze(1)).squeeze(1)
    return _other_logits(logits, y).amax(dim=1) - z_y


def cw_loss(logits: Tensor, y: Tensor, kappa: float = float("inf")) -> Tensor:
    """Carlini-Wagner margin loss, ``min(LM, kappa)`` (untargeted, to be maximised)."""
    return logit_margin(logits, y).clamp(max=kappa)


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "ce": cross_entropy,
    "slm": soft_logit_margin,
    "lm": logit_margin,
    "cw": cw_loss,
}


def get_loss(loss: str | Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """Return the per-sample loss named ``"ce"``, ``"slm"``, ``"lm"`` or ``"cw"`` (a callable passes through)."""
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)} or a callable, got {loss!r}")
    return LOSSES[loss]


def is_misclassified(logits: Tensor, y: Tensor) -> Tensor:
    """The default success test: ``argmax(z) != y``."""
    return logits.argmax(dim=1) != y


def is_soft_adversarial(logits: Tensor, y: Tensor) -> Tensor:
    """The MMA reference's training-time success test: ``SLM(z, y) >= 0`` (slightly inside the boundary)."""
    return soft_logit_margin(logits, y) >= 0


SUCCESS_TESTS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "argmax": is_misclassified,
    "slm": is_soft_adversarial,
}

SUCCESS_MARGINS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "argmax": logit_margin,
    "slm": soft_logit_margin,
}
"""The continuous margin behind each success test (success iff it is >= 0, up to ties for ``"argmax"``)."""
