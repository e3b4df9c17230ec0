"""Per-sample margin search: AN-PGD plus bisection (Ding et al., ICLR 2020, Alg. 1 / reference ``mma_training``).

For each sample i, the margin is the norm of its shortest successful perturbation. The reference estimates it
in two stages, both batched here over the whole batch with per-sample tensors and masks (no Python loop over
samples, no host sync inside the loops):

1. PGD at the sample's current radius ``init_eps[i]`` (the eps remembered from its previous visit);
   its perturbation defines a direction ``u_i = (x_pgd_i - x_i) / init_eps[i]``.
2. Bisection along that single ray over ``[0, max_eps]``: the state ``lo = 0``, ``hi = max_eps``,
   ``cur = init_eps``; ``search_steps`` times, if ``x + cur * u`` (box-clipped) is adversarial then
   ``hi = cur`` else ``lo = cur``; ``cur = (lo + hi) / 2``. No new PGD run at the new radius.

Differences from the reference, on purpose (see docs/mma-algorithm.md, "Reference quirks"):
the returned eps is the upper end of the final bracket, so a successful ``x_adv`` is a point that a forward
pass verified adversarial (the reference returns the last midpoint); the search runs in eval mode unless
``search_train_mode=True`` (the reference's choice); success means ``argmax != y`` unless ``success="slm"``
(the reference's training-time soft test, SLM >= 0).

``search="refined"`` (ours, an option; the default stays the reference's) replaces stage 2: a root-finder on
the margin along the ray (:mod:`.line_search`), one linearised step onto the nearest boundary
(:mod:`.boundary`), then FMN steps warm-started from the best verified point (:mod:`.fmn`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mma_lightning.attacks.boundary import refine_on_boundary
from mma_lightning.attacks.checks import (
    as_eps,
    check_batch,
    check_box,
    check_labels,
    check_positive_int,
    host_checks_enabled,
)
from mma_lightning.attacks.context import grad_enabled_outside_inference, model_mode, usable_for_autograd
from mma_lightning.attacks.fmn import fmn_steps
from mma_lightning.attacks.line_search import bisect_ray, point_on_ray, root_find_ray
from mma_lightning.attacks.losses import SUCCESS_MARGINS, SUCCESS_TESTS, get_loss
from mma_lightning.attacks.norms import Norm, StartNoise, get_norm, per_sample
from mma_lightning.attacks.pgd import LossFn, fp16_gradient_scale, pgd_iterates

SEARCHES: tuple[str, ...] = ("bisection", "refined")
"""The margin searches after AN-PGD: the reference's bisection along the ray, or ours (see find_margin)."""


@dataclass
class MarginResult:
    """Outcome of :func:`find_margin` for a batch of N samples.

    Attributes:
        eps: ``[N]`` margin estimate; 0 for a point already misclassified, ``max_eps`` when none was found.
        x_adv: like ``x``; where ``success``, a verified adversarial point with ``||x_adv - x|| <= eps``.
        success: ``[N]`` bool, an adversarial point was found within ``max_eps``.
    """

    eps: Tensor
    x_adv: Tensor
    success: Tensor


def check_search(search: str, root_steps: int, refine_steps: int, search_train_mode: bool = False,
                 name: str = "search") -> None:
    """``ValueError`` naming the parameter unless the search and its budget are valid (see find_margin)."""
    if search not in SEARCHES:
        raise ValueError(f"{name} must be one of {list(SEARCHES)}, got {search!r}")
    check_positive_int("root_steps", root_steps)
    check_positive_int("refine_steps", refine_steps, minimum=0)
    if search == "refined" and search_train_mode:
        raise ValueError("search_train_mode=True reproduces the reference's train-mode bisection: it needs "
                         "search='bisection', got search='refined'")


def find_margin(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    norm: str | Norm = "linf",
    init_eps: float | Tensor = 0.1,
    max_eps: float | Tensor = 0.5,
    nb_iter: int = 40,
    search_steps: int = 10,
    *,
    loss: str | LossFn = "slm",
    rand_init: bool = True,
    step_scale: float = 2.5,
    clip_min: float | None = 0.0,
    clip_max: float | None = 1.0,
    success: str = "argmax",
    search_train_mode: bool = False,
    generator: torch.Generator | None = None,
    clean_logits: Tensor | None = None,
    search: str = "bisection",
    root_steps: int = 3,
    refine_steps: int = 6,
    start_noise: StartNoise | None = None,
) -> MarginResult:
    """Estimate each sample's margin (distance to the decision boundary in ``norm``) by AN-PGD + bisection.

    Args:
        model: maps inputs in the box to logits. PGD runs in eval mode; the search too unless
            ``search_train_mode`` (the reference's quirk: BatchNorm then updates its running statistics).
            Every submodule's ``training`` flag is restored; parameter gradients are never touched.
        x, y: inputs ``[N, ...]`` and integer labels ``[N]``.
        norm: ``"linf"`` or ``"l2"``.
        init_eps: PGD radius per sample (float or ``[N]``), ``> 0``; MMA passes the remembered eps.
        max_eps: upper end of the bisection (float or ``[N]``), ``>= init_eps``; MMA passes ``1.05 * d_max``.
        nb_iter: PGD steps K; step size ``step_scale * init_eps / nb_iter`` (reference: 2.5).
        search_steps: bisection steps S (reference: 10).
        loss: PGD objective, default the soft logit margin as in the reference.
        success: ``"argmax"`` (misclassified) or ``"slm"`` (SLM >= 0, the reference's training test).
        generator: random source for PGD's random start.
        start_noise: PGD's random start drawn beforehand (``norm``'s ``start_noise(x, generator)``), instead
            of ``generator``: how a compiled step, where no generator can go, gets it.
        clean_logits: logits of ``x`` the caller already computed (MMA's training forward); they decide
            which points are already adversarial, saving one forward pass. Default: a fresh forward.
        search: what follows AN-PGD. ``"bisection"`` (default, the reference): ``search_steps`` bisection
            forwards along the PGD ray. ``"refined"`` (ours): a safeguarded root-finder on the margin along the
            ray (``root_steps`` forwards), then ``refine_steps`` steps of one forward + backward each: the
            first a linearised step onto the nearest boundary (DeepFool / FAB, :mod:`.boundary`; exact on
            linear models), the others FMN steps warm-started from the best point (:mod:`.fmn`), each stage
            ending with a verification forward; the smallest verified adversarial point is kept and the eps
            returned is its own distance. ``root_steps=5, refine_steps=0`` is the cheap budget: about as
            tight as the bisection with half its forwards.
        root_steps, refine_steps: the ``"refined"`` search's budget (ignored by ``"bisection"``).
    """
    check_batch(x, y)
    check_positive_int("nb_iter", nb_iter)
    check_positive_int("search_steps", search_steps)
    check_search(search, root_steps, refine_steps, search_train_mode)
    check_box(clip_min, clip_max)
    if success not in SUCCESS_TESTS:
        raise ValueError(f"success must be one of {list(SUCCESS_TESTS)}, got {success!r}")
    geometry = get_norm(norm)
    loss_fn = get_loss(loss)
    is_adv = SUCCESS_TESTS[success]
    init = as_eps("init_eps", init_eps, x, positive=True)
    upper = as_eps("max_eps", max_eps, x, positive=True)
    if host_checks_enabled() and bool((upper < init).any()):  # reads values: first batch / debug only
        raise ValueError(f"max_eps must be >= init_eps for every sample, got max_eps={max_eps!r} "
                         f"below init_eps (max init_eps {float(init.max())})")

    with grad_enabled_outside_inference():
        x, y = usable_for_autograd(x).detach(), usable_for_autograd(y)
        if clean_logits is None:
            with torch.no_grad(), model_mode(model, train=search_train_mode):
                clean_logits = model(x)
        elif clean_logits.shape[0] != x.shape[0]:
            raise ValueError(f"clean_logits must have one row per sample ({x.shape[0]}), "
                             f"got shape {tuple(clean_logits.shape)}")
        clean_logits = clean_logits.detach()
        check_labels(y, clean_logits.shape[1])
        already = is_adv(clean_logits, y)

        with model_mode(model, train=False):
            x_pgd = pgd_iterates(model, x, y, geometry, init, nb_iter, step_scale * init / nb_iter, loss_fn,
                                 rand_init, clip_min, clip_max, generator, start_noise=start_noise)
        direction = (x_pgd - x) / per_sample(init, x)

        if search == "bisection":
            subset = ~already if search_train_mode else None
            hi, found, x_best = bisect_ray(model, x, y, direction, init, upper, search_steps, is_adv, clip_min,
                                           clip_max, train_mode=search_train_mode, subset=subset)
        else:
            margin_fn = SUCCESS_MARGINS[success]
            hi, found, x_best = root_find_ray(model, x, y, direction, init, upper, root_steps, margin_fn, is_adv,
                                              margin_fn(clean_logits, y), clip_min, clip_max)
            scale = fp16_gradient_scale(x)
            if refine_steps > 0:  # one linearised step onto the nearest boundary, then FMN steps
                start = torch.where(per_sample(found, x), x_best, x_pgd)
                x_best, found = refine_on_boundary(model, x, y, geometry, start, found, ~already, 1, margin_fn,
                                                   is_adv, clip_min, clip_max, scale)
            if refine_steps > 1:
                x_best, found = fmn_steps(model, x, y, geometry, x_best, found, ~already, refine_steps - 1,
                                          margin_fn, is_adv, clip_min, clip_max, scale)
            # The verified point's own distance (at most the ray parameter: the box clip only shortens it);
            # a point the boundary steps found beyond max_eps does not count.
            # (rounding: x + t u - x measures t only up to the rounding of x, 1e-4 relative for tiny t).
            dist = geometry.norm(x_best - x)
            found = found & (dist <= upper * (1 + 1e-3))
            hi = torch.where(found, dist.clamp(max=upper), upper)

    x_far = point_on_ray(x, direction, upper, clip_min, clip_max)
    eps = torch.where(already, torch.zeros_like(hi), torch.where(found, hi, upper))
    x_adv = torch.where(per_sample(already, x), x, torch.where(per_sample(found, x), x_best, x_far))
    return MarginResult(eps=eps, x_adv=x_adv, success=already | found)
