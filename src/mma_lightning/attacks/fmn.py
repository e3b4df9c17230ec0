"""Fast minimum-norm steps: shrink a verified adversarial point's radius while PGD keeps it adversarial.

The ``"refined"`` margin search's last stage (after AN-PGD, the root-finder along its ray and one linearised
boundary step). It is the step of FMN (Pintor et al., "Fast Minimum-norm Adversarial Attacks through Adaptive
Norm Constraints", NeurIPS 2021), warm-started from the search's best point: each step is one forward and one
input-gradient backward of the margin ``h`` at ``x + delta``; the radius ``eps`` moves to the linearised
estimate of the boundary's distance along the steepest direction, ``||delta|| - h / ||grad h||_*`` (FMN's
first-boundary estimate, used at every step here), kept within a factor ``1 +- gamma`` of the current radius
and never above the best verified norm; then a steepest-ascent step of length ``alpha * eps`` and a projection
onto the ``eps`` ball and the box. ``gamma`` and ``alpha`` decay on a cosine, as FMN's. Each forward also tests
its point, so the smallest verified adversarial point seen is kept (FMN's best-point rule); a last no-grad
forward verifies the final candidate.

FMN runs about 100 such steps from ``x``; here a handful suffice because they start at a point already within a
few percent of the boundary (benchmarks/margin_search.py compares the searches on trained models).
Batched with per-sample masks, no host sync, input gradients from ``torch.autograd.grad`` only. Forwards and
backwards in float32 even under autocast, as the rest of the margin search (:mod:`.line_search`, "Precision").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mma_lightning.attacks.boundary import SmallestAdversarial
from mma_lightning.attacks.context import frozen_parameters, model_mode
from mma_lightning.attacks.gradients import input_gradient
from mma_lightning.attacks.line_search import AdvTest, LossFn, outside_autocast, search_input
from mma_lightning.attacks.norms import Norm
from mma_lightning.attacks.pgd import clip_box

RADIUS_CHANGE = 0.3
"""FMN's ``gamma`` at the first step: the radius moves by at most this fraction per step (cosine-decayed to 0)."""
STEP_FRACTION = 0.5
"""FMN's ``alpha`` at the first step: the PGD step length as a fraction of the radius (cosine-decayed to a tenth)."""


def fmn_steps(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    norm: Norm,
    start: Tensor,
    found: Tensor,
    active: Tensor,
    steps: int,
    margin_fn: LossFn,
    is_adv: AdvTest,
    clip_min: float | None,
    clip_max: float | None,
    gradient_scale: float = 1.0,
    full_precision: bool = True,
) -> tuple[Tensor, Tensor]:
    """``steps`` FMN steps from ``start`` (rows ``active`` count; the others are carried along unchanged).

    ``start`` is a verified adversarial point where ``found``; elsewhere it is the search's last point and the
    steps look for a first adversarial point (the radius then grows by up to ``1 + gamma`` per step).
    ``margin_fn`` is the success test's margin (adversarial where ``>= 0``); it is the objective of the steps.
    Returns ``(best, found)`` as :func:`~mma_lightning.attacks.boundary.refine_on_boundary`: per sample the
    point of smallest norm a forward pass verified adversarial, and whether there is one. Costs ``steps``
    forward/backward pairs and one verification forward, in eval mode; in float32 under autocast unless
    ``full_precision=False`` (the radius moves by the margin's value over its gradient's norm, and the
    verification decides what counts as adversarial: :func:`~.line_search.outside_autocast`).
    """
    delta = (start - x).detach()
    eps = norm.norm(delta)
    kept = SmallestAdversarial(x, start, found, eps)
    with model_mode(model, train=False), frozen_parameters(model), outside_autocast(x, full_precision):
        for k in range(steps + 1):  # the input gradient only (frozen parameters)
            if k == steps:
                with torch.no_grad():
                    logits = model(search_input(x + delta, full_precision))
            else:
                logits, h, grad = input_gradient(model, delta, lambda d: search_input(x + d, full_precision),
                                                 lambda z: margin_fn(z, y), gradient_scale)
            # Keep the point if verified adversarial and smaller than the best so far.
            delta_norm = norm.norm(delta)
            kept.offer(x + delta, delta_norm, active & is_adv(logits, y))
            if k == steps:
                break
            decay = 0.5 * (1 + math.cos(math.pi * k / steps))
            gamma, alpha = RADIUS_CHANGE * decay, STEP_FRACTION * (0.1 + 0.9 * decay)
            # Linearised distance to the boundary along the steepest direction (<g, d> is the dual norm of g).
            dual = (grad * norm.steepest_direction(grad)).flatten(1).sum(1)
            estimate = delta_norm - h / dual.clamp_min(1e-12)
            eps = torch.minimum(torch.maximum(estimate, (1 - gamma) * eps), (1 + gamma) * eps)
            eps = torch.where(kept.found, torch.minimum(eps, kept.size), eps)
            delta = delta + norm.step(grad, alpha * eps)
            delta = norm.project(clip_box(x + delta, clip_min, clip_max) - x, eps)
    return kept.point, kept.found
