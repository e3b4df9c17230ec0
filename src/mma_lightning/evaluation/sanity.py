"""Sanity flags for gradient masking, in the spirit of AutoAttack's checks (Croce & Hein, ICML 2020) and of
Carlini et al., "On Evaluating Adversarial Robustness" (2019): a sound whitebox evaluation must satisfy

1. ``monotone_in_eps``: robust accuracy does not rise with eps (nor above the clean accuracy);
2. ``more_steps_agree``: PGD with ``steps_factor`` times the steps (fresh seeds) reports the same robust
   accuracy: a drop means the base attack had not converged (too few steps, or a step too small to reach the
   ball's surface: the robust accuracy is overestimated), a rise an unstable attack;
3. ``more_restarts_agree``: the same with ``restarts_factor`` times the random restarts;
4. ``unbounded_eps``: an eps larger than the data range (the whole box is reachable) leaves ~0% robust.

Each check is judged by a threshold printed next to its figure: a change of more than ``tolerance`` (default
2 points of accuracy, at least one sample: ``max(tolerance, 1 / n)`` on ``n`` points). A failed check is a
flag on the whole report (the way AutoAttack flags an evaluation), not an error: the robust accuracy is then
likely overestimated (masked or obfuscated gradients, a randomised model, a weak attack). Checks 2-4 run extra
attacks on a probe set (the first ``probe_samples`` points of the data) at one eps of the grid.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mma_lightning.evaluation.batches import EvalData, check_positive_int, evaluation_batches, model_device
from mma_lightning.evaluation.protocol import STEP_SCALE, format_eps
from mma_lightning.evaluation.robustness import RobustnessResult, robust_accuracy

UNBOUNDED_FACTOR = 1.05  # the unbounded eps: 5% beyond the diameter of the data box in the threat norm
TOLERANCE = 0.02  # accuracy change (fraction) beyond which a check flags the evaluation: 2 points


@dataclass(frozen=True)
class SanityCheck:
    """One check: its name, whether it passed, the measured value and the threshold it was held to (both as
    fractions of accuracy), and a sentence saying both."""

    name: str
    passed: bool
    value: float
    threshold: float
    message: str


@dataclass
class SanityReport:
    """The sanity checks of one evaluation; ``passed`` only if every check passed."""

    checks: list[SanityCheck]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when no check flagged the evaluation."""
        return all(c.passed for c in self.checks)

    @property
    def failed(self) -> list[str]:
        """Names of the failed checks."""
        return [c.name for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: overall verdict, failed names, every check, the probe settings."""
        return {"passed": self.passed, "failed": self.failed, "checks": [asdict(c) for c in self.checks],
                "settings": dict(self.settings)}


def tolerance_for(num_samples: int, tolerance: float) -> float:
    """The accuracy difference allowed on ``num_samples`` points: ``max(tolerance, 1 / num_samples)``."""
    return max(tolerance, 1.0 / max(num_samples, 1))


def check_monotone_in_eps(result: RobustnessResult, tolerance: float = TOLERANCE) -> SanityCheck:
    """Flag a robust accuracy that rises with eps (the clean accuracy counts as eps = 0)."""
    accs = (result.clean_accuracy, *result.robust_accuracy)
    labels = ("clean", *(format_eps(e) for e in result.eps_grid))
    rises = [(accs[k + 1] - accs[k], labels[k], labels[k + 1]) for k in range(len(accs) - 1)]
    rise, lo, hi = max(rises)
    tol = tolerance_for(result.num_samples, tolerance)
    passed = rise <= tol
    judged = f"flagged above +{_points(tol)}"
    message = (f"largest rise of robust accuracy between neighbouring eps {_points(rise, sign=True)} "
               f"({judged})" if passed else
               f"robust accuracy rises by {_points(rise)} from eps {lo} to {hi} ({judged}): the attack at "
               "the larger eps is weaker")
    return SanityCheck("monotone_in_eps", passed, rise, tol, message)


def _points(value: float, sign: bool = False) -> str:
    """An accuracy difference in percentage points: ``0.021`` -> ``"2.1 points"``."""
    return f"{100 * value:{'+' if sign else ''}.1f} points"


def _probe_base_accuracy(result: RobustnessResult, probe: RobustnessResult, eps: float) -> float:
    """The base result's robust accuracy at ``eps`` on exactly the probe's samples."""
    pos = torch.searchsorted(result.index, probe.index).clamp(max=result.num_samples - 1)
    if not torch.equal(result.index[pos], probe.index):
        raise ValueError("result must cover the probe samples: pass the same data (same order) that "
                         "produced it")
    return float(result.robust[pos, result.eps_position(eps)].double().mean())


def _compare(name: str, what: str, base: float, strong: float, n: int, tolerance: float) -> SanityCheck:
    """Flag a stronger attack whose robust accuracy differs from the base attack's by more than the
    tolerance: lower means the base attack overestimates robustness, higher an unstable attack."""
    change = strong - base
    tol = tolerance_for(n, tolerance)
    passed = abs(change) <= tol
    figure = (f"{what}: robust accuracy {strong:.1%} vs {base:.1%} with the base attack on the same {n} "
              f"points, change {_points(change, sign=True)} (flagged beyond ±{_points(tol)})")
    if passed:
        message = figure
    elif change < 0:
        message = (f"{figure}: the base attack has NOT CONVERGED, its robust accuracy is overestimated; use "
                   "more steps, a step that fits them, or more restarts")
    else:
        message = (f"{figure}: the stronger attack reports a HIGHER robust accuracy, an unstable attack "
                   "(possibly a randomised or gradient-masked model)")
    return SanityCheck(name, passed, change, tol, message)


def default_probe_eps(result: RobustnessResult) -> float:
    """The grid's eps where a weak attack shows most: robust accuracy nearest half the clean accuracy."""
    half = result.clean_accuracy / 2
    k = min(range(len(result.eps_grid)), key=lambda i: (abs(result.robust_accuracy[i] - half), i))
    return result.eps_grid[k]


def _input_numel(data: EvalData, device: torch.device) -> int:
    for x, _, _ in evaluation_batches(data, device, max_samples=1, shard=False):
        return x[0].numel()
    raise ValueError("data yielded no samples to evaluate")


def gradient_masking_checks(
    model: nn.Module,
    data: EvalData,
    result: RobustnessResult,
    *,
    probe_eps: float | None = None,
    probe_samples: int = 256,
    steps_factor: int = 2,
    restarts_factor: int = 2,
    tolerance: float = TOLERANCE,
    batch_size: int = 256,
    shard: bool | None = None,
    progress: bool = False,
) -> SanityReport:
    """Run the four sanity checks (module docstring) for a PGD ``result`` of :func:`robust_accuracy`.

    Args:
        model, data: the model and the data (same order) that produced ``result``.
        result: the PGD evaluation to check; its settings define the base attack.
        probe_eps: the eps of the steps / restarts probes; default :func:`default_probe_eps`.
        probe_samples: size of the probe set (the first points of ``data``).
        steps_factor, restarts_factor: how much stronger the probes are (each with fresh seeds). The
            more-steps probe keeps the base step unless that cannot travel ``STEP_SCALE * eps`` in its steps
            (then ``STEP_SCALE * eps / steps``).
        tolerance: accuracy difference (fraction) tolerated, at least one sample.

    Without a data box (``clip_min=None``) the unbounded-eps check is left out (the data range is unknown).
    """
    if result.attack != "pgd":
        raise ValueError("result must come from robust_accuracy (attack 'pgd'), "
                         f"got attack {result.attack!r}")
    check_positive_int("probe_samples", probe_samples)
    check_positive_int("steps_factor", steps_factor)
    check_positive_int("restarts_factor", restarts_factor)
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be a fraction in [0, 1), got {tolerance!r}")
    grid = result.eps_grid
    if probe_eps is not None and not any(abs(e - probe_eps) <= 1e-9 * max(1.0, abs(e)) for e in grid):
        raise ValueError(f"probe_eps must be one of the result's eps grid {list(grid)}, got {probe_eps!r}")
    probe_eps = default_probe_eps(result) if probe_eps is None else grid[result.eps_position(probe_eps)]
    base = {key: result.settings[key] for key in ("nb_iter", "restarts", "losses", "step_fraction",
                                                  "protocol_step_fraction", "rand_init", "clip_min",
                                                  "clip_max", "seed")}
    # The probe set: the first points of the data, no more than the result covers (evaluation.max_samples).
    common: dict[str, Any] = {"batch_size": batch_size, "max_samples": min(probe_samples, result.num_samples),
                              "shard": shard, "progress": progress}
    checks = [check_monotone_in_eps(result, tolerance)]

    steps = base["nb_iter"] * steps_factor
    step = max(base["step_fraction"], STEP_SCALE / steps)
    more_steps = robust_accuracy(model, data, result.norm, [probe_eps], **{
        **base, **common, "nb_iter": steps, "step_fraction": step, "seed": base["seed"] + 1})
    n = more_steps.num_samples
    base_acc = _probe_base_accuracy(result, more_steps, probe_eps)
    what = f"{steps_factor}x steps ({steps} of {step:.4g}·eps) at eps {format_eps(probe_eps)}"
    checks.append(_compare("more_steps_agree", what, base_acc, more_steps.robust_accuracy[0], n, tolerance))
    more_restarts = robust_accuracy(model, data, result.norm, [probe_eps], **{
        **base, **common, "restarts": base["restarts"] * restarts_factor, "seed": base["seed"] + 1})
    checks.append(_compare("more_restarts_agree",
                           f"{restarts_factor}x restarts ({base['restarts'] * restarts_factor} per loss) at "
                           f"eps {format_eps(probe_eps)}",
                           base_acc, more_restarts.robust_accuracy[0], n, tolerance))

    clip_min, clip_max = base["clip_min"], base["clip_max"]
    unbounded = None
    if clip_min is not None and clip_max is not None:
        diameter = clip_max - clip_min
        if result.norm == "l2":
            diameter *= math.sqrt(_input_numel(data, model_device(model)))
        unbounded = UNBOUNDED_FACTOR * diameter
        far = robust_accuracy(model, data, result.norm, [unbounded], **{**base, **common})
        acc, tol = far.robust_accuracy[0], tolerance_for(far.num_samples, tolerance)
        passed = acc <= tol
        figure = (f"eps {unbounded:.4g} beyond the data range leaves {acc:.1%} of {far.num_samples} points "
                  f"robust (flagged above {tol:.1%})")
        message = figure if passed else (f"{figure}: the attack cannot reach points any input could reach, a "
                                         "sign of gradient masking")
        checks.append(SanityCheck("unbounded_eps", passed, acc, tol, message))
    settings = {"probe_eps": probe_eps, "probe_samples": n, "steps_factor": steps_factor,
                "restarts_factor": restarts_factor, "tolerance": tolerance, "unbounded_eps": unbounded}
    return SanityReport(checks, settings)
