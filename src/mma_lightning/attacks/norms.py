"""Threat-model geometry: the Linf and L2 balls every attack works in.

One small abstraction instead of ``if norm == ...`` scattered through the attacks. Every method is batched
over the first dimension and takes a per-sample radius ``eps`` of shape ``[N]``; nothing syncs to the host.
The step rules follow advertorch 0.2.2 (``perturb_iterative``), which the MMA reference builds on.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

NormName = Literal["linf", "l2"]
NORM_NAMES: tuple[str, ...] = ("linf", "l2")
StartNoise = tuple[Tensor, ...]
"""The random draws of one random start (:meth:`Norm.start_noise`)."""


def per_sample(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a ``[N]`` tensor so it broadcasts over the non-batch dimensions of ``like``."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


class Norm:
    """A threat model: ball norm, projection onto the ball, steepest-ascent step and random start."""

    name: str

    def norm(self, delta: Tensor) -> Tensor:
        """Per-sample norm of ``delta``, shape ``[N]``."""
        raise NotImplementedError

    def project(self, delta: Tensor, eps: Tensor) -> Tensor:
        """Project ``delta`` onto the ball of per-sample radius ``eps`` (``[N]``)."""
        raise NotImplementedError

    def step(self, grad: Tensor, step_size: Tensor) -> Tensor:
        """Steepest-ascent step of per-sample length ``step_size`` (``[N]``) for this norm."""
        raise NotImplementedError

    def start_noise(self, x: Tensor, generator: torch.Generator | None = None, boxed: bool = True) -> StartNoise:
        """The random draws behind :meth:`random_init` (from ``generator``; ``boxed``: a box will be given).

        Drawn apart from their use so that a compiled step, where a ``torch.Generator`` cannot go, gets them as
        inputs: the draws, and so the module's random stream, are the same whether the step is compiled or not.
        """
        raise NotImplementedError

    def start_from_noise(self, x: Tensor, eps: Tensor, noise: StartNoise, clip_min: float | None = None,
                         clip_max: float | None = None) -> Tensor:
        """The random start of :meth:`random_init` made from :meth:`start_noise`'s draws."""
        raise NotImplementedError

    def random_init(self, x: Tensor, eps: Tensor, generator: torch.Generator | None = None,
                    clip_min: float | None = None, clip_max: float | None = None) -> Tensor:
        """A random start inside the ball of radius ``eps`` (same shape as ``x``), advertorch's
        ``rand_init_delta``; the box ``[clip_min, clip_max]`` (``None``: no box) is the L2 start's support."""
        noise = self.start_noise(x, generator, boxed=clip_min is not None)
        return self.start_from_noise(x, eps, noise, clip_min, clip_max)

    def steepest_direction(self, grad: Tensor) -> Tensor:
        """The unit-norm direction ``d`` maximising ``<grad, d>`` (sign for Linf, ``grad / ||grad||_2`` for L2)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinfNorm(Norm):
    """The Linf ball: sign-gradient steps, coordinate-wise clamp (Madry et al. 2018; advertorch LinfPGD)."""

    name = "linf"

    def norm(self, delta: Tensor) -> Tensor:
        return delta.flatten(1).abs().amax(dim=1)

    def project(self, delta: Tensor, eps: Tensor) -> Tensor:
        e = per_sample(eps, delta)
        return torch.maximum(torch.minimum(delta, e), -e)

    def step(self, grad: Tensor, step_size: Tensor) -> Tensor:
        return per_sample(step_size, grad) * grad.sign()

    def start_noise(self, x: Tensor, generator: torch.Generator | None = None, boxed: bool = True) -> StartNoise:
        """One uniform draw per coordinate."""
        return (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype),)

    def start_from_noise(self, x: Tensor, eps: Tensor, noise: StartNoise, clip_min: float | None = None,
                         clip_max: float | None = None) -> Tensor:
        """Uniform in the cube ``[-eps, eps]^d`` (advertorch: ``delta.uniform_(-eps, eps)``)."""
        (u,) = noise
        return (2 * u - 1) * per_sample(eps, x)

    def steepest_direction(self, grad: Tensor) -> Tensor:
        return grad.sign()


class L2Norm(Norm):
    """The L2 ball: gradient normalised per sample (floor 1e-6), radial shrink (advertorch L2PGD)."""

    name = "l2"
    tiny: float = 1e-6

    def norm(self, delta: Tensor) -> Tensor:
        return delta.flatten(1).norm(p=2, dim=1)

    def project(self, delta: Tensor, eps: Tensor) -> Tensor:
        factor = (eps / self.norm(delta).clamp_min(self.tiny)).clamp(max=1.0)
        return delta * per_sample(factor, delta)

    def step(self, grad: Tensor, step_size: Tensor) -> Tensor:
        scale = step_size / self.norm(grad).clamp_min(self.tiny)
        return grad * per_sample(scale, grad)

    def start_noise(self, x: Tensor, generator: torch.Generator | None = None, boxed: bool = True) -> StartNoise:
        """One uniform draw per coordinate (a point of the box); without a box, a Gaussian per coordinate and
        a uniform radius draw per sample."""
        if boxed:
            return (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype),)
        g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return g, torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)

    def start_from_noise(self, x: Tensor, eps: Tensor, noise: StartNoise, clip_min: float | None = None,
                         clip_max: float | None = None) -> Tensor:
        """advertorch's L2 ``rand_init_delta`` (the MMA reference's start): a uniform random point of the box
        minus ``x``, shrunk into the ball of radius ``eps`` (so on images it starts on the sphere). Without a
        box (``None``), uniform in the ball (Gaussian direction, radius ``eps * U^(1/d)``)."""
        if clip_min is not None and clip_max is not None:
            (u,) = noise
            return self.project(clip_min + (clip_max - clip_min) * u - x, eps)
        g, u = noise
        radius = eps * u.pow(1.0 / x[0].numel())
        return g * per_sample(radius / self.norm(g).clamp_min(self.tiny), x)

    def steepest_direction(self, grad: Tensor) -> Tensor:
        return grad * per_sample(1.0 / self.norm(grad).clamp_min(self.tiny), grad)


_NORMS: dict[str, Norm] = {"linf": LinfNorm(), "l2": L2Norm()}


def get_norm(norm: str | Norm) -> Norm:
    """Return the :class:`Norm` for ``"linf"`` or ``"l2"`` (a :class:`Norm` passes through)."""
    if isinstance(norm, Norm):
        return norm
    key = str(norm).lower()
    if key not in _NORMS:
        raise ValueError(f"norm must be one of {list(NORM_NAMES)}, got {norm!r}")
    return _NORMS[key]

