"""Robust accuracy over an eps grid: the MMA paper's whitebox PGD protocol (Ding et al., ICLR 2020, Sec. 6).

For every eps of the grid, every test point is attacked by PGD with several losses (cross-entropy and the CW
margin loss) and several seeded random restarts each; a point counts as robust at eps only if it is correctly
classified and *every* attack fails (the per-sample worst case, docs/mma-algorithm.md "Evaluation protocol").
Each eps is attacked independently (nothing is carried over from a smaller eps), so the sanity check
"robust accuracy does not rise with eps" stays meaningful.

A point already broken by one restart is not attacked again at that eps: this drops it from the batch, one
host synchronisation per restart, never inside the PGD loop. The random start of restart ``r`` with loss ``l``
at eps ``k`` on batch ``b`` comes from its own ``torch.Generator`` seeded from ``(seed, k, l, r, b, rank)``,
so results are reproducible for a fixed data order, and the first ``R`` restarts of a run with more restarts
are the same attacks (worst case over more restarts is never less strict).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mma_lightning.attacks import get_norm, pgd
from mma_lightning.attacks.context import model_mode
from mma_lightning.attacks.losses import LOSSES as LOSS_FUNCTIONS
from mma_lightning.attacks.norms import NORM_NAMES
from mma_lightning.capture import CapturedModel, bucket_size, pad_batch
from mma_lightning.evaluation.batches import (
    EvalData,
    check_positive_int,
    evaluation_batches,
    model_device,
    resolve_shard,
)
from mma_lightning.evaluation.cache import OutcomeCache
from mma_lightning.evaluation.collect import SampleCollector
from mma_lightning.evaluation.protocol import (
    LOSSES,
    PGD_STEPS,
    RESTARTS_PER_LOSS,
    check_eps_grid,
    fit_step_fraction,
    format_eps,
    grid_family,
)
from mma_lightning.evaluation.protocol import protocol_step_fraction as protocol_step_fraction_for
from mma_lightning.evaluation.sharding import distributed_world


@dataclass
class RobustnessResult:
    """Robust accuracy over an eps grid with its per-sample outcomes (CPU tensors, sorted by sample index).

    Attributes:
        norm: ``"linf"`` or ``"l2"``.
        eps_grid: the eps values, ascending.
        clean_accuracy: fraction of points classified correctly.
        robust_accuracy: per eps, fraction of points correct and not broken by any attack.
        index: ``[N]`` sample indices (int64).
        label: ``[N]`` labels (int64).
        correct: ``[N]`` bool, correctly classified clean.
        robust: ``[N, E]`` bool, robust at each eps of the grid.
        attack: ``"pgd"`` (:func:`robust_accuracy`) or ``"autoattack"``.
        settings: the attack's settings, enough to run it again.
    """

    norm: str
    eps_grid: tuple[float, ...]
    clean_accuracy: float
    robust_accuracy: tuple[float, ...]
    index: Tensor
    label: Tensor
    correct: Tensor
    robust: Tensor
    attack: str = "pgd"
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        """Number of test points evaluated (each exactly once)."""
        return int(self.index.numel())

    @property
    def avg_robust_accuracy(self) -> float:
        """AvgRobAcc: the mean robust accuracy over the eps grid (MMA paper, Sec. 6)."""
        return sum(self.robust_accuracy) / len(self.robust_accuracy)

    @property
    def avg_accuracy(self) -> float:
        """AvgAcc: the mean of the clean accuracy and the robust accuracy at every eps (MMA paper, Sec. 6)."""
        return (self.clean_accuracy + sum(self.robust_accuracy)) / (len(self.robust_accuracy) + 1)

    def eps_position(self, eps: float) -> int:
        """Position of ``eps`` in the grid (matched up to float rounding)."""
        for k, e in enumerate(self.eps_grid):
            if abs(e - eps) <= 1e-9 * max(1.0, abs(eps)):
                return k
        raise ValueError(f"eps must be one of the grid {list(self.eps_grid)}, got {eps!r}")

    def accuracy_at(self, eps: float) -> float:
        """Robust accuracy at an eps of the grid."""
        return self.robust_accuracy[self.eps_position(eps)]

    def to_dict(self) -> dict[str, Any]:
        """The numbers and settings as plain JSON-ready values (no per-sample tensors)."""
        return {
            "attack": self.attack,
            "norm": self.norm,
            "settings": dict(self.settings),
            "num_samples": self.num_samples,
            "eps": list(self.eps_grid),
            "eps_labels": [format_eps(e) for e in self.eps_grid],
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": list(self.robust_accuracy),
            "avg_robust_accuracy": self.avg_robust_accuracy,
            "avg_accuracy": self.avg_accuracy,
        }


def result_from_outcomes(outcomes: dict[str, Tensor], norm: str, eps_grid: tuple[float, ...], attack: str,
                         settings: dict[str, Any]) -> RobustnessResult:
    """Build a :class:`RobustnessResult` from gathered columns ``index, label, correct, robust@<k>``."""
    correct = outcomes["correct"].bool()
    robust = torch.stack([outcomes[f"robust@{k}"].bool() for k in range(len(eps_grid))], dim=1)
    return RobustnessResult(
        norm=norm,
        eps_grid=eps_grid,
        clean_accuracy=float(correct.double().mean()),
        robust_accuracy=tuple(float(a) for a in robust.double().mean(dim=0)),
        index=outcomes["index"].cpu(),
        label=outcomes["label"].long().cpu(),
        correct=correct.cpu(),
        robust=robust.cpu(),
        attack=attack,
        settings=settings,
    )


def restart_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed for one attack run, derived from the user's ``seed`` and the run's coordinates."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class PGDRun:
    """One whitebox PGD run on a batch and its verdict: which points it misclassifies (``[B]`` bool).

    The unit the evaluation repeats per eps, loss and restart. With ``capture`` (``True`` or ``torch.compile``
    arguments) the model's passes run as captured graphs (:class:`~mma_lightning.capture.CapturedModel`: CUDA
    graphs on a GPU) and the batch is padded to a few sizes (:func:`~mma_lightning.capture.bucket_size`, copies of its first point),
    so that the shrinking subsets of points still alive need a handful of recorded graphs; the random start is
    then drawn for the padded batch.
    """

    def __init__(self, model: nn.Module, norm: str, nb_iter: int, rand_init: bool, clip_min: float | None,
                 clip_max: float | None, capture: bool | Mapping[str, Any] = False) -> None:
        self.model = model if capture is False else CapturedModel(model, capture)
        self.padded = capture is not False
        self.norm, self.nb_iter, self.rand_init = norm, nb_iter, rand_init
        self.clip_min, self.clip_max = clip_min, clip_max

    def __call__(self, x: Tensor, y: Tensor, eps: float, step: float, loss: str,
                 generator: torch.Generator) -> Tensor:
        """Whether each point of ``(x, y)`` is misclassified after PGD of radius ``eps`` and step ``step``."""
        n = x.shape[0]
        if self.padded:
            x, y = pad_batch(x, y, bucket_size(n))
        x_adv = pgd(self.model, x, y, self.norm, eps, self.nb_iter, step, loss=loss, rand_init=self.rand_init,
                    clip_min=self.clip_min, clip_max=self.clip_max, generator=generator)
        with torch.no_grad():
            return (self.model(x_adv).argmax(dim=1) != y)[:n]


def worst_case_robust(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    correct: Tensor,
    norm: str,
    eps: float,
    *,
    nb_iter: int,
    restarts: int,
    losses: Sequence[str],
    step_fraction: float,
    rand_init: bool,
    clip_min: float | None,
    clip_max: float | None,
    seeds: Sequence[int],
    run: PGDRun | None = None,
) -> Tensor:
    """Per-sample worst case over all attacks at one eps: robust iff ``correct`` and every PGD run fails.

    Runs ``len(losses) * restarts`` PGD attacks (``seeds`` gives one seed per run, loss-major); a point broken
    by one run is not attacked again. Returns ``[B]`` bool. The model is used as it is (the caller sets eval
    mode); ``pgd`` restores every flag it touches and never touches parameter gradients. ``run``: how one
    attack runs (:class:`PGDRun`, e.g. captured); default the eager run of these settings.
    """
    runs = [(loss, r) for loss in losses for r in range(restarts)]
    if len(seeds) != len(runs):
        raise ValueError(f"seeds must hold one seed per run, len(losses) * restarts = {len(runs)}, "
                         f"got {len(seeds)}")
    run = run or PGDRun(model, norm, nb_iter, rand_init, clip_min, clip_max)
    alive = correct.clone()
    for (loss, _), seed in zip(runs, seeds):
        rows = alive.nonzero().squeeze(1)  # one host sync per restart: drop the points already broken
        if rows.numel() == 0:
            break
        generator = torch.Generator(device=x.device).manual_seed(seed)
        alive[rows] = ~run(x[rows], y[rows], eps, step_fraction * eps, loss, generator)
    return alive


def check_losses(losses: Sequence[str]) -> tuple[str, ...]:
    """Loss names for the evaluation: a non-empty sequence of names from ``mma_lightning.attacks.LOSSES``."""
    names = (losses,) if isinstance(losses, str) else tuple(losses)
    if not names or any(not isinstance(n, str) or n not in LOSS_FUNCTIONS for n in names):
        raise ValueError(f"losses must be a non-empty sequence of names from {list(LOSS_FUNCTIONS)}, "
                         f"got {losses!r}")
    return names


def check_norm(norm: str) -> str:
    """The norm's canonical name, ``"linf"`` or ``"l2"``."""
    if not isinstance(norm, str) or norm.lower() not in NORM_NAMES:
        raise ValueError(f"norm must be one of {list(NORM_NAMES)}, got {norm!r}")
    return get_norm(norm).name


def robust_accuracy(
    model: nn.Module,
    data: EvalData,
    norm: str,
    eps_grid: Sequence[float],
    *,
    nb_iter: int = PGD_STEPS,
    restarts: int = RESTARTS_PER_LOSS,
    losses: Sequence[str] = LOSSES,
    step_fraction: float | None = None,
    protocol_step_fraction: float | None = None,
    dataset: str | None = None,
    rand_init: bool = True,
    clip_min: float | None = 0.0,
    clip_max: float | None = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    max_samples: int | None = None,
    shard: bool | None = None,
    progress: bool = False,
    cache: OutcomeCache | None = None,
    on_first_batch: Callable[[float, int], None] | None = None,
    capture: bool | Mapping[str, Any] = False,
) -> RobustnessResult:
    """Whitebox PGD robust accuracy at every eps of ``eps_grid``, worst case per sample over all attacks.

    Defaults are the MMA release evaluation (docs/mma-algorithm.md, "Evaluation protocol"): 100 steps,
    5 restarts with each of the CE and CW losses, step ``eps / 40`` on the MNIST Linf grid and ``eps / 4``
    otherwise; with another ``nb_iter`` the step is fitted to it (:func:`fit_step_fraction`).

    Args:
        model: maps inputs in ``[clip_min, clip_max]`` to logits (normalisation inside). Put in eval mode for
            the duration (every submodule's flag restored); never moved; parameter gradients never touched.
        data: a DataLoader / iterable yielding ``(x, y)`` or ``(x, y, index)``, or tensors ``(x, y[, index])``
            (see :mod:`mma_lightning.evaluation.batches`). Batches go to the model's device.
        norm: ``"linf"`` or ``"l2"``.
        eps_grid: the radii (sorted ascending in the result), e.g. :data:`MNIST_LINF_EPS`.
        nb_iter: PGD steps per attack.
        restarts: random restarts per loss.
        losses: PGD objectives, names from ``mma_lightning.attacks``: ``"ce"``, ``"cw"``, ``"slm"``, ``"lm"``.
        step_fraction: step size as a fraction of eps (``0.25`` = ``eps / 4``), used as given; ``None``:
            ``fit_step_fraction(nb_iter, protocol_step_fraction)``, a step that fits the step count.
        protocol_step_fraction: the data's step fraction at the paper's 100 steps; ``None``: the release
            script's for the data (:func:`protocol_step_fraction`: ``eps / 40`` for MNIST-like Linf).
        dataset: the data's name (``"mnist"``, ``"fashion-mnist"``, ``"cifar10"``, or any other): it decides
            the release script's step and whether the settings are the paper's protocol
            (:func:`~mma_lightning.evaluation.protocol.is_paper_protocol`); ``None``: read off a preset grid
            (the MNIST Linf grid means MNIST), else unknown.
        rand_init: random start in the ball (without it, restarts of one loss are the same attack).
        clip_min, clip_max: the data box (``None`` for both: no box).
        seed: base seed of the restarts' generators.
        batch_size: batch size for tensor data.
        max_samples: evaluate only the first ``max_samples`` points.
        shard: shard over ``torch.distributed`` ranks with a non-padding sampler (default: when initialised);
            the per-sample outcomes are gathered, so every rank returns the full result.
        progress: tqdm progress bar over the test points.
        cache: per-batch outcomes of an interrupted run of the same evaluation (:func:`stage_cache`): stored
            batches are not attacked again, new ones are stored.
        on_first_batch: called once with the seconds the first attacked batch took and its size (for a time
            estimate).
        capture: run the model's passes as captured graphs (:class:`PGDRun`; CUDA graphs on a GPU): ``True``
            or a dict of ``torch.compile`` arguments. The same attacks; the random starts are drawn for the
            padded batch, so they differ from the eager run's draws.
    """
    norm = check_norm(norm)
    grid = check_eps_grid(eps_grid)
    losses = check_losses(losses)
    check_positive_int("nb_iter", nb_iter)
    check_positive_int("restarts", restarts)
    if dataset is not None and (not isinstance(dataset, str) or not dataset):
        raise ValueError(f"dataset must be the data's name (e.g. 'mnist', 'fashion-mnist', 'cifar10') or None, "
                         f"got {dataset!r}")
    protocol_fraction = (protocol_step_fraction_for(norm, grid, dataset) if protocol_step_fraction is None
                         else check_step_fraction("protocol_step_fraction", protocol_step_fraction))
    fraction = (fit_step_fraction(nb_iter, protocol_fraction) if step_fraction is None
                else check_step_fraction("step_fraction", step_fraction))
    settings = {"nb_iter": nb_iter, "restarts": restarts, "losses": list(losses),
                "step_fraction": fraction, "protocol_step_fraction": protocol_fraction,
                "dataset": dataset if dataset is not None else grid_family(norm, grid),
                "dataset_from_grid": dataset is None and grid_family(norm, grid) is not None,
                "step_fitted": step_fraction is None, "rand_init": bool(rand_init),
                "clip_min": clip_min, "clip_max": clip_max, "seed": seed}
    device = model_device(model)
    _, rank = distributed_world()
    collector = SampleCollector(["label", "correct", *(f"robust@{k}" for k in range(len(grid)))], device,
                                sync=resolve_shard(shard))
    batches = evaluation_batches(data, device, batch_size=batch_size, max_samples=max_samples, shard=shard,
                                 progress=progress, desc=f"PGD {norm}", box=(clip_min, clip_max))
    timed = on_first_batch is not None
    run = PGDRun(model, norm, nb_iter, rand_init, clip_min, clip_max, capture)
    with torch.inference_mode(False), torch.no_grad(), model_mode(model, train=False):
        for b, (x, y, index) in enumerate(batches):
            columns = None if cache is None else cache.get(b, device)
            if columns is None:
                start = time.perf_counter()
                correct = model(x).argmax(dim=1) == y
                columns = {"label": y, "correct": correct}
                for k, eps in enumerate(grid):
                    seeds = [restart_seed(seed, k, li, r, b, rank)
                             for li in range(len(losses)) for r in range(restarts)]
                    columns[f"robust@{k}"] = worst_case_robust(
                        model, x, y, correct, norm, eps, nb_iter=nb_iter, restarts=restarts, losses=losses,
                        step_fraction=fraction, rand_init=rand_init, clip_min=clip_min, clip_max=clip_max,
                        seeds=seeds, run=run)
                if cache is not None:
                    cache.put(b, {"index": index, **columns})
                if timed and on_first_batch is not None:
                    on_first_batch(time.perf_counter() - start, int(x.shape[0]))
                    timed = False
            columns.pop("index", None)
            collector.update(index, **columns)
    return result_from_outcomes(collector.compute(), norm, grid, "pgd", settings)


def check_step_fraction(name: str, value: float) -> float:
    """``value`` as a float, or a ``ValueError`` naming ``name`` unless it is a finite number > 0."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value < float("inf")):
        raise ValueError(f"{name} must be a float > 0 (step size = {name} * eps) or None (a step fitted "
                         f"to nb_iter), got {value!r}")
    return float(value)
