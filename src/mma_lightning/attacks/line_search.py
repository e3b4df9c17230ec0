"""Searches along one ray ``x + t * u`` (box-clipped) for the smallest adversarial ``t``: the second stage of
the MMA margin search (Ding et al., ICLR 2020, Alg. 1 / reference ``mma_training``).

- :func:`bisect_ray`: the reference's bisection, ``steps`` forwards (its state ``lo = 0``, ``hi = upper``,
  ``cur = init``; ``hi = cur`` on success, ``lo = cur`` otherwise, ``cur = (lo + hi) / 2``).
- :func:`root_find_ray`: a safeguarded root-finder on the (nearly linear) margin ``h(t)`` along the ray:
  regula falsi inside a verified bracket, secant extrapolation before one is found, a bisection fallback; each
  trial aims a hair past the estimated root so that it lands verified adversarial. A few forwards reach what
  the bisection reaches in ten.

Both are batched over samples with per-sample tensors and masks; no host sync, no autograd graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mma_lightning.attacks.context import model_mode
from mma_lightning.attacks.norms import per_sample
from mma_lightning.attacks.pgd import clip_box

LossFn = Callable[[Tensor, Tensor], Tensor]
AdvTest = Callable[[Tensor, Tensor], Tensor]

ROOT_BIAS = 0.02
"""Fraction of the way from the regula-falsi root estimate to ``hi`` at which :func:`root_find_ray` tests."""
EXTRAPOLATION_OVERSHOOT = 0.25
"""Relative overshoot of the secant extrapolation before any adversarial point is known."""


def point_on_ray(x: Tensor, direction: Tensor, t: Tensor, clip_min: float | None,
                 clip_max: float | None) -> Tensor:
    """``x + t * direction``, clipped to the box (``None``: no box)."""
    return clip_box(x + per_sample(t, x) * direction, clip_min, clip_max)


def bisect_ray(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    direction: Tensor,
    init: Tensor,
    upper: Tensor,
    steps: int,
    is_adv: AdvTest,
    clip_min: float | None,
    clip_max: float | None,
    train_mode: bool = False,
    subset: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The reference's bisection over ``[0, upper]`` starting at ``init``: ``steps`` forwards.

    Returns ``(hi, found, x_best)``: the upper end of the final bracket (verified adversarial where ``found``),
    whether any tested point was adversarial, and the last adversarial point tested (``x`` elsewhere).
    ``train_mode`` runs the forwards in train mode (the reference's quirk); with a ``subset`` mask only those
    rows are forwarded (the reference's train-mode search sees only the correct rows, so BatchNorm's batch
    statistics are theirs). That selection syncs with the host: it is the opt-in reproduction mode.
    """
    lo, hi, cur = torch.zeros_like(init), upper.clone(), init.clone()
    found = torch.zeros_like(init, dtype=torch.bool)
    x_best = x.clone()
    with torch.no_grad(), model_mode(model, train=train_mode):
        for _ in range(steps):
            x_cur = point_on_ray(x, direction, cur, clip_min, clip_max)
            adv = is_adv(model(x_cur), y) if subset is None else _subset_is_adv(model, x_cur, y, subset, is_adv)
            hi = torch.where(adv, torch.minimum(hi, cur), hi)
            lo = torch.where(adv, lo, torch.maximum(lo, cur))
            x_best = torch.where(per_sample(adv, x), x_cur, x_best)
            found = found | adv
            cur = (lo + hi) / 2
    return hi, found, x_best


def _subset_is_adv(model: nn.Module, x: Tensor, y: Tensor, subset: Tensor, is_adv: AdvTest) -> Tensor:
    """``is_adv`` of the ``subset`` rows from a forward of those rows only (False elsewhere)."""
    idx = subset.nonzero().squeeze(1)
    adv = torch.zeros_like(subset)
    if idx.numel():
        adv[idx] = is_adv(model(x[idx]), y[idx])
    return adv


def root_find_ray(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    direction: Tensor,
    init: Tensor,
    upper: Tensor,
    steps: int,
    margin_fn: LossFn,
    is_adv: AdvTest,
    clean_margin: Tensor,
    clip_min: float | None,
    clip_max: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Safeguarded root-finder for the margin ``h(t) = margin_fn(model(x + t u), y)`` on ``[0, upper]``.

    ``h(0)`` is ``clean_margin`` (known, no forward); the first trial is ``t = init`` (the PGD point).
    While no adversarial point is known: secant extrapolation through the two largest non-adversarial trials,
    ``EXTRAPOLATION_OVERSHOOT`` past its root (``upper`` when the margin does not grow, and for the last trial
    when still nothing is known, so that a ray the bisection would succeed on is not lost). Once a bracket
    ``lo`` (not adversarial) < ``hi`` (verified adversarial) exists: regula falsi, moved the fraction
    ``ROOT_BIAS`` of the way from its root estimate towards ``hi``, so that on a nearly linear margin every trial
    lands just past the root and ``hi`` closes in from above geometrically; the Illinois rule (halve ``h(hi)``
    when ``lo`` moved twice running) against stagnation; the bracket's midpoint when a trial falls outside it.
    Returns ``(hi, found, x_best)`` as :func:`bisect_ray`.
    """
    zero = torch.zeros_like(init)
    lo, g_lo = zero, clean_margin.to(init.dtype)
    prev_t, prev_g = zero, g_lo  # the non-adversarial trial before lo, for the extrapolation
    hi, g_hi = upper.clone(), torch.ones_like(init)
    found = torch.zeros_like(init, dtype=torch.bool)
    lo_moved_last = torch.zeros_like(found)
    x_best = x.clone()
    cur = init.clone()
    with torch.no_grad(), model_mode(model, train=False):
        for k in range(steps):
            x_cur = point_on_ray(x, direction, cur, clip_min, clip_max)
            logits = model(x_cur)
            adv = is_adv(logits, y)
            g = margin_fn(logits, y).to(init.dtype)
            moves_hi = adv & ((cur < hi) | ~found)  # hi = upper is not verified until a trial there succeeds
            moves_lo = ~adv & (cur > lo)
            g_hi = torch.where(moves_lo & lo_moved_last, g_hi / 2, g_hi)  # Illinois
            hi, g_hi = torch.where(moves_hi, cur, hi), torch.where(moves_hi, g.clamp_min(0), g_hi)
            x_best = torch.where(per_sample(moves_hi, x), x_cur, x_best)
            prev_t, prev_g = torch.where(moves_lo, lo, prev_t), torch.where(moves_lo, g_lo, prev_g)
            lo, g_lo = torch.where(moves_lo, cur, lo), torch.where(moves_lo, g, g_lo)
            lo_moved_last = moves_lo
            found = found | moves_hi

            mid = (lo + hi) / 2
            # Inside a bracket: regula falsi, biased towards hi.
            t_rf = lo + (hi - lo) * (-g_lo).clamp_min(0) / (g_hi - g_lo).clamp_min(1e-12)
            t_rf = t_rf + ROOT_BIAS * (hi - t_rf)
            t_rf = torch.where((t_rf > lo) & (t_rf < hi), t_rf, mid)
            # Before a bracket: secant extrapolation through the last two non-adversarial trials, or upper.
            slope = (g_lo - prev_g) / (lo - prev_t).clamp_min(1e-12)
            t_ex = lo + (-g_lo).clamp_min(0) / slope.clamp_min(1e-12) * (1 + EXTRAPOLATION_OVERSHOOT)
            t_ex = torch.where((slope > 0) & (t_ex < upper), t_ex, upper)
            t_ex = torch.where(t_ex > lo, t_ex, mid)
            if k == steps - 2:  # the last trial: the far end, where no bracket is known yet
                t_ex = upper
            cur = torch.where(found, t_rf, t_ex)
    return hi, found, x_best
