"""Searches along one ray ``x + t * u`` (box-clipped) for the smallest adversarial ``t``: the second stage of
the MMA margin search (Ding et al., ICLR 2020, Alg. 1 / reference ``mma_training``).

- :func:`bisect_ray`: the reference's bisection, ``steps`` forwards (its state ``lo = 0``, ``hi = upper``,
  ``cur = init``; ``hi = cur`` on success, ``lo = cur`` otherwise, ``cur = (lo + hi) / 2``).
- :func:`root_find_ray`: a safeguarded root-finder on the (nearly linear) margin ``h(t)`` along the ray:
  regula falsi inside a verified bracket, secant extrapolation before one is found, a bisection fallback; each
  trial aims a hair past the estimated root so that it lands verified adversarial. A few forwards reach what
  the bisection reaches in ten.

Both are batched over samples with per-sample tensors and masks; no host sync, no autograd graph.

Precision (a default of ours; the reference, Ding et al. ICLR 2020, runs in float32 and has no autocast). Both
run their forwards in float32 even under autocast (:func:`outside_autocast`), unless ``full_precision=False``.
Under ``bf16-mixed`` the model's input is rounded to bfloat16 (8 significant bits: steps of 0.004 for pixels in
[0.5, 1)) and so are its activations and logits, so the margin along the ray is a noisy function of ``t`` and
a bisection in bfloat16 lands further from float32's crossing than its final bracket claims
(``benchmarks/bf16_margins.py``: LeNet5-Madry trained on Fashion-MNIST, the same float32 PGD ray, MMA's
search: eps differs by 0.37 % median, 1.6 % p90, 9 % max, a third of the points by more than the bracket; in
float32 under autocast it is float32's, bit for bit). PGD's own steps, where only the gradient's direction
counts, stay in the autocast precision: they are most of the search's cost (K forward/backward pairs against
S forwards), and the change of direction they bring is no larger than that of another random start.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

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


def outside_autocast(x: Tensor, enabled: bool = True) -> AbstractContextManager[object]:
    """A context in which ``x``'s device runs without autocast (float32 forwards), if autocast is on there and
    ``enabled``; else a no-op context.

    The margin search's forwards run in it (:func:`bisect_ray`, :func:`root_find_ray`, the refined search's
    :mod:`.boundary` and :mod:`.fmn` steps): the eps they return is a threshold on the model's margin, which
    bfloat16 rounding of the input and of the activations blurs (module docstring; ``docs/lightning-notes.md`` 6:
    keep margin comparisons in float32). The parameters stay as they are (Lightning's ``*-mixed`` precisions
    keep them in float32); only the autocast casts are switched off. Capturable: ``torch.compile(fullgraph=True)``
    traces the autocast state as a constant of the graph and the context as a region of it.
    """
    device = x.device.type
    if enabled and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def search_input(x: Tensor, full_precision: bool = True) -> Tensor:
    """The input of a forward inside :func:`outside_autocast`: ``x`` in float32 if ``full_precision`` and it is a
    half-precision float (float16, bfloat16), where nothing casts it to the parameters' float32 any more;
    else ``x`` as it is."""
    return x.float() if full_precision and x.dtype in (torch.float16, torch.bfloat16) else x


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
    full_precision: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """The reference's bisection over ``[0, upper]`` starting at ``init``: ``steps`` forwards.

    Returns ``(hi, found, x_best)``: the upper end of the final bracket (verified adversarial where ``found``),
    whether any tested point was adversarial, and the last adversarial point tested (``x`` elsewhere).
    ``train_mode`` runs the forwards in train mode (the reference's quirk); with a ``subset`` mask only those
    rows are forwarded (the reference's train-mode search sees only the correct rows, so BatchNorm's batch
    statistics are theirs). That selection syncs with the host: it is the opt-in reproduction mode.

    ``full_precision`` (default): the forwards run in float32 under autocast (:func:`outside_autocast`); the
    final bracket ``init / 2**(steps - 1)`` or ``(upper - init) / 2**(steps - 1)`` wide is then what it says,
    which under bfloat16 it is not (module docstring). ``False``: in the autocast precision, as before.
    """
    lo, hi, cur = torch.zeros_like(init), upper.clone(), init.clone()
    found = torch.zeros_like(init, dtype=torch.bool)
    x_best = x.clone()
    with torch.no_grad(), model_mode(model, train=train_mode), outside_autocast(x, full_precision):
        for _ in range(steps):
            x_cur = point_on_ray(x, direction, cur, clip_min, clip_max)
            x_in = search_input(x_cur, full_precision)
            adv = is_adv(model(x_in), y) if subset is None else _subset_is_adv(model, x_in, y, subset, is_adv)
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
    full_precision: bool = True,
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
    Returns ``(hi, found, x_best)`` as :func:`bisect_ray`; ``full_precision`` as there (float32 forwards under
    autocast: regula falsi interpolates the margin's values, which bfloat16 rounds).
    """
    zero = torch.zeros_like(init)
    lo, g_lo = zero, clean_margin.to(init.dtype)
    prev_t, prev_g = zero, g_lo  # the non-adversarial trial before lo, for the extrapolation
    hi, g_hi = upper.clone(), torch.ones_like(init)
    found = torch.zeros_like(init, dtype=torch.bool)
    lo_moved_last = torch.zeros_like(found)
    x_best = x.clone()
    cur = init.clone()
    with torch.no_grad(), model_mode(model, train=False), outside_autocast(x, full_precision):
        for k in range(steps):
            x_cur = point_on_ray(x, direction, cur, clip_min, clip_max)
            logits = model(search_input(x_cur, full_precision))
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
