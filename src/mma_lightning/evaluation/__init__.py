"""Robustness evaluation in plain PyTorch + torchmetrics (usable from a notebook, no Lightning or Hydra).

The MMA paper's protocol (Ding et al., ICLR 2020; docs/mma-algorithm.md "Evaluation protocol"): whitebox
PGD over an eps grid, 100 steps, 5 restarts with each of the CE and CW losses, worst case per sample,
AvgRobAcc and AvgAcc; plus per-sample margin estimates, gradient-masking sanity flags, optional AutoAttack,
the report (``results.json``, Markdown table, plots) and a training-time callback.

Example:
    >>> from mma_lightning.evaluation import MNIST_LINF_EPS, evaluate_model, write_report  # doctest: +SKIP
    >>> ev = evaluate_model(model, (x, y), "linf", MNIST_LINF_EPS, name="MMA-0.45")  # doctest: +SKIP
    >>> write_report([ev], "eval_out")  # doctest: +SKIP
"""

from mma_lightning.evaluation.autoattack import AUTOATTACK_VERSIONS, autoattack_accuracy
from mma_lightning.evaluation.batches import EvalData, evaluation_batches
from mma_lightning.evaluation.callbacks import RobustnessCallback
from mma_lightning.evaluation.collect import SampleCollector
from mma_lightning.evaluation.evaluate import ModelEvaluation, evaluate_model
from mma_lightning.evaluation.identity import data_identity, model_identity
from mma_lightning.evaluation.margin_plots import MarginPlots
from mma_lightning.evaluation.margins import (
    MarginEstimates,
    MarginSummary,
    estimate_margins,
    summarize_margins,
)
from mma_lightning.evaluation.plots import margin_histogram_figure, robust_accuracy_figure
from mma_lightning.evaluation.protocol import (
    CIFAR10_L2_EPS,
    CIFAR10_LINF_EPS,
    DEFAULT_STEP_FRACTION,
    EPS_GRIDS,
    LOSSES,
    MNIST_L2_EPS,
    MNIST_LINF_EPS,
    MNIST_LINF_STEP_FRACTION,
    PGD_STEPS,
    RESTARTS_PER_LOSS,
    STEP_SCALE,
    eps_grid,
    fit_step_fraction,
    format_eps,
    grid_name,
    protocol_step_fraction,
)
from mma_lightning.evaluation.report import ReportPaths, markdown_report, results_document, write_report
from mma_lightning.evaluation.robustness import RobustnessResult, robust_accuracy, worst_case_robust
from mma_lightning.evaluation.sanity import (
    SanityCheck,
    SanityReport,
    check_monotone_in_eps,
    gradient_masking_checks,
)
from mma_lightning.evaluation.sharding import ShardSampler

__all__ = [
    "AUTOATTACK_VERSIONS",
    "CIFAR10_L2_EPS",
    "CIFAR10_LINF_EPS",
    "DEFAULT_STEP_FRACTION",
    "EPS_GRIDS",
    "LOSSES",
    "MNIST_L2_EPS",
    "MNIST_LINF_EPS",
    "MNIST_LINF_STEP_FRACTION",
    "PGD_STEPS",
    "RESTARTS_PER_LOSS",
    "STEP_SCALE",
    "EvalData",
    "MarginEstimates",
    "MarginPlots",
    "MarginSummary",
    "ModelEvaluation",
    "ReportPaths",
    "RobustnessCallback",
    "RobustnessResult",
    "SampleCollector",
    "SanityCheck",
    "SanityReport",
    "ShardSampler",
    "autoattack_accuracy",
    "check_monotone_in_eps",
    "data_identity",
    "eps_grid",
    "estimate_margins",
    "evaluate_model",
    "evaluation_batches",
    "fit_step_fraction",
    "format_eps",
    "gradient_masking_checks",
    "grid_name",
    "margin_histogram_figure",
    "markdown_report",
    "model_identity",
    "protocol_step_fraction",
    "results_document",
    "robust_accuracy",
    "robust_accuracy_figure",
    "summarize_margins",
    "worst_case_robust",
    "write_report",
]
