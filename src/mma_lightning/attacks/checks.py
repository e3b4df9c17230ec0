"""Input validation shared by the attacks: a clear ``ValueError`` naming the parameter, before any loop.

Checks of shapes, dtypes and Python numbers always run. Checks that read tensor *values* (finiteness, label
range, per-sample radii) force a host synchronisation on an accelerator, so they run only while
:func:`host_checks` is on: on by default (a direct call gets its clear error), and the training modules keep
them for the first batch only unless ``debug_checks=True`` (no host sync in a steady-state step).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

from mma_lightning.attacks.gradients import traced

_HOST_CHECKS: ContextVar[bool] = ContextVar("mma_lightning_host_checks", default=True)


@contextmanager
def host_checks(enabled: bool) -> Iterator[None]:
    """Turn the value checks that read tensors on the host (one sync each) on or off inside this block.

    Scoped like ``torch.no_grad()`` (a context variable, restored on exit); on by default.
    """
    token = _HOST_CHECKS.set(bool(enabled))
    try:
        yield
    finally:
        _HOST_CHECKS.reset(token)


def host_checks_enabled() -> bool:
    """Whether the value checks run here (see :func:`host_checks`); never inside ``torch.compile`` or a
    ``torch.func`` transform, which cannot read values (a captured step's caller checks its first batch)."""
    return not traced() and _HOST_CHECKS.get()


def check_batch(x: Tensor, y: Tensor) -> None:
    """``x`` a finite floating batch, ``y`` a 1-D integer label vector of the same length.

    The finiteness test reads ``x`` on the host: it runs only while :func:`host_checks` is on.
    """
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"x must be a floating-point tensor of shape [N, ...], got {_describe(x)}")
    if not torch.is_tensor(y) or y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"y must be a 1-D integer tensor of labels, got {_describe(y)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same length, got x: {x.shape[0]} and y: {y.shape[0]}")
    if host_checks_enabled() and not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite: it contains NaN or inf values")


def check_labels(y: Tensor, num_classes: int) -> None:
    """Labels must index the model's logits: ``0 <= y < num_classes`` (only while :func:`host_checks` is on)."""
    if host_checks_enabled() and y.numel() and (bool((y < 0).any()) or bool((y >= num_classes).any())):
        lo, hi = int(y.min()), int(y.max())
        raise ValueError(f"y must hold labels in [0, {num_classes - 1}] (the model has {num_classes} logits), "
                         f"got values in [{lo}, {hi}]")


def as_eps(name: str, eps: float | Tensor, x: Tensor, positive: bool = False) -> Tensor:
    """A per-sample radius ``[N]`` on ``x``'s device and dtype from a float or a ``[]``/``[N]`` tensor.

    A Python number is checked on the host and filled on the device (no copy, no sync); a tensor's values
    are checked only while :func:`host_checks` is on.
    """
    n = x.shape[0]
    if isinstance(eps, (int, float)):
        _check_radius(name, eps, math.isfinite(eps), float(eps), positive)
        return torch.full((n,), float(eps), dtype=x.dtype, device=x.device)
    t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        t = t.expand(n)
    elif t.shape != (n,):
        raise ValueError(f"{name} must be a float or a tensor of shape [N] = [{n}], got shape {tuple(t.shape)}")
    if host_checks_enabled() and t.numel():
        finite = bool(torch.isfinite(t).all())
        _check_radius(name, eps, finite, float(t.min()) if finite else 0.0, positive)
    return t.detach().clone()


def _check_radius(name: str, eps: object, finite: bool, min_value: float, positive: bool) -> None:
    """``ValueError`` unless the radius is finite and ``> 0`` (``positive``) or ``>= 0``."""
    if not finite:
        raise ValueError(f"{name} must be finite, got {eps!r}")
    if (min_value <= 0) if positive else (min_value < 0):
        allowed = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be {allowed}, got min value {min_value}")


def check_box(clip_min: float | None, clip_max: float | None) -> None:
    """The box is either absent (both ``None``) or a non-empty interval."""
    if (clip_min is None) != (clip_max is None):
        raise ValueError("clip_min and clip_max must both be floats or both be None (no box), "
                         f"got clip_min={clip_min!r}, clip_max={clip_max!r}")
    if clip_min is not None and clip_max is not None and not clip_min < clip_max:
        raise ValueError(f"clip_min must be < clip_max, got clip_min={clip_min}, clip_max={clip_max}")


BOX_TOLERANCE = 1e-5
"""How far (in input units) a value may lie outside ``[clip_min, clip_max]`` before :func:`check_in_box`
refuses it: float rounding of an input pipeline, not a different data range."""


def check_in_box(x: Tensor, clip_min: float | None, clip_max: float | None, where: str,
                 box_settable: bool = True) -> None:
    """Inputs must lie in the data box ``[clip_min, clip_max]`` (only while :func:`host_checks` is on).

    MMA (Ding et al., ICLR 2020) and its reference code measure every eps in input units, on pixels in
    ``[0, 1]``, and every attack clips its points to the box; inputs normalised outside the model lie
    elsewhere (MNIST's mean/std: ``[-0.42, 2.82]``), and the attacks then silently measure wrong radii.
    One ``ValueError`` gives the observed range, the box and the two fixes. ``where`` names the
    data (``"training"``, ``"validation"``, ``"test"``, ``"evaluation"``); ``box_settable=False`` (AutoAttack,
    whose box is fixed) leaves out the second fix. One host sync (the min and max).
    """
    if clip_min is None or clip_max is None or not host_checks_enabled() or not torch.is_tensor(x):
        return
    if x.numel() == 0 or not x.is_floating_point():
        return
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if lo >= clip_min - BOX_TOLERANCE and hi <= clip_max + BOX_TOLERANCE:
        return
    fix = ("move the normalisation into the model, net = torch.nn.Sequential(mma_lightning.models.Normalize("
           f"mean, std), net), and feed inputs in [{clip_min:g}, {clip_max:g}] (e.g. torchvision's ToTensor() "
           "without Normalize)")
    if box_settable:
        fix = (f"either {fix}; or set clip_min and clip_max to the range of your data (the normalised box, "
               "e.g. (0 - mean) / std and (1 - mean) / std; eps is then in normalised units)")
    else:
        fix = f"{fix} (this attack's box is fixed)"
    raise ValueError(
        f"the {where} inputs lie in [{lo:.4g}, {hi:.4g}], outside the data box [clip_min, clip_max] = "
        f"[{clip_min:g}, {clip_max:g}]: every eps is measured in input units and the attacks clip to the box, "
        f"so robust accuracies and margins would be wrong (inputs normalised outside the model?). Fix: {fix}")


def check_positive_int(name: str, value: int, minimum: int = 1) -> None:
    """An integer count such as ``nb_iter`` or ``search_steps``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _describe(t: object) -> str:
    if torch.is_tensor(t):
        return f"tensor of shape {tuple(t.shape)} and dtype {t.dtype}"
    return type(t).__name__
