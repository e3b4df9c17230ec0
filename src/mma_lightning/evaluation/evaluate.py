"""One model's full robustness evaluation: the entry point behind ``mma-eval`` (and for notebooks).

:func:`evaluate_model` runs, on the same test points: the paper's PGD protocol over an eps grid
(:func:`robust_accuracy`), the per-sample margin estimates (:func:`estimate_margins`), the gradient-masking
sanity checks (:func:`gradient_masking_checks`) and, optionally, AutoAttack (:func:`autoattack_accuracy`).
:func:`mma_lightning.evaluation.write_report` turns one or several :class:`ModelEvaluation` into
``results.json``, a Markdown table and the plots.

After the first PGD batch the whole evaluation's time is estimated and logged (a warning, pointing to the
cheap protocol, when it is long). With ``cache_dir`` the evaluation is resumable: an interrupted run started
again reuses the finished batches, and a finished evaluation is returned from the cache.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mma_lightning.attacks.margin import SEARCHES
from mma_lightning.evaluation.autoattack import AUTOATTACK_VERSIONS, autoattack_accuracy, load_torchattacks
from mma_lightning.evaluation.batches import EvalData, check_positive_int, data_size, model_device
from mma_lightning.evaluation.cache import cache_key, data_fingerprint, save_atomically, stage_cache
from mma_lightning.evaluation.identity import data_identity, model_identity
from mma_lightning.evaluation.margins import MarginEstimates, MarginSummary, estimate_margins
from mma_lightning.evaluation.protocol import (
    LOSSES,
    PGD_STEPS,
    RESTARTS_PER_LOSS,
    check_eps_grid,
    is_paper_protocol,
)
from mma_lightning.evaluation.robustness import (
    RobustnessResult,
    check_losses,
    check_step_fraction,
    robust_accuracy,
)
from mma_lightning.evaluation.sanity import (
    MAX_PROBE_RADII,
    REFERENCES,
    SanityReport,
    gradient_masking_checks,
)
from mma_lightning.evaluation.sharding import distributed_world

log = logging.getLogger(__name__)

LONG_EVALUATION_S = 600.0
"""An evaluation estimated to take longer than this (seconds) is announced as a warning that names the cheap
protocol."""
FAST_HINT = ("for a quick look: mma-eval ... evaluation=fast (Python: evaluate_model(..., nb_iter=20, "
             "restarts=1, margin_nb_iter=20, margin_search_steps=10, max_samples=1000))")


@dataclass
class ModelEvaluation:
    """Everything measured on one model: PGD robust accuracy, margins, sanity flags, AutoAttack (optional).

    Attributes:
        name: the model's label in tables and plots (e.g. ``"MMA-0.45"`` or the checkpoint's name).
        pgd: robust accuracy under the paper's PGD protocol, with per-sample outcomes.
        margins: per-sample margin estimates (summarised over the eps grid by :attr:`margin_summary`).
        sanity: the gradient-masking checks of ``pgd``.
        autoattack: robust accuracy under AutoAttack.
        model_info: identity of the model (class, weights' hash, checkpoint path, ...).
        data_info: identity of the test points (dataset, split, count, hash of indices and labels, ...).
        protocol: the protocol's name: ``"paper"`` when the PGD settings are the release script's, else the
            name it was given (e.g. ``"fast"``) or ``"custom"``.
    """

    name: str
    pgd: RobustnessResult
    margins: MarginEstimates | None = None
    sanity: SanityReport | None = None
    autoattack: RobustnessResult | None = None
    model_info: dict[str, Any] = field(default_factory=dict)
    data_info: dict[str, Any] = field(default_factory=dict)
    protocol: str = "custom"

    @property
    def flagged(self) -> bool:
        """True when a sanity check failed: the robust accuracy is then likely overestimated."""
        return self.sanity is not None and not self.sanity.passed

    @property
    def margin_summary(self) -> MarginSummary | None:
        """Mean, quartiles and fraction of margins above each eps of the PGD grid (``None``: no margins)."""
        return None if self.margins is None else self.margins.summary(self.pgd.eps_grid)

    def to_dict(self) -> dict[str, Any]:
        """Every number with its settings, the model's and the data's identity (JSON-ready)."""
        return {
            "name": self.name,
            "protocol": self.protocol,
            "flagged": self.flagged,
            "model": dict(self.model_info),
            "data": dict(self.data_info),
            "pgd": self.pgd.to_dict(),
            "margins": None if self.margins is None else {
                **self.margins.to_dict(), "summary": self.margins.summary(self.pgd.eps_grid).to_dict()},
            "sanity": None if self.sanity is None else self.sanity.to_dict(),
            "autoattack": None if self.autoattack is None else self.autoattack.to_dict(),
        }


def protocol_name(settings: Mapping[str, Any], norm: str, given: str | None) -> str:
    """``"paper"`` for the release script's PGD settings on the paper's data and norm (:func:`is_paper_protocol`),
    else ``given`` or ``"custom"`` (a ``given`` ``"paper"`` that the settings do not match is ``"custom"``)."""
    if is_paper_protocol(settings, norm):
        return "paper"
    return "custom" if given in (None, "paper") else str(given)


def format_duration(seconds: float) -> str:
    """A readable duration: ``42 s``, ``12 min``, ``3.4 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class CostModel:
    """Forward + backward passes per test point of each stage, to scale the timed first PGD batch to the
    whole evaluation (PGD stops attacking broken points, so this bounds it from above)."""

    pgd: float
    margins: float
    sanity: float
    probe_samples: int

    def estimate(self, seconds: float, batch: int, num_points: int) -> float:
        """Seconds for the whole evaluation of ``num_points`` when the first PGD batch of ``batch`` points
        took ``seconds``."""
        per_unit = seconds / (max(batch, 1) * self.pgd)
        probe = min(self.probe_samples, num_points)
        return per_unit * (num_points * (self.pgd + self.margins) + probe * self.sanity)


class TimeEstimate:
    """The ``on_first_batch`` hook of the PGD stage: logs how long the whole evaluation will take."""

    def __init__(self, name: str, cost: CostModel, num_points: int | None, fast: bool) -> None:
        self.name, self.cost, self.num_points, self.fast = name, cost, num_points, fast
        self.seconds: float | None = None

    def __call__(self, seconds: float, batch: int) -> None:
        """Estimate from the first attacked batch (``seconds`` for ``batch`` points) and log it."""
        if distributed_world()[1] != 0:
            return
        if self.num_points is None:
            log.info("%s: the first PGD batch (%d points) took %.1f s", self.name, batch, seconds)
            return
        self.seconds = self.cost.estimate(seconds, batch, self.num_points)
        text = (f"{self.name}: the first PGD batch ({batch} points) took {seconds:.1f} s; the whole "
                f"evaluation ({self.num_points} points) will take about {format_duration(self.seconds)}")
        if self.seconds > LONG_EVALUATION_S and not self.fast:
            log.warning("%s; %s", text, FAST_HINT)
        else:
            log.info(text)


def check_evaluation_settings(settings: Mapping[str, Any]) -> None:
    """``ValueError`` naming the first bad setting of :func:`evaluate_model` (by its parameter name) and what
    is allowed; unknown names are refused too. Checked before any work, by ``evaluate_model`` and by
    ``mma-eval`` for its whole config."""
    allowed = [name for name in inspect.signature(evaluate_model).parameters
               if name not in ("model", "data", "norm", "eps_grid")]
    unknown = sorted(set(settings) - set(allowed) - {"norm", "eps_grid"})
    if unknown:
        raise ValueError(f"{unknown[0]} is not a setting of evaluate_model; the settings are {allowed}")
    for name in ("nb_iter", "restarts", "margin_nb_iter", "margin_search_steps", "margin_restarts",
                 "probe_samples", "probe_radii", "batch_size"):
        if name in settings:
            check_positive_int(name, settings[name])
    if "max_samples" in settings:
        check_positive_int("max_samples", settings["max_samples"], optional=True)
    for name in ("step_fraction", "protocol_step_fraction"):
        if settings.get(name) is not None:
            check_step_fraction(name, settings[name])
    if "losses" in settings:
        check_losses(settings["losses"])
    if settings.get("margin_max_eps") is not None:
        value = settings["margin_max_eps"]
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value < float("inf")):
            raise ValueError(f"margin_max_eps must be a finite float > 0 or None (twice the largest eps), "
                             f"got {value!r}")
    for name in ("rand_init", "margins", "sanity", "autoattack", "progress"):
        if name in settings and not isinstance(settings[name], bool):
            raise ValueError(f"{name} must be true or false, got {settings[name]!r}")
    if "search" in settings and settings["search"] not in SEARCHES:
        raise ValueError(f"search must be one of {list(SEARCHES)}, got {settings['search']!r}")
    if "probe_reference" in settings and settings["probe_reference"] not in REFERENCES:
        raise ValueError(f"probe_reference must be one of {list(REFERENCES)}, got {settings['probe_reference']!r}")
    if "autoattack_version" in settings and settings["autoattack_version"] not in AUTOATTACK_VERSIONS:
        raise ValueError(f"autoattack_version must be one of {list(AUTOATTACK_VERSIONS)}, "
                         f"got {settings['autoattack_version']!r}")
    lo, hi = settings.get("clip_min", 0.0), settings.get("clip_max", 1.0)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi))
    if not ((lo is None and hi is None) or (numbers and lo < hi)):
        raise ValueError("clip_min and clip_max must both be None (no data box) or numbers with clip_min < "
                         f"clip_max, got {lo!r} and {hi!r}")
    if settings.get("dataset") is not None and (not isinstance(settings["dataset"], str) or not settings["dataset"]):
        raise ValueError(f"dataset must be the data's name (e.g. 'mnist', 'fashion-mnist', 'cifar10') or None, "
                         f"got {settings['dataset']!r}")
    if settings.get("protocol") is not None and not isinstance(settings["protocol"], str):
        raise ValueError(f"protocol must be a name (str) or None, got {settings['protocol']!r}")


def evaluate_model(
    model: nn.Module,
    data: EvalData,
    norm: str,
    eps_grid: Sequence[float],
    *,
    name: str = "model",
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
    margins: bool = True,
    margin_max_eps: float | None = None,
    margin_nb_iter: int = 100,
    margin_search_steps: int = 20,
    margin_restarts: int = 1,
    search: str = "bisection",
    sanity: bool = True,
    probe_samples: int = 256,
    probe_radii: int = MAX_PROBE_RADII,
    probe_reference: str = "pgd",
    autoattack: bool = False,
    autoattack_version: str = "standard",
    batch_size: int = 256,
    max_samples: int | None = None,
    shard: bool | None = None,
    progress: bool = True,
    protocol: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    model_info: Mapping[str, Any] | None = None,
    data_info: Mapping[str, Any] | None = None,
    capture: bool | Mapping[str, Any] | None = None,
) -> ModelEvaluation:
    """Evaluate one model on ``data``: PGD protocol, margins, sanity checks and optionally AutoAttack.

    The PGD arguments are those of :func:`robust_accuracy` (defaults: the paper's protocol; the step follows
    the grid's protocol, ``eps / 40`` on the MNIST Linf grid, fitted to ``nb_iter`` when that is not 100).
    Margins are searched over ``[0, margin_max_eps]`` (default twice the largest eps) from every eps of the
    grid, with the same losses (:func:`estimate_margins`, margin search ``search``: ``"bisection"`` or
    ``"refined"``); their summary uses the eps grid as thresholds. ``sanity`` runs
    :func:`gradient_masking_checks` on the first ``probe_samples`` points at up to ``probe_radii`` radii, with the
    reference attack ``probe_reference`` (``"pgd"``, or ``"apgd"`` with the optional extra); the report gives the
    probes' time next to the evaluation's (``sanity.settings["evaluation_seconds"]``). ``autoattack`` needs the optional
    extra (``pip install "mma-lightning[autoattack]"``). ``dataset`` names the data (``"mnist"``,
    ``"fashion-mnist"``, ``"cifar10"``, ...): the protocol is ``"paper"`` only when the data, norm, steps and
    step sizes are the paper's (:func:`~mma_lightning.evaluation.protocol.is_paper_protocol`), and ``protocol``
    names it otherwise (default ``"custom"``; the report spells out the settings). ``cache_dir`` makes the evaluation
    resumable (module docstring). ``model_info`` / ``data_info`` (e.g. the checkpoint path, dataset and
    split) are stored with computed fingerprints of the weights and the points. ``capture`` runs the PGD and
    margin attacks' model passes as captured graphs (CUDA graphs; ``True`` or ``torch.compile`` arguments;
    :class:`~mma_lightning.capture.CapturedModel`); ``None``: on when the model is on a CUDA device.
    """
    check_evaluation_settings({name: value for name, value in locals().items()
                               if name not in ("model", "data", "norm", "eps_grid")})
    grid = check_eps_grid(eps_grid)
    losses = check_losses(losses)
    if autoattack or (sanity and probe_reference == "apgd"):
        load_torchattacks()  # fail before the long PGD run when the extra is missing
    if capture is None:
        capture = model_device(model).type == "cuda"
    common: dict[str, Any] = {"batch_size": batch_size, "max_samples": max_samples, "shard": shard,
                              "progress": progress}
    box = {"clip_min": clip_min, "clip_max": clip_max}
    pgd_args: dict[str, Any] = {"nb_iter": nb_iter, "restarts": restarts, "losses": losses,
                                "step_fraction": step_fraction, "rand_init": rand_init, "seed": seed,
                                "protocol_step_fraction": protocol_step_fraction, **box}
    if dataset is not None:  # only when given: the cache keys of evaluations without it stay the same
        pgd_args["dataset"] = dataset
    max_eps = 2 * grid[-1] if margin_max_eps is None else margin_max_eps
    margin_args: dict[str, Any] = {"init_eps": [e for e in grid if e <= max_eps] or None,
                                   "nb_iter": margin_nb_iter, "search_steps": margin_search_steps,
                                   "losses": losses, "restarts": margin_restarts, "rand_init": rand_init,
                                   "seed": seed, "search": search, **box}
    identity = model_identity(model)
    caches: dict[str, Any] = {"pgd": None, "margins": None}
    finished: Path | None = None
    if cache_dir is not None:
        fingerprint = data_fingerprint(data, model_device(model), batch_size=batch_size,
                                       max_samples=max_samples)
        key = {"model": identity["state_sha256"], "data": fingerprint, "norm": norm, "grid": list(grid),
               "batch_size": batch_size}
        everything = {**key, "pgd": pgd_args, "margins": margins and margin_args, "sanity": sanity,
                      "probe_samples": probe_samples, "probe_radii": probe_radii,
                      "probe_reference": probe_reference, "autoattack": autoattack and autoattack_version,
                      "name": name, "protocol": protocol, "model_info": dict(model_info or {}),
                      "data_info": dict(data_info or {})}
        finished = Path(cache_dir) / f"evaluation-{cache_key(**everything)[:32]}.pt"
        if finished.is_file():
            log.info("%s: finished before with the same model, data and settings: reusing %s", name, finished)
            return torch.load(finished, map_location="cpu", weights_only=False)
        caches = {"pgd": stage_cache(cache_dir, "pgd", **key, settings=pgd_args),
                  "margins": stage_cache(cache_dir, "margins", **key, max_eps=max_eps, settings=margin_args)}
        num_points: int | None = fingerprint["num_samples"]
    else:
        num_points = data_size(data, max_samples)

    passes = len(losses) * restarts
    cost = CostModel(
        pgd=len(grid) * passes * (nb_iter + 1),
        margins=(len(margin_args["init_eps"] or [None]) * len(losses) * margin_restarts
                 * (margin_nb_iter + margin_search_steps + 2)) if margins else 0.0,
        # the probes: the reference (1 restart per loss, 100 steps) at up to probe_radii radii, and the base
        # attack at the unbounded eps
        sanity=(probe_radii * len(LOSSES) * (PGD_STEPS + 1) + passes * (nb_iter + 1)) if sanity else 0.0,
        probe_samples=probe_samples)
    timer = TimeEstimate(name, cost, num_points, fast=protocol == "fast")
    start = time.perf_counter()
    pgd = robust_accuracy(model, data, norm, grid, **pgd_args, **common, cache=caches["pgd"],
                          on_first_batch=timer, capture=capture)
    evaluation = ModelEvaluation(
        name=name, pgd=pgd,
        model_info={**(model_info or {}), **identity},
        data_info={**(data_info or {}), **data_identity(pgd.index, pgd.label)},
        protocol=protocol_name(pgd.settings, pgd.norm, protocol),
    )
    if margins:
        evaluation.margins = estimate_margins(model, data, norm, max_eps, **margin_args, **common,
                                              cache=caches["margins"], capture=capture)
    if autoattack:
        evaluation.autoattack = autoattack_accuracy(model, data, norm, grid, version=autoattack_version,
                                                    seed=seed, **common)
    seconds = time.perf_counter() - start  # the evaluation proper, which the probes are a fraction of
    if sanity:
        evaluation.sanity = gradient_masking_checks(model, data, pgd, probe_samples=probe_samples,
                                                    max_probe_radii=probe_radii, reference=probe_reference, batch_size=batch_size, shard=shard,
                                                    progress=progress)
        evaluation.sanity.settings["evaluation_seconds"] = seconds
    if finished is not None and distributed_world()[1] == 0:
        save_atomically(evaluation, finished)
    return evaluation
