"""One model's full robustness evaluation: the entry point behind ``mma-eval`` (and for notebooks).

:func:`evaluate_model` runs, on the same test points: the paper's PGD protocol over an eps grid
(:func:`robust_accuracy`), the per-sample margin estimates (:func:`estimate_margins`), the gradient-masking
sanity checks (:func:`gradient_masking_checks`) and, optionally, AutoAttack (:func:`autoattack_accuracy`).
:func:`mma_lightning.evaluation.write_report` turns one or several :class:`ModelEvaluation` into
``results.json``, a Markdown table and the plots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from torch import nn

from mma_lightning.evaluation.autoattack import autoattack_accuracy, load_torchattacks
from mma_lightning.evaluation.batches import EvalData
from mma_lightning.evaluation.identity import data_identity, model_identity
from mma_lightning.evaluation.margins import MarginEstimates, MarginSummary, estimate_margins
from mma_lightning.evaluation.protocol import (
    DEFAULT_STEP_FRACTION,
    LOSSES,
    PGD_STEPS,
    RESTARTS_PER_LOSS,
    check_eps_grid,
)
from mma_lightning.evaluation.robustness import RobustnessResult, robust_accuracy
from mma_lightning.evaluation.sanity import SanityReport, gradient_masking_checks


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
    """

    name: str
    pgd: RobustnessResult
    margins: MarginEstimates | None = None
    sanity: SanityReport | None = None
    autoattack: RobustnessResult | None = None
    model_info: dict[str, Any] = field(default_factory=dict)
    data_info: dict[str, Any] = field(default_factory=dict)

    @property
    def margin_summary(self) -> MarginSummary | None:
        """Mean, quartiles and fraction of margins above each eps of the PGD grid (``None``: no margins)."""
        return None if self.margins is None else self.margins.summary(self.pgd.eps_grid)

    def to_dict(self) -> dict[str, Any]:
        """Every number with its settings, the model's and the data's identity (JSON-ready)."""
        return {
            "name": self.name,
            "model": dict(self.model_info),
            "data": dict(self.data_info),
            "pgd": self.pgd.to_dict(),
            "margins": None if self.margins is None else {
                **self.margins.to_dict(), "summary": self.margins.summary(self.pgd.eps_grid).to_dict()},
            "sanity": None if self.sanity is None else self.sanity.to_dict(),
            "autoattack": None if self.autoattack is None else self.autoattack.to_dict(),
        }


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
    step_fraction: float = DEFAULT_STEP_FRACTION,
    rand_init: bool = True,
    clip_min: float | None = 0.0,
    clip_max: float | None = 1.0,
    seed: int = 0,
    margins: bool = True,
    margin_max_eps: float | None = None,
    margin_nb_iter: int = 100,
    margin_search_steps: int = 20,
    margin_restarts: int = 1,
    sanity: bool = True,
    probe_samples: int = 256,
    autoattack: bool = False,
    autoattack_version: str = "standard",
    batch_size: int = 256,
    max_samples: int | None = None,
    shard: bool | None = None,
    progress: bool = True,
    model_info: Mapping[str, Any] | None = None,
    data_info: Mapping[str, Any] | None = None,
) -> ModelEvaluation:
    """Evaluate one model on ``data``: PGD protocol, margins, sanity checks and optionally AutoAttack.

    The PGD arguments are those of :func:`robust_accuracy` (defaults: the paper's protocol). Margins are
    searched over ``[0, margin_max_eps]`` (default twice the largest eps) from every eps of the grid, with the
    CE and CW losses (:func:`estimate_margins`); their summary uses the eps grid as thresholds. ``sanity``
    runs :func:`gradient_masking_checks` on the first ``probe_samples`` points. ``autoattack`` needs the
    optional extra (``pip install "mma-lightning[autoattack]"``). ``model_info`` / ``data_info`` (e.g. the
    checkpoint path, dataset and split) are stored with computed fingerprints of the weights and the points.
    """
    grid = check_eps_grid(eps_grid)
    if autoattack:
        load_torchattacks()  # fail before the long PGD run when the extra is missing
    common: dict[str, Any] = {"batch_size": batch_size, "max_samples": max_samples, "shard": shard,
                              "progress": progress}
    box = {"clip_min": clip_min, "clip_max": clip_max}
    pgd = robust_accuracy(model, data, norm, grid, nb_iter=nb_iter, restarts=restarts, losses=losses,
                          step_fraction=step_fraction, rand_init=rand_init, seed=seed, **box, **common)
    evaluation = ModelEvaluation(
        name=name, pgd=pgd,
        model_info={**(model_info or {}), **model_identity(model)},
        data_info={**(data_info or {}), **data_identity(pgd.index, pgd.label)},
    )
    if margins:
        max_eps = 2 * grid[-1] if margin_max_eps is None else margin_max_eps
        evaluation.margins = estimate_margins(
            model, data, norm, max_eps, init_eps=[e for e in grid if e <= max_eps] or None,
            nb_iter=margin_nb_iter, search_steps=margin_search_steps, losses=losses, restarts=margin_restarts,
            rand_init=rand_init, seed=seed, **box, **common)
    if sanity:
        evaluation.sanity = gradient_masking_checks(model, data, pgd, probe_samples=probe_samples,
                                                    batch_size=batch_size, shard=shard, progress=progress)
    if autoattack:
        evaluation.autoattack = autoattack_accuracy(model, data, norm, grid, version=autoattack_version,
                                                    seed=seed, **common)
    return evaluation
