"""Learning-rate schedules indexed by optimiser step, as factories ``optimizer -> LRScheduler``.

The MMA reference (Ding et al., ICLR 2020; BorealisAI/mma_training) sets its CIFAR10 learning rate by
training step: 0.3, then 0.09 from step 20k, 0.03 from 30k and 0.009 from 40k (docs/mma-algorithm.md,
"Hyperparameters"). Use with ``AdversarialModule(scheduler=functools.partial(piecewise_constant, ...),
scheduler_interval="step")`` or Hydra's ``_partial_: true`` (conf/scheduler/piecewise_constant.yaml).

A scheduler stepped on a metric (``ReduceLROnPlateau``, the lightning-hydra-template's default) needs the
metric's name: ``scheduler_monitor`` (with ``scheduler_interval="epoch"`` for a validation metric), or a factory
returning Lightning's scheduler config (:func:`scheduler_config`; conf/scheduler/reduce_on_plateau.yaml).
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

SCHEDULER_INTERVALS = ("step", "epoch")
"""When Lightning steps a scheduler: after every optimiser step or every epoch."""


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


def scheduler_config(optimizer: Optimizer, scheduler: Callable[[Optimizer], Any], monitor: str | None = None,
                     interval: str = "epoch", frequency: int = 1, strict: bool = True) -> dict[str, Any]:
    """Lightning's scheduler config (``{"scheduler", "monitor", "interval", ...}``, docs/lightning-notes.md; Lightning's
    ``configure_optimizers``) for ``scheduler(optimizer)``: a scheduler factory that names its metric, e.g.
    ``ReduceLROnPlateau`` on ``val/acc`` once per epoch (conf/scheduler/reduce_on_plateau.yaml).

    Example:
        >>> import functools, torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> plateau = functools.partial(torch.optim.lr_scheduler.ReduceLROnPlateau, mode="max")
        >>> sorted(scheduler_config(opt, plateau, monitor="val/acc"))
        ['frequency', 'interval', 'monitor', 'scheduler', 'strict']
    """
    return {"scheduler": scheduler(optimizer), "monitor": monitor, "interval": interval,
            "frequency": frequency, "strict": strict}


def lightning_scheduler(made: Any, interval: str, monitor: str | None) -> dict[str, Any]:
    """The ``lr_scheduler`` entry of ``configure_optimizers`` from what a scheduler factory returned: a
    scheduler, completed with the module's ``scheduler_interval`` and ``scheduler_monitor``, or Lightning's
    scheduler config (a dict with ``"scheduler"``), whose own keys win (a different ``monitor`` is refused).

    A ``ReduceLROnPlateau`` needs a monitor, and a validation metric (``val/...``) exists once per validation,
    so it needs ``interval="epoch"``: both are ``ValueError`` here, before the first step, rather than
    Lightning's error after it.
    """
    if isinstance(made, Mapping):
        if "scheduler" not in made:
            raise ValueError("the scheduler factory returned a dict without a 'scheduler' key; it must return an "
                             "LR scheduler or Lightning's scheduler config {'scheduler': ..., 'monitor': ..., "
                             f"'interval': ...}}, got keys {sorted(made)}")
        config = dict(made)
        if monitor is not None and config.get("monitor") not in (None, monitor):
            raise ValueError(f"scheduler_monitor={monitor!r} but the scheduler factory's config monitors "
                             f"{config['monitor']!r}: set one of them")
    else:
        config = {"scheduler": made}
    if config.get("monitor") is None:
        config.pop("monitor", None)
        if monitor is not None:
            config["monitor"] = monitor
    config.setdefault("interval", interval)
    if config["interval"] not in SCHEDULER_INTERVALS:
        raise ValueError(f"scheduler_interval must be one of {list(SCHEDULER_INTERVALS)}, "
                         f"got {config['interval']!r}")
    name = type(config["scheduler"]).__name__
    if isinstance(config["scheduler"], ReduceLROnPlateau) and "monitor" not in config:
        raise ValueError(f"the scheduler {name} steps on a metric: set scheduler_monitor to the metric's name "
                         "(e.g. scheduler_monitor='val/acc' with scheduler_interval='epoch'), or return "
                         "mma_lightning.methods.schedules.scheduler_config(...) from the factory")
    if str(config.get("monitor", "")).startswith("val/") and config["interval"] == "step":
        raise ValueError(f"scheduler_monitor={config['monitor']!r} is logged once per validation, so the "
                         "scheduler must step per epoch: set scheduler_interval='epoch'")
    return config
