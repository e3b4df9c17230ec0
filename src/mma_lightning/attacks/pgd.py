"""Projected gradient descent with a per-sample radius (Madry et al., ICLR 2018).

The MMA reference (Ding et al., ICLR 2020) runs advertorch's PGD with a different radius per sample
(AN-PGD's inner attack); this module is that attack, batched, in plain PyTorch:
random start inside the ball, ``nb_iter`` steepest-ascent steps of the loss, each followed by a clip to the
box and a projection onto the ball, last iterate returned. Input gradients come from
``torch.autograd.grad`` only, so parameter ``.grad`` is never touched (docs/lightning-notes.md, item 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mma_lightning.attacks.checks import as_eps, check_batch, check_box, check_labels, check_positive_int
from mma_lightning.attacks.context import (
    frozen_parameters,
    grad_enabled_outside_inference,
    model_mode,
    usable_for_autograd,
)
from mma_lightning.attacks.gradients import input_gradient
from mma_lightning.attacks.losses import get_loss
from mma_lightning.attacks.norms import Norm, StartNoise, get_norm

LossFn = Callable[[Tensor, Tensor], Tensor]


def clip_box(x: Tensor, clip_min: float | None, clip_max: float | None) -> Tensor:
    """Clip to the data box ``[clip_min, clip_max]``; ``None`` means no box."""
    return x if clip_min is None else x.clamp(clip_min, clip_max)


FP16_ATTACK_SCALE = 1024.0


def fp16_gradient_scale(x: Tensor) -> float:
    """Factor on the attack objective under float16 autocast (docs/lightning-notes.md, item 6), else 1.

    Lightning's ``16-mixed`` scales only the training loss; an attack's input gradient can underflow to zero
    in float16 and ``sign()`` then gives 0. Both step rules (sign, normalised gradient) ignore a positive
    factor on the gradient, so scaling the objective costs nothing and keeps the gradient representable.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16:
        return FP16_ATTACK_SCALE
    return 1.0


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    norm: str | Norm = "linf",
    eps: float | Tensor = 0.3,
    nb_iter: int = 40,
    step_size: float | Tensor | None = None,
    *,
    loss: str | LossFn = "ce",
    rand_init: bool = True,
    step_scale: float = 2.5,
    clip_min: float | None = 0.0,
    clip_max: float | None = 1.0,
    train_mode: bool = False,
    generator: torch.Generator | None = None,
    start_noise: StartNoise | None = None,
) -> Tensor:
    """Untargeted PGD in the ``norm`` ball of per-sample radius ``eps``; returns the adversarial batch.

    Args:
        model: maps a batch in the box to logits; run in eval mode unless ``train_mode`` (flags restored).
        x, y: inputs ``[N, ...]`` and integer labels ``[N]``.
        norm: ``"linf"`` (sign steps, clamp) or ``"l2"`` (normalised steps, radial shrink).
        eps: a float or a per-sample ``[N]`` tensor, ``>= 0``.
        nb_iter: number of steps K.
        step_size: a float or ``[N]`` tensor; default ``step_scale * eps / nb_iter`` (the MMA reference's 2.5).
        loss: objective maximised per sample: ``"ce"``, ``"slm"``, ``"lm"``, ``"cw"`` or a callable.
        rand_init: start uniformly inside the ball (then clip to the box), as advertorch's ``rand_init``.
        clip_min, clip_max: the data box; ``None`` for both means no box.
        generator: random source for the start, for reproducible restarts.
        start_noise: the random start's draws made beforehand (``norm``'s ``start_noise(x, generator)``), used
            instead of ``generator``: how a compiled step, where no generator can go, gets its random start.
    """
    check_batch(x, y)
    check_positive_int("nb_iter", nb_iter, minimum=0)
    check_box(clip_min, clip_max)
    geometry = get_norm(norm)
    eps_t = as_eps("eps", eps, x)
    steps = step_scale * eps_t / max(nb_iter, 1) if step_size is None else as_eps("step_size", step_size, x)
    loss_fn = get_loss(loss)
    with grad_enabled_outside_inference():
        x, y = usable_for_autograd(x), usable_for_autograd(y)
        with model_mode(model, train=train_mode):
            return pgd_iterates(model, x, y, geometry, eps_t, nb_iter, steps, loss_fn,
                                rand_init, clip_min, clip_max, generator, check_y=True, start_noise=start_noise)


def pgd_iterates(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    norm: Norm,
    eps: Tensor,
    nb_iter: int,
    step_size: Tensor,
    loss_fn: LossFn,
    rand_init: bool,
    clip_min: float | None,
    clip_max: float | None,
    generator: torch.Generator | None = None,
    check_y: bool = False,
    start_noise: StartNoise | None = None,
) -> Tensor:
    """The PGD loop itself, on validated per-sample tensors; the model's mode is the caller's business.

    ``check_y``: check the labels against the first forward's logits (:func:`check_labels`, which reads
    them only while host checks are on), instead of an extra forward to count the classes.
    ``start_noise``: the random start's draws (:meth:`Norm.start_noise`) instead of drawing from ``generator``.
    Returns ``x + delta_K`` (detached). No host synchronisation and no parameter gradients.
    """
    x = x.detach()
    scale = fp16_gradient_scale(x)
    if rand_init:
        noise = start_noise if start_noise is not None else norm.start_noise(x, generator, clip_min is not None)
        delta = norm.start_from_noise(x, eps, noise, clip_min, clip_max)
    else:
        delta = torch.zeros_like(x)
    delta = norm.project(clip_box(x + delta, clip_min, clip_max) - x, eps)
    with frozen_parameters(model):  # the input gradient only (a compiled backward computes all it may)
        for i in range(nb_iter):
            check_now = check_y and i == 0

            def objective(logits: Tensor, check_now: bool = check_now) -> Tensor:
                if check_now:  # before the loss indexes the logits with the labels
                    check_labels(y, logits.shape[1])
                return loss_fn(logits, y)

            _, _, grad = input_gradient(model, delta, lambda d: x + d, objective, scale)
            delta = delta + norm.step(grad, step_size)
            delta = norm.project(clip_box(x + delta, clip_min, clip_max) - x, eps)
    return (x + delta).detach()
