"""The evaluation report: ``results.json``, a Markdown table like the paper's, and the two PNG plots.

:func:`write_report` takes one or several :class:`ModelEvaluation` (several checkpoints give one comparison
table and one curve per model) and writes into ``out_dir``:

- ``results.json``: every number with its settings, the model's and the data's identity, software versions
  and, when asked (``robustbench=``), each model's RobustBench ``model_info`` fields (:func:`robustbench_info`);
- ``results.md``: the paper's table (Ding et al., ICLR 2020, Tables 1-2: clean accuracy, AvgAcc, AvgRobAcc and
  robust accuracy per eps), margin summaries, AutoAttack numbers and the sanity flags;
- ``robust_accuracy.png`` (robust accuracy vs eps) and ``margins.png`` (histogram of per-sample margins).

Every file is written to a temporary file in ``out_dir`` and renamed into place, so a crash never leaves a
half-written report file.
"""

from __future__ import annotations

import io
import json
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from mma_lightning.evaluation.atomic import write_atomically
from mma_lightning.evaluation.evaluate import ModelEvaluation
from mma_lightning.evaluation.plots import margin_histogram_figure, robust_accuracy_figure
from mma_lightning.evaluation.protocol import (
    LOSSES,
    PGD_STEPS,
    RESTARTS_PER_LOSS,
    format_eps,
    not_paper_reasons,
)
from mma_lightning.evaluation.robustness import RobustnessResult

RESULTS_FORMAT = "mma-lightning/robustness-results"
RESULTS_FORMAT_VERSION = 1
RESULTS_JSON = "results.json"
TABLE_MARKDOWN = "results.md"
ROBUST_ACCURACY_PNG = "robust_accuracy.png"
MARGINS_PNG = "margins.png"
ROBUSTBENCH_FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                      "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "external", "footnote",
                      "unreliable")
"""The fields of RobustBench's ``model_info/<dataset>/<threat model>/<name>.json``, in its order."""
ROBUSTBENCH_MEASURED = ("dataset", "eps", "clean_acc", "autoattack_acc")
"""The fields :func:`robustbench_info` fills from the evaluation (the others are descriptive)."""
ROBUSTBENCH_DATASETS = {"CIFAR10": "cifar10", "CIFAR100": "cifar100", "MNIST": "mnist"}


@dataclass(frozen=True)
class ReportPaths:
    """Where :func:`write_report` wrote each file (``margins_png`` is ``None`` without margin estimates)."""

    results_json: Path
    table_markdown: Path
    robust_accuracy_png: Path
    margins_png: Path | None


def _software() -> dict[str, str]:
    import pytorch_lightning
    import torchmetrics

    import mma_lightning

    return {"mma_lightning": mma_lightning.__version__, "torch": torch.__version__,
            "torchmetrics": torchmetrics.__version__, "pytorch_lightning": pytorch_lightning.__version__,
            "python": platform.python_version()}


def flagged_checks(evaluations: Sequence[ModelEvaluation]) -> dict[str, list[str]]:
    """The failed sanity checks of each flagged evaluation, by name (empty: nothing flagged)."""
    return {e.name: e.sanity.failed for e in evaluations if e.sanity is not None and not e.sanity.passed}


def verdict_line(evaluations: Sequence[ModelEvaluation]) -> str:
    """One line for the whole report: which evaluations the sanity checks flagged, or that all passed."""
    flagged = flagged_checks(evaluations)
    if flagged:
        which = "; ".join(f"{name} ({', '.join(checks)})" for name, checks in flagged.items())
        return (f"FLAGGED by the sanity checks: {which}. The robust accuracy reported is likely "
                "overestimated; see the sanity checks in results.md")
    if all(e.sanity is None for e in evaluations):
        return "sanity checks not run: nothing vouches for the strength of the attack"
    unchecked = [e.name for e in evaluations if e.sanity is None]
    tail = f" (not run for {', '.join(unchecked)})" if unchecked else ""
    return f"all sanity checks passed{tail}"


def eps_index(grid: Sequence[float], eps: float) -> int | None:
    """The position of ``eps`` in ``grid`` (to 1e-9), ``None`` when it is not on it."""
    return next((k for k, e in enumerate(grid) if abs(e - eps) <= 1e-9 * max(1.0, abs(eps))), None)


def _pct2(value: float) -> str:
    return f"{100 * value:.2f}"


def robustbench_info(e: ModelEvaluation, eps: float, fields: Mapping[str, Any]) -> dict[str, Any]:
    """RobustBench's ``model_info`` fields (:data:`ROBUSTBENCH_FIELDS`, RobustBench's formats: accuracies as
    ``"84.36"``, eps as ``"8/255"``) of one evaluation at ``eps`` (a radius of its grid).

    Measured here: ``dataset``, ``eps``, ``clean_acc`` and ``autoattack_acc`` (AutoAttack's robust accuracy
    at ``eps``, ``None`` unless AutoAttack was run), plus ``pgd_acc`` (not a RobustBench field): the robust
    accuracy at ``eps`` under this evaluation's PGD protocol. The ``footnote`` says which attack gave which
    number on how many points (then ``fields["footnote"]``). Every other field is ``fields``' (``None`` when
    unknown).
    """
    k = eps_index(e.pgd.eps_grid, eps)
    if k is None:
        raise ValueError(f"eps={eps!r} is not on the eps grid of {e.name} {list(e.pgd.eps_grid)}")
    unknown = sorted(set(fields) - set(ROBUSTBENCH_FIELDS))
    if unknown:
        raise ValueError(f"{unknown[0]} is not a RobustBench model_info field; the fields are "
                         f"{list(ROBUSTBENCH_FIELDS)}")
    s = e.pgd.settings
    dataset = str(e.data_info.get("dataset", "?"))
    note = (f"Measured by mma-lightning {_software()['mma_lightning']} on {points_text(e)}: clean_acc, and "
            f"pgd_acc = robust accuracy at eps {format_eps(eps)} under whitebox PGD (protocol {e.protocol}: "
            f"{s['nb_iter']} steps of {s['step_fraction']:.4g}*eps, {_restarts(s['restarts'])} with each of "
            f"{', '.join(s['losses'])}, worst case per sample)")
    if e.autoattack is not None:
        note += (f"; autoattack_acc: AutoAttack ({e.autoattack.settings.get('version')}, "
                 f"{e.autoattack.settings.get('package')}) on the same points")
    else:
        note += "; AutoAttack was not run (evaluation.autoattack=true runs it), so autoattack_acc is null"
    if e.flagged and e.sanity is not None:
        note += f"; FLAGGED by the sanity checks ({', '.join(e.sanity.failed)}): pgd_acc is likely overestimated"
    given = fields.get("footnote")
    measured: dict[str, Any] = {
        "dataset": ROBUSTBENCH_DATASETS.get(dataset, dataset.lower()),
        "eps": format_eps(eps),
        "clean_acc": _pct2(e.pgd.clean_accuracy),
        "autoattack_acc": None if e.autoattack is None else _pct2(e.autoattack.robust_accuracy[k]),
        "footnote": f"{note}. {given}" if given else f"{note}.",
    }
    info = {key: measured[key] if key in measured else fields.get(key) for key in ROBUSTBENCH_FIELDS}
    info["pgd_acc"] = _pct2(e.pgd.robust_accuracy[k])
    return info


def results_document(evaluations: Sequence[ModelEvaluation],
                     robustbench: Mapping[str, tuple[float, Mapping[str, Any]]] | None = None) -> dict[str, Any]:
    """The content of ``results.json``: format tag, creation time, software versions, the report's verdict
    (``flagged`` with the failed checks per model), one entry per model; with ``robustbench`` (by model name:
    the eps and the descriptive fields of :func:`robustbench_info`) each model's entry also holds its
    RobustBench ``model_info`` fields as ``robustbench``."""
    flagged = flagged_checks(evaluations)
    models = [e.to_dict() for e in evaluations]
    if robustbench is not None:
        for entry, e in zip(models, evaluations):
            eps, fields = robustbench[e.name]
            entry["robustbench"] = robustbench_info(e, eps, fields)
    return {
        "format": RESULTS_FORMAT,
        "format_version": RESULTS_FORMAT_VERSION,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "software": _software(),
        "flagged": bool(flagged),
        "flagged_checks": flagged,
        "verdict": verdict_line(evaluations),
        "models": models,
    }


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def protocol_text(e: ModelEvaluation) -> str:
    """The protocol in words: its name, the attack (steps, step size, restarts, losses), the test points and
    their fingerprint."""
    s = e.pgd.settings
    start = "random start" if s["rand_init"] else "no random start"
    fitted = ", fitted to the step count" if s.get("step_fitted") else ""
    reasons = not_paper_reasons(s, e.pgd.norm)
    paper = ("the MMA paper's protocol" if e.protocol == "paper" else
             f"not the MMA paper's protocol: {'; '.join(reasons)}" if reasons else
             f"not the MMA paper's protocol ({PGD_STEPS} steps, {RESTARTS_PER_LOSS} restarts per loss, "
             f"{' + '.join(LOSSES)})")
    dataset = s.get("dataset") or "unknown"
    if s.get("dataset_from_grid"):
        dataset = f"{dataset} (read off the eps grid)"
    return (f"protocol **{e.protocol}** ({paper}): data {dataset}, norm {e.pgd.norm}, whitebox PGD, "
            f"{s['nb_iter']} steps of "
            f"{s['step_fraction']:.4g}·eps{fitted}, {_restarts(s['restarts'])} with each of the losses "
            f"{', '.join(s['losses'])} ({start}, seed {s['seed']}), worst case per sample; "
            f"{points_text(e)}")


def plot_subtitle(evaluations: Sequence[ModelEvaluation]) -> str:
    """The plots' protocol line(s): protocol name, steps, step size, restarts, losses, test points and their
    fingerprint (one line per distinct protocol)."""
    texts: dict[str, list[str]] = {}
    for e in evaluations:
        s = e.pgd.settings
        text = (f"protocol {e.protocol}: PGD {s['nb_iter']} steps of {s['step_fraction']:.4g}·eps, "
                f"{_restarts(s['restarts'])} per loss ({', '.join(s['losses'])}); {points_text(e)}")
        texts.setdefault(text, []).append(e.name)
    if len(texts) == 1:
        return next(iter(texts))
    return "\n".join(f"{', '.join(names)}: {text}" for text, names in texts.items())


def _restarts(n: int) -> str:
    return f"{n} restart" if n == 1 else f"{n} restarts"


def points_text(e: ModelEvaluation) -> str:
    """``"1000 test points (sha256 1a2b3c4d5e6f)"``."""
    sha = str(e.data_info.get("samples_sha256", "?"))[:12]
    return f"{e.pgd.num_samples} test points (sha256 {sha})"


def _sanity_cell(e: ModelEvaluation) -> str:
    if e.sanity is None:
        return "not run"
    return "ok" if e.sanity.passed else "FLAGGED: " + ", ".join(e.sanity.failed)


def _groups(evaluations: Sequence[ModelEvaluation], key: str) -> dict[tuple[str, tuple[float, ...]], list]:
    """Evaluations that have ``key`` (``"pgd"``, ``"margins"``, ``"autoattack"``), by (norm, eps grid)."""
    groups: dict[tuple[str, tuple[float, ...]], list] = {}
    for e in evaluations:
        if getattr(e, key) is not None:
            groups.setdefault((e.pgd.norm, e.pgd.eps_grid), []).append(e)
    return groups


def markdown_report(evaluations: Sequence[ModelEvaluation], title: str = "Robustness evaluation") -> str:
    """The Markdown report: one comparison table per (norm, eps grid), margins, AutoAttack, sanity flags."""
    verdict = verdict_line(evaluations)
    headline = f"**{verdict}.**" if flagged_checks(evaluations) else f"Sanity: {verdict}."
    lines = [f"# {title}", "", headline, ""]
    lines += [f"- **{e.name}**: {protocol_text(e)}." for e in evaluations] + [""]
    for (norm, grid), group in _groups(evaluations, "pgd").items():
        eps_cols = [format_eps(e) for e in grid]
        lines += [f"## Robust accuracy (%), {norm}", ""]
        rows = [[e.name, _pct(e.pgd.clean_accuracy), _pct(e.pgd.avg_accuracy),
                 _pct(e.pgd.avg_robust_accuracy), *(_pct(a) for a in e.pgd.robust_accuracy), _sanity_cell(e)]
                for e in group]
        lines += _table(["model", "Clean", "AvgAcc", "AvgRobAcc", *eps_cols, "sanity"], rows)
        lines += ["", ("Clean: accuracy on the test points; AvgRobAcc: mean robust accuracy over the eps "
                  "grid; AvgAcc: the same mean with the clean accuracy included."), ""]
    for (norm, grid), group in _groups(evaluations, "margins").items():
        lines += [f"## Margins, {norm}", ""]
        rows = []
        for e in group:
            s = e.margins.summary(grid)
            rows.append([e.name, f"{s.mean:.4g}", f"{s.q25:.4g}", f"{s.median:.4g}", f"{s.q75:.4g}",
                         str(s.num_samples - s.num_found), *(_pct(f) for f in s.fraction_above.values())])
        cols = [f"> {format_eps(t)} (%)" for t in grid]
        lines += _table(["model", "mean", "Q1", "median", "Q3", "not found", *cols], rows)
        lines += ["", ("Per-sample margin estimates (smallest verified adversarial distance; 0 for "
                  "misclassified points, the search's upper end when none was found)."), ""]
    for (norm, grid), group in _groups(evaluations, "autoattack").items():
        lines += [f"## AutoAttack robust accuracy (%), {norm}", ""]
        rows = [[e.name, _pct(e.autoattack.clean_accuracy), _pct(e.autoattack.avg_robust_accuracy),
                 *(_pct(a) for a in e.autoattack.robust_accuracy)] for e in group]
        lines += _table(["model", "Clean", "AvgRobAcc", *(format_eps(x) for x in grid)], rows) + [""]
    checked = [(e, e.sanity) for e in evaluations if e.sanity is not None]
    if checked:
        lines += ["## Sanity checks (attack strength, gradient masking)", ""]
        rows = [[e.name, f"`{c.name}`", "ok" if c.passed else "**FLAGGED**", f"{100 * c.value:+.1f}",
                 f"{100 * c.threshold:.1f}", c.message] for e, sanity in checked for c in sanity.checks]
        lines += _table(["model", "check", "result", "value (%)", "threshold (%)", "measured"], rows)
        probes = {_probe_line(e.name, sanity.settings) for e, sanity in checked}
        lines += ["", *(f"{p}." for p in sorted(probes)), ("A value beyond its threshold flags the whole "
                  "report: the robust accuracy is then likely overestimated."), ""]
    lines += ["## Models and data", ""]
    rows = [[e.name, str(e.model_info.get("class", "?")), str(e.model_info.get("num_parameters", "?")),
             str(e.model_info.get("state_sha256", "?"))[:12], str(e.data_info.get("num_samples", "?")),
             str(e.data_info.get("samples_sha256", "?"))[:12]] for e in evaluations]
    lines += _table(["model", "class", "parameters", "weights sha256", "test points", "points sha256"], rows)
    return "\n".join(lines) + "\n"


def _probe_line(name: str, settings: dict[str, Any]) -> str:
    """Where the probes ran and what they cost next to the evaluation (both timed)."""
    radii = ", ".join(format_eps(e) for e in settings.get("probe_radii", []))
    line = f"{name}: probes at eps {radii} on the first {settings.get('probe_samples')} test points"
    probe, evaluation = settings.get("probe_seconds"), settings.get("evaluation_seconds")
    if probe is not None and evaluation:
        line += (f"; the probes took {probe:.1f} s, {probe / evaluation:.0%} of the evaluation's "
                 f"{evaluation:.1f} s")
    return line


def _png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def write_report(evaluations: Sequence[ModelEvaluation] | ModelEvaluation, out_dir: str | os.PathLike,
                 title: str = "Robustness evaluation",
                 robustbench: Mapping[str, tuple[float, Mapping[str, Any]]] | None = None) -> ReportPaths:
    """Write ``results.json``, ``results.md``, ``robust_accuracy.png`` and ``margins.png`` into ``out_dir``.

    Several evaluations (e.g. one per checkpoint) give one comparison table and one curve per model; their
    names must be distinct. AutoAttack results, when present, are drawn as dashed curves. ``robustbench``
    (by model name: ``(eps, descriptive fields)``) adds each model's RobustBench ``model_info`` fields to
    ``results.json`` (:func:`robustbench_info`; every model must have an entry).
    """
    evaluations = [evaluations] if isinstance(evaluations, ModelEvaluation) else list(evaluations)
    if not evaluations or not all(isinstance(e, ModelEvaluation) for e in evaluations):
        raise ValueError("evaluations must be a non-empty sequence of ModelEvaluation")
    names = [e.name for e in evaluations]
    if len(set(names)) != len(names):
        raise ValueError(f"evaluation names must be distinct (they label table rows and curves), got {names}")
    if robustbench is not None and set(robustbench) != set(names):
        raise ValueError(f"robustbench must have one entry per evaluation {names}, got {sorted(robustbench)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = ReportPaths(out / RESULTS_JSON, out / TABLE_MARKDOWN, out / ROBUST_ACCURACY_PNG,
                        out / MARGINS_PNG if any(e.margins is not None for e in evaluations) else None)

    labels = {e.name: f"{e.name} [FLAGGED]" if e.flagged else e.name for e in evaluations}
    curves: dict[str, RobustnessResult] = {labels[e.name]: e.pgd for e in evaluations}
    curves.update({f"{labels[e.name]} (AutoAttack)": e.autoattack for e in evaluations
                   if e.autoattack is not None})
    subtitle = plot_subtitle(evaluations)
    curve_png = _png_bytes(robust_accuracy_figure(curves, subtitle=subtitle))
    margins_png = None
    if paths.margins_png is not None:
        with_margins = {labels[e.name]: e.margins for e in evaluations if e.margins is not None}
        grids = {e.pgd.eps_grid for e in evaluations if e.margins is not None}
        thresholds = next(iter(grids)) if len(grids) == 1 else ()
        margins_png = _png_bytes(margin_histogram_figure(with_margins, thresholds, subtitle=subtitle))
    document = json.dumps(results_document(evaluations, robustbench), indent=2, allow_nan=False).encode()

    write_atomically(paths.results_json, document)
    write_atomically(paths.table_markdown, markdown_report(evaluations, title).encode())
    write_atomically(paths.robust_accuracy_png, curve_png)
    if paths.margins_png is not None and margins_png is not None:
        write_atomically(paths.margins_png, margins_png)
    return paths
