"""Boundary refinement: walk a verified adversarial point towards the nearest decision boundary point.

The ``"refined"`` margin search's last stage (after AN-PGD and the root-finder along its ray). Each step is
one forward and one input-gradient backward at the current candidate ``x + delta_k``: the margin there is
linearised, ``h(delta) ~ h_k + <g_k, delta - delta_k>``, and the next candidate is the smallest perturbation
(in the threat model's norm, inside the box) that reaches the linearised boundary ``h = 0``, a hair beyond it.
This is the projection step of DeepFool (Moosavi-Dezfooli et al., CVPR 2016) and FAB (Croce & Hein, ICML
2020) computed from the original point, as in FAB; like FMN (Pintor et al., NeurIPS 2021) the search keeps
the smallest perturbation that a forward pass verified adversarial. On a linear model one step lands on the
nearest boundary of the class that wins at the current point, so margins become exact.

Batched with per-sample masks, no host sync, input gradients from ``torch.autograd.grad`` only. Forwards and
backwards in float32 even under autocast, as the rest of the margin search (:mod:`.line_search`, "Precision").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mma_lightning.attacks.context import frozen_parameters, model_mode
from mma_lightning.attacks.gradients import input_gradient
from mma_lightning.attacks.line_search import AdvTest, LossFn, outside_autocast, search_input
from mma_lightning.attacks.norms import Norm, per_sample
from mma_lightning.attacks.pgd import clip_box

BOUNDARY_OVERSHOOT = 1e-3
"""Relative step beyond the linearised boundary, so that a candidate lands on the adversarial side."""
SHRINK = 0.98
"""Factor towards ``x`` for the best point when a linearised step cannot be trusted."""
NEWTON_STEPS = 3
"""Newton iterations that solve for the step length when the box clips part of the perturbation."""


def min_norm_to_hyperplane(
    norm: Norm,
    grad: Tensor,
    target: Tensor,
    lower: Tensor | None,
    upper: Tensor | None,
) -> Tensor:
    """The smallest ``delta`` (in ``norm``) with ``<grad, delta> = target`` inside the box ``lower <= delta <=
    upper`` (``None``: no box), for ``target > 0``.

    By the KKT conditions the minimiser is ``clip(s * d)`` with ``d`` the norm's steepest direction of
    ``grad``; ``s`` solves the concave, increasing ``a(s) = <grad, clip(s d)> = target`` by Newton's method from
    the unclipped solution, which approaches the root from below (FAB's projection, solved by Newton instead of
    a sort). Where the box makes ``target`` unreachable the perturbation stops at the box.
    """
    d = norm.steepest_direction(grad)
    gd = grad * d  # >= 0
    s = target / gd.flatten(1).sum(1).clamp_min(1e-20)
    if lower is None or upper is None:
        return d * per_sample(s, d)
    for _ in range(NEWTON_STEPS):
        delta = torch.maximum(torch.minimum(d * per_sample(s, d), upper), lower)
        reached = (grad * delta).flatten(1).sum(1)
        free = (delta == d * per_sample(s, d)).to(gd.dtype)
        slope = (gd * free).flatten(1).sum(1)
        s = s + torch.where(slope > 0, (target - reached).clamp_min(0) / slope.clamp_min(1e-20),
                            torch.zeros_like(s))
    return torch.maximum(torch.minimum(d * per_sample(s, d), upper), lower)


class SmallestAdversarial:
    """Per sample, the verified adversarial point of smallest perturbation norm seen so far: the best-point rule
    of FMN (Pintor et al., NeurIPS 2021) that the refined search's boundary and FMN steps share. ``point`` is
    the start until a smaller candidate is offered, ``size`` its norm (inf where none is known), ``found``
    whether there is one."""

    def __init__(self, x: Tensor, start: Tensor, found: Tensor, start_norm: Tensor) -> None:
        self.x = x
        self.point = start.clone()
        self.size = torch.where(found, start_norm, torch.full_like(start_norm, float("inf")))
        self.found = found.clone()

    def offer(self, cand: Tensor, cand_norm: Tensor, accept: Tensor) -> None:
        """Keep ``cand`` (of norm ``cand_norm``) where ``accept`` (a forward pass verified it adversarial, in an
        active row) and it is smaller than the point kept."""
        better = accept & (cand_norm < self.size)
        self.point = torch.where(per_sample(better, self.x), cand, self.point)
        self.size = torch.where(better, cand_norm, self.size)
        self.found = self.found | better


def refine_on_boundary(
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
    """``steps`` linearised boundary projections from ``start`` (rows ``active``; the other rows are carried
    along unchanged). ``start`` is a verified adversarial point where ``found``; elsewhere (the ray found
    none) it is the search's last point, and the steps are DeepFool's, looking for a first adversarial point.

    Returns ``(best, found)``: per sample the point of smallest perturbation norm that a forward pass
    verified adversarial (``start`` where ``found`` and no candidate beat it), and whether there is one.
    Costs ``steps`` forward/backward pairs and one verification forward, in eval mode; in float32 under
    autocast unless ``full_precision=False`` (the step's length comes from the margin's value and the
    verification decides what counts as adversarial: :func:`~.line_search.outside_autocast`).
    """
    lower = None if clip_min is None else clip_min - x
    upper = None if clip_max is None else clip_max - x
    kept = SmallestAdversarial(x, start, found, norm.norm(start - x))
    cand = start.detach()
    reach = torch.ones_like(kept.size)  # trust region: the fraction of the way to the projection taken
    with model_mode(model, train=False), frozen_parameters(model), outside_autocast(x, full_precision):
        for k in range(steps + 1):  # the input gradient only (frozen parameters)
            if k == steps:
                with torch.no_grad():
                    logits = model(search_input(cand, full_precision))
            else:
                logits, h, grad = input_gradient(model, cand, lambda c: search_input(c, full_precision),
                                                 lambda z: margin_fn(z, y), gradient_scale)
            # Keep the candidate if verified adversarial and smaller (the first is the start itself).
            adv = is_adv(logits, y)
            kept.offer(cand, norm.norm(cand - x), active & adv)
            if k == steps:
                break
            # Linearised boundary h_k + <g, delta - delta_k> = 0, aimed a hair beyond: <g, delta> = target.
            flat_g = grad.flatten(1)
            target = (flat_g * (cand - x).flatten(1)).sum(1) - h
            target = target + BOUNDARY_OVERSHOOT * target.abs()
            step = min_norm_to_hyperplane(norm, grad, target.clamp_min(0), lower, upper)
            # Where the linearisation cannot be trusted (x already on its far side, or no gradient), shrink the
            # best point towards x instead, as FMN's radius decrease does.
            valid = (target > 0) & (flat_g.abs().sum(1) > 0)
            shrunk = torch.where(per_sample(kept.found, x), x + SHRINK * (kept.point - x), cand)
            # Trust region: from the best point, the fraction ``reach`` of the way to the projection; doubled
            # after a verified candidate, halved after a failed one (where the margin curves away from its
            # linearisation). Before any adversarial point is known: the projection itself (DeepFool).
            reach = torch.where(adv, (2 * reach).clamp(max=1.0), reach / 2)
            towards = torch.where(per_sample(kept.found, x),
                                  kept.point + per_sample(reach, x) * (x + step - kept.point), x + step)
            nxt = clip_box(torch.where(per_sample(valid, x), towards, shrunk), clip_min, clip_max)
            cand = torch.where(per_sample(active, x), nxt, cand)
    return kept.point, kept.found
