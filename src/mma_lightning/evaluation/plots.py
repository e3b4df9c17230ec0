"""The two evaluation figures: robust accuracy vs eps (one curve per model) and the margin histogram.

Both are plain ``matplotlib.figure.Figure`` objects drawn without pyplot (no global figure state, no GUI
backend): save them with ``fig.savefig(...)`` (Agg) or log them with TensorBoard's ``add_figure``. The curve
plot is the paper's robustness-vs-eps comparison of training methods (Ding et al., ICLR 2020, Fig. 3); the
histogram shows the distribution of margins that MMA training maximises.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from mma_lightning.evaluation.margins import MarginEstimates
from mma_lightning.evaluation.protocol import format_eps
from mma_lightning.evaluation.robustness import RobustnessResult

NORM_LABELS = {"linf": "L∞", "l2": "L2"}
HISTOGRAM_BINS = 40
PANEL_WIDTH = 7.0  # inches per norm panel
WRAP = 95  # characters per line of the legend and the protocol line, at the small font size, per panel


def _wrap(text: str, panels: int) -> str:
    return "\n".join(textwrap.fill(line, WRAP * panels) for line in text.split("\n"))


def _axes_by_norm(fig: Figure, norms: Sequence[str]) -> dict[str, Axes]:
    axes = fig.subplots(1, len(norms), squeeze=False)[0]
    return dict(zip(norms, axes))


def _sorted_norms(items: Sequence[str]) -> list[str]:
    return sorted(set(items), key=lambda n: (n != "linf", n))


def _finish(fig: Figure, axes: Mapping[str, Axes], subtitle: str | None) -> None:
    """One legend for the figure, outside the data (below the panels), and the protocol line on top."""
    handles, labels = [], []
    for ax in axes.values():
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    panels = len(axes)
    if handles:
        fig.legend(handles, [_wrap(lab, panels) for lab in labels], loc="outside lower center",
                   fontsize="small", ncols=1, frameon=False)
    if subtitle:
        fig.suptitle(_wrap(subtitle, panels), fontsize="small")


def robust_accuracy_figure(curves: Mapping[str, RobustnessResult], title: str | None = None,
                           subtitle: str | None = None) -> Figure:
    """Robust accuracy (%) vs eps, one curve per entry (clean accuracy at eps = 0); a panel per norm.

    AutoAttack results (``attack == "autoattack"``) are drawn dashed, so PGD and AutoAttack can share a plot.
    The legend sits below the panels (never over a curve); the y-axis spans 0 to just above the highest
    accuracy; ``subtitle`` (the protocol and the test points) goes on top.
    """
    if not curves:
        raise ValueError("curves must hold at least one result")
    norms = _sorted_norms([r.norm for r in curves.values()])
    fig = Figure(figsize=(PANEL_WIDTH * len(norms), 4.6 + 0.3 * len(curves)), layout="constrained")
    axes = _axes_by_norm(fig, norms)
    for name, res in curves.items():
        ax = axes[res.norm]
        x = [0.0, *res.eps_grid]
        y = [100 * res.clean_accuracy, *(100 * a for a in res.robust_accuracy)]
        style = "--" if res.attack == "autoattack" else "-"
        what = "AutoAttack" if res.attack == "autoattack" else "PGD"
        ax.plot(x, y, style, marker="o",
                label=f"{name}: {what}, clean {100 * res.clean_accuracy:.1f}%, AvgRobAcc "
                      f"{100 * res.avg_robust_accuracy:.1f}% on {res.num_samples} test points")
    for norm, ax in axes.items():
        shown = [r for r in curves.values() if r.norm == norm]
        ticks = sorted({e for r in shown for e in (0.0, *r.eps_grid)})
        ax.set_xticks(ticks, ["clean" if t == 0 else format_eps(t) for t in ticks],
                      rotation=45 if len(ticks) > 6 else 0)
        pad = 0.04 * ticks[-1]
        ax.set_xlim(-pad, ticks[-1] + pad)
        top = max(100 * max(r.clean_accuracy, *r.robust_accuracy) for r in shown)
        ax.set_ylim(0, min(100.0, top + 5.0) if top > 0 else 5.0)
        ax.set_xlabel(f"eps ({NORM_LABELS.get(norm, norm)})")
        ax.set_ylabel("robust accuracy (% of all test points)")
        ax.grid(alpha=0.3)
        ax.set_title(title or f"Robust accuracy vs eps ({NORM_LABELS.get(norm, norm)})")
    _finish(fig, axes, subtitle)
    return fig


def margin_histogram_figure(margins: Mapping[str, MarginEstimates], thresholds: Sequence[float] = (),
                            title: str | None = None, subtitle: str | None = None) -> Figure:
    """Histogram of the margin estimates of the correctly classified points, one outline per entry; dotted
    lines at ``thresholds``.

    A misclassified point has margin 0 and is not drawn (its count is in the legend). A point without an
    adversarial example within ``max_eps`` is drawn at ``max_eps`` ("not found": its margin is at least
    that). The legend (below the panels) gives the mean and median over exactly the drawn points; the x-axis
    spans 0 to just past the largest drawn margin.
    """
    if not margins:
        raise ValueError("margins must hold at least one entry")
    norms = _sorted_norms([m.norm for m in margins.values()])
    fig = Figure(figsize=(PANEL_WIDTH * len(norms), 4.6 + 0.5 * len(margins)), layout="constrained")
    axes = _axes_by_norm(fig, norms)
    several = len(margins) > 1
    tops = {norm: 0.0 for norm in norms}
    for est in margins.values():
        correct = est.eps[est.correct]
        if correct.numel():
            tops[est.norm] = max(tops[est.norm], float(correct.max()))
    for name, est in margins.items():
        ax = axes[est.norm]
        top = tops[est.norm] or est.max_eps
        bins = np.linspace(0.0, top * (1 + 1 / HISTOGRAM_BINS), HISTOGRAM_BINS + 2)
        drawn = est.eps[est.correct].double().numpy()
        wrong = int((~est.correct).sum())
        not_found = int((est.correct & ~est.found).sum())
        stats = (f"mean {drawn.mean():.3g}, median {np.median(drawn):.3g}" if drawn.size else "none")
        label = (f"{name}: {drawn.size} correctly classified points ({stats}); {wrong} misclassified "
                 f"(margin 0, not drawn); {not_found} not found within {est.max_eps:.3g} (drawn there)")
        ax.hist(drawn, bins=bins.tolist(), histtype="step" if several else "stepfilled", alpha=1.0 if several else 0.6,
                linewidth=1.5, label=label)
    for norm, ax in axes.items():
        top = tops[norm] or max(m.max_eps for m in margins.values() if m.norm == norm)
        for t in thresholds:
            if t <= top * 1.05:
                ax.axvline(t, color="grey", linestyle=":", linewidth=1)
        ax.set_xlim(0, top * (1 + 2 / HISTOGRAM_BINS))
        ax.set_xlabel(f"margin estimate ({NORM_LABELS.get(norm, norm)}); dotted: the eps grid")
        ax.set_ylabel("correctly classified test points")
        ax.grid(alpha=0.3)
        ax.set_title(title or f"Per-sample margins ({NORM_LABELS.get(norm, norm)})")
    _finish(fig, axes, subtitle)
    return fig
