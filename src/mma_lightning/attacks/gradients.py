"""The input gradient of an attack objective, with the model's parameters held constant.

Every attack step (PGD, the refined search's boundary and FMN steps) needs ``d objective / d input`` and
nothing else (docs/lightning-notes.md, item 1: never ``.backward()``, so parameter ``.grad`` is never touched). Two ways
compute it, with the same result:

- eager: ``torch.autograd.grad`` of the summed objective with respect to the point (the caller freezes the
  parameters with :func:`~mma_lightning.attacks.context.frozen_parameters`, so a compiled backbone's fused
  backward computes the input gradient alone);
- inside ``torch.compile`` (the captured training step, :mod:`mma_lightning.capture`) or a
  ``torch.func`` transform (``vmap``), where ``torch.autograd.grad`` and ``requires_grad_`` cannot be traced:
  ``torch.func.grad``, which differentiates with respect to its argument only; its result is detached, so
  the training loss never differentiates through the attack's steps (as with the eager gradient).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def traced() -> bool:
    """Whether this code runs under ``torch.compile`` or inside a ``torch.func`` transform."""
    return torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None


def input_gradient(
    model: nn.Module,
    point: Tensor,
    to_input: Callable[[Tensor], Tensor],
    objective: Callable[[Tensor], Tensor],
    scale: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(logits, values, grad)`` at ``point``: the model's logits at ``to_input(point)``, the per-sample
    ``objective(logits)`` (``[N]``) and the gradient of its sum with respect to ``point``, all detached.

    ``scale`` multiplies the objective before differentiating and divides the gradient after (float16
    autocast: :func:`~mma_lightning.attacks.pgd.fp16_gradient_scale`), so small gradients do not underflow.
    """
    point = point.detach()
    if traced():
        def summed(p: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            logits = model(to_input(p))
            values = objective(logits)
            return values.sum() * scale, (logits, values)

        grad, (logits, values) = torch.func.grad(summed, has_aux=True)(point)
    else:
        point.requires_grad_(True)
        logits = model(to_input(point))
        values = objective(logits)
        (grad,) = torch.autograd.grad(values.sum() * scale, point)
    if scale != 1.0:
        grad = grad / scale
    # detached: torch.func.grad's result would otherwise carry the parameters' outer graph (a second-order
    # path from the training loss through the attack's steps), which the eager gradient does not have.
    return logits.detach(), values.detach(), grad.detach()
