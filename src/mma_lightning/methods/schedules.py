"""Learning-rate schedules indexed by optimiser step, as factories ``optimizer -> LRScheduler``.

The MMA reference (Ding et al., ICLR 2020; BorealisAI/mma_training) sets its CIFAR10 learning rate by
training step: 0.3, then 0.09 from step 20k, 0.03 from 30k and 0.009 from 40k (docs/mma-algorithm.md,
"Hyperparameters"). Use with ``AdversarialModule(scheduler=functools.partial(piecewise_constant, ...),
scheduler_interval="step")`` or Hydra's ``_partial_: true`` (conf/scheduler/piecewise_constant.yaml).
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_right
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def piecewise_constant(optimizer: Optimizer, boundaries: Sequence[int], factors: Sequence[float]) -> LambdaLR:
    """Piecewise-constant learning rate by step: ``lr = base_lr * factors[i]`` while
    ``boundaries[i - 1] <= step < boundaries[i]`` (``factors[0]`` before the first boundary).

    ``base_lr`` is each parameter group's learning rate when the scheduler is created, so scaling the
    optimiser's ``lr`` scales the whole table. The scheduler must be stepped once per optimiser step.
    The MMA reference's CIFAR10 table is ``SGD(lr=0.3)`` with ``boundaries=[20000, 30000, 40000]`` and
    ``factors=[1.0, 0.3, 0.1, 0.03]``.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.3)
        >>> sched = piecewise_constant(opt, boundaries=[2, 4], factors=[1.0, 0.3, 0.1])
        >>> lrs = []
        >>> for _ in range(5):
        ...     lrs.append(round(opt.param_groups[0]["lr"], 6))
        ...     opt.step()
        ...     sched.step()
        >>> lrs
        [0.3, 0.3, 0.09, 0.09, 0.03]
    """
    bounds = list(boundaries)
    scales = [float(f) for f in factors]
    if any(isinstance(b, bool) or not isinstance(b, int) for b in bounds) or any(b <= 0 for b in bounds):
        raise ValueError(f"boundaries must be positive integer step numbers, got {list(boundaries)!r}")
    if any(b >= c for b, c in itertools.pairwise(bounds)):
        raise ValueError(f"boundaries must be strictly increasing, got {bounds!r}")
    if len(scales) != len(bounds) + 1:
        raise ValueError(f"factors must have one more entry than boundaries ({len(bounds)} boundaries, so "
                         f"{len(bounds) + 1} factors), got {len(scales)}: {scales!r}")
    if any(not (math.isfinite(f) and f >= 0) for f in scales):
        raise ValueError(f"factors must be finite and >= 0, got {scales!r}")

    def factor(step: int) -> float:
        return scales[bisect_right(bounds, step)]

    return LambdaLR(optimizer, lr_lambda=factor)
