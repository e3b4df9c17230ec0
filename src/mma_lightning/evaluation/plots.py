"""The two evaluation figures: robust accuracy vs eps (one curve per model) and the margin histogram.

Both are plain ``matplotlib.figure.Figure`` objects drawn without pyplot (no global figure state, no GUI
backend): save them with ``fig.savefig(...)`` (Agg) or log them with TensorBoard's ``add_figure``. The curve
plot is the paper's robustness-vs-eps comparison of training methods (Ding et al., ICLR 2020, Fig. 3); the
histogram shows the distribution of margins that MMA training maximises.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from mma_lightning.evaluation.margins import MarginEstimates
from mma_lightning.evaluation.protocol import format_eps
from mma_lightning.evaluation.robustness import RobustnessResult

NORM_LABELS = {"linf": "L∞", "l2": "L2"}
HISTOGRAM_BINS = 40


def _axes_by_norm(fig: Figure, norms: Sequence[str]) -> dict[str, Axes]:
    axes = fig.subplots(1, len(norms), squeeze=False)[0]
    return dict(zip(norms, axes))


def _sorted_norms(items: Sequence[str]) -> list[str]:
    return sorted(set(items), key=lambda n: (n != "linf", n))


def robust_accuracy_figure(curves: Mapping[str, RobustnessResult], title: str | None = None) -> Figure:
    """Robust accuracy (%) vs eps, one curve per entry (clean accuracy at eps = 0); a panel per norm.

    AutoAttack results (``attack == "autoattack"``) are drawn dashed, so PGD and AutoAttack can share a plot.
    """
    if not curves:
        raise ValueError("curves must hold at least one result")
    norms = _sorted_norms([r.norm for r in curves.values()])
    fig = Figure(figsize=(5.5 * len(norms), 4.0), layout="constrained")
    axes = _axes_by_norm(fig, norms)
    for name, res in curves.items():
        ax = axes[res.norm]
        x = [0.0, *res.eps_grid]
        y = [100 * res.clean_accuracy, *(100 * a for a in res.robust_accuracy)]
        style = "--" if res.attack == "autoattack" else "-"
        ax.plot(x, y, style, marker="o", label=f"{name} (AvgRobAcc {100 * res.avg_robust_accuracy:.1f}%)")
    for norm, ax in axes.items():
        ticks = sorted({e for r in curves.values() if r.norm == norm for e in (0.0, *r.eps_grid)})
        ax.set_xticks(ticks, ["clean" if t == 0 else format_eps(t) for t in ticks],
                      rotation=45 if len(ticks) > 6 else 0)
        ax.set_ylim(0, 100)
        ax.set_xlabel(f"eps ({NORM_LABELS.get(norm, norm)})")
        ax.set_ylabel("robust accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        ax.set_title(title or f"Robust accuracy vs eps ({NORM_LABELS.get(norm, norm)})")
    return fig


def margin_histogram_figure(margins: Mapping[str, MarginEstimates], thresholds: Sequence[float] = (),
                            title: str | None = None) -> Figure:
    """Histogram of per-sample margin estimates, one outline per entry; dotted lines at ``thresholds``.

    Only correctly classified points are drawn (a misclassified point's margin is 0; their number is in the
    legend, the mean there is over all points as in the tables); points without an adversarial example within
    ``max_eps`` sit at ``max_eps`` and are counted in the legend as "not found".
    """
    if not margins:
        raise ValueError("margins must hold at least one entry")
    norms = _sorted_norms([m.norm for m in margins.values()])
    fig = Figure(figsize=(5.5 * len(norms), 4.0), layout="constrained")
    axes = _axes_by_norm(fig, norms)
    several = len(margins) > 1
    for name, est in margins.items():
        ax = axes[est.norm]
        top = max(m.max_eps for m in margins.values() if m.norm == est.norm)
        bins = np.linspace(0.0, top, HISTOGRAM_BINS + 1)
        values = est.eps.double().numpy()
        drawn = values[est.correct.numpy()]
        wrong, not_found = int((~est.correct).sum()), int((~est.found).sum())
        label = f"{name} (mean {values.mean():.3g}; {wrong} misclassified, {not_found} not found)"
        ax.hist(drawn, bins=bins, histtype="step" if several else "stepfilled", alpha=1.0 if several else 0.6,
                linewidth=1.5, label=label)
    for norm, ax in axes.items():
        for t in thresholds:
            ax.axvline(t, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel(f"margin estimate ({NORM_LABELS.get(norm, norm)})")
        ax.set_ylabel("correctly classified test points")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        ax.set_title(title or f"Per-sample margins ({NORM_LABELS.get(norm, norm)})")
    return fig
