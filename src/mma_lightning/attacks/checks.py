"""Input validation shared by the attacks: a clear ``ValueError`` naming the parameter, before any loop."""

from __future__ import annotations

import torch
from torch import Tensor


def check_batch(x: Tensor, y: Tensor) -> None:
    """``x`` a finite floating batch, ``y`` a 1-D integer label vector of the same length."""
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"x must be a floating-point tensor of shape [N, ...], got {_describe(x)}")
    if not torch.is_tensor(y) or y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"y must be a 1-D integer tensor of labels, got {_describe(y)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same length, got x: {x.shape[0]} and y: {y.shape[0]}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite: it contains NaN or inf values")


def check_labels(y: Tensor, num_classes: int) -> None:
    """Labels must index the model's logits: ``0 <= y < num_classes``."""
    if y.numel() and (bool((y < 0).any()) or bool((y >= num_classes).any())):
        lo, hi = int(y.min()), int(y.max())
        raise ValueError(f"y must hold labels in [0, {num_classes - 1}] (the model has {num_classes} logits), "
                         f"got values in [{lo}, {hi}]")


def as_eps(name: str, eps: float | Tensor, x: Tensor, positive: bool = False) -> Tensor:
    """A per-sample radius ``[N]`` on ``x``'s device and dtype from a float or a ``[]``/``[N]`` tensor."""
    n = x.shape[0]
    t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        t = t.expand(n)
    elif t.shape != (n,):
        raise ValueError(f"{name} must be a float or a tensor of shape [N] = [{n}], got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, got {eps!r}")
    bad = (t <= 0) if positive else (t < 0)
    if bool(bad.any()):
        allowed = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be {allowed}, got min value {float(t.min())}")
    return t.detach().clone()


def check_box(clip_min: float | None, clip_max: float | None) -> None:
    """The box is either absent (both ``None``) or a non-empty interval."""
    if (clip_min is None) != (clip_max is None):
        raise ValueError("clip_min and clip_max must both be floats or both be None (no box), "
                         f"got clip_min={clip_min!r}, clip_max={clip_max!r}")
    if clip_min is not None and clip_max is not None and not clip_min < clip_max:
        raise ValueError(f"clip_min must be < clip_max, got clip_min={clip_min}, clip_max={clip_max}")


def check_positive_int(name: str, value: int, minimum: int = 1) -> None:
    """An integer count such as ``nb_iter`` or ``search_steps``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _describe(t: object) -> str:
    if torch.is_tensor(t):
        return f"tensor of shape {tuple(t.shape)} and dtype {t.dtype}"
    return type(t).__name__
