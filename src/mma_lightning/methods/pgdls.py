"""PGD training with a linearly ramped eps ("PGDLS-eps", the baseline of Ding et al., "MMA Training: Direct
Input Space Margin Maximization through Adversarial Training", ICLR 2020, Sec. 5).

The paper trains PGD-AT while the attack radius grows linearly from 0 to its final value ("PGD with Linear
Scaling"); the reference repository does not contain the schedule, so here it is explicit: at optimiser step
``t`` the radius is ``eps * min(1, t / ramp_steps)``.
"""

from __future__ import annotations

import math

from torch import nn
from typing_extensions import Unpack

from mma_lightning.attacks.checks import check_positive_int
from mma_lightning.methods.base import SkeletonKwargs
from mma_lightning.methods.pgd_at import PGDATModule, PGDATModuleLogic


class PGDLSModuleLogic(PGDATModuleLogic):
    """PGD-AT whose eps ramps linearly from 0 to ``eps`` (PGDLS, Ding et al. 2020), then stays at ``eps``.

    The ramp's length in optimiser steps (``self.global_step``) is ``ramp_steps`` when given; otherwise it is
    ``ramp_fraction`` of the trainer's ``estimated_stepping_batches`` (the whole run, accumulation and
    ``max_steps`` / ``max_epochs`` included). An explicit ``ramp_steps`` wins over ``ramp_fraction``. The
    current eps is logged as ``train/eps``.

    Example:
        >>> import torch
        >>> from mma_lightning import PGDLSModule
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
        >>> PGDLSModule(net, eps=0.3, ramp_steps=1000).ramp_length()
        1000

    Args:
        net, norm, eps, nb_iter, step_scale, rand_init: see :class:`PGDATModule` (``eps`` is the final radius).
        ramp_fraction: fraction in ``[0, 1]`` of the total training steps over which eps ramps up (used when
            ``ramp_steps`` is ``None``; needs a trainer with a finite number of steps).
        ramp_steps: the ramp's length in optimiser steps (``0``: no ramp); overrides ``ramp_fraction``.
        **kwargs: the shared settings (optimizer, scheduler, eval_*, box) of ``AdversarialModule``.
    """

    def __init__(
        self,
        net: nn.Module,
        norm: str = "linf",
        eps: float = 0.3,
        nb_iter: int = 40,
        step_scale: float = 2.5,
        rand_init: bool = True,
        ramp_fraction: float = 0.5,
        ramp_steps: int | None = None,
        **kwargs: Unpack[SkeletonKwargs],
    ) -> None:
        if isinstance(ramp_fraction, bool) or not isinstance(ramp_fraction, (int, float)) \
                or not 0.0 <= ramp_fraction <= 1.0:
            raise ValueError(f"ramp_fraction must be a float in [0, 1], got {ramp_fraction!r}")
        if ramp_steps is not None:
            check_positive_int("ramp_steps", ramp_steps, minimum=0)
        super().__init__(net, norm=norm, eps=eps, nb_iter=nb_iter, step_scale=step_scale, rand_init=rand_init,
                         **kwargs)

    def ramp_length(self) -> int:
        """The ramp's length in optimiser steps: ``ramp_steps``, else ``ramp_fraction`` of the whole run."""
        hp = self.hparams
        if hp.ramp_steps is not None:
            return int(hp.ramp_steps)
        if self._trainer is None:
            raise ValueError("PGDLSModule needs ramp_steps=... when it is not attached to a Trainer "
                             "(ramp_fraction is a fraction of the trainer's estimated_stepping_batches)")
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("ramp_fraction needs a finite run (set the Trainer's max_steps or max_epochs), "
                             "or pass ramp_steps=...")
        return round(hp.ramp_fraction * total)

    def training_eps(self) -> float:
        """``eps * min(1, global_step / ramp_length)``: 0 at the first step, ``eps`` from the ramp's end on."""
        length = self.ramp_length()
        progress = 1.0 if length == 0 else min(1.0, self.global_step / length)
        return float(self.hparams.eps) * progress


# The pytorch_lightning classes: the namespace-free logic above on pytorch_lightning's base classes
# (mma_lightning.lightning builds the lightning.pytorch ones from the same logic classes).
class PGDLSModule(PGDLSModuleLogic, PGDATModule):
    """:class:`PGDLSModuleLogic` on pytorch_lightning (the default namespace)."""
