"""Sanity flags for gradient masking, in the spirit of AutoAttack's checks (Croce & Hein, ICML 2020) and of
Carlini et al., "On Evaluating Adversarial Robustness" (2019): a sound whitebox evaluation must satisfy

1. ``monotone_in_eps``: robust accuracy does not rise with eps (nor above the clean accuracy);
2. ``reference_attack_agrees``: a reference attack that does not depend on the evaluated settings breaks no
   more than ``tolerance`` of the points the evaluated attack left robust, at every probed radius. The
   reference is the paper's PGD made stronger: ``reference_nb_iter`` (100) steps of the protocol's small step
   (``eps / 40`` on the MNIST Linf grid, ``eps / 4`` otherwise; fitted so the steps travel ``2.5 eps``), with
   ``reference_restarts`` random restarts for each of the CE and CW losses, fresh seeds; or APGD-CE and
   APGD-DLR (Croce & Hein, ICML 2020) through the optional ``torchattacks`` extra (``reference="apgd"``).
   The radii probed are those where a weak attack shows: robust accuracy between 5 % and 95 % (at most
   ``max_probe_radii`` of them, the largest first; the radius nearest half the clean accuracy when none is).
   A short attack is nearly as strong as a long one at small radii, and "twice the steps" of a 1-step
   attack is still no test of convergence: the reference is what the evaluation is measured against.
3. ``unbounded_eps``: an eps larger than the data range (the whole box is reachable) leaves ~0% robust.

Each check is judged by a threshold printed next to its figure: more than ``tolerance`` (default 2 points of
accuracy, at least one sample: ``max(tolerance, 1 / n)`` on ``n`` points). A failed check is a flag on the whole
report (the way AutoAttack flags an evaluation), not an error: the robust accuracy is then likely overestimated
(masked or obfuscated gradients, a randomised model, a weak attack). Checks 2-3 run extra attacks on a probe set
(the first ``probe_samples`` points of the data); their time is kept in the report next to the evaluation's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from mma_lightning.attacks.context import model_mode
from mma_lightning.evaluation.batches import (
    EvalData,
    check_positive_int,
    evaluation_batches,
    model_device,
    resolve_shard,
)
from mma_lightning.evaluation.collect import SampleCollector
from mma_lightning.evaluation.protocol import LOSSES, PGD_STEPS, fit_step_fraction, format_eps
from mma_lightning.evaluation.robustness import (
    PGDRun,
    RobustnessResult,
    restart_seed,
    robust_accuracy,
    worst_case_robust,
)

UNBOUNDED_FACTOR = 1.05  # the unbounded eps: 5% beyond the diameter of the data box in the threat norm
TOLERANCE = 0.02  # accuracy change (fraction) beyond which a check flags the evaluation: 2 points
PROBE_RANGE = (0.05, 0.95)  # radii whose robust accuracy lies in this range are probed
MAX_PROBE_RADII = 2
REFERENCES = ("pgd", "apgd")
REFERENCE_SEED_OFFSET = 7919  # the reference's restarts are not the evaluated ones


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


def default_probe_eps(result: RobustnessResult) -> float:
    """The grid's eps nearest half the clean accuracy (the probe when no radius is in :data:`PROBE_RANGE`)."""
    half = result.clean_accuracy / 2
    k = min(range(len(result.eps_grid)), key=lambda i: (abs(result.robust_accuracy[i] - half), i))
    return result.eps_grid[k]


def probe_radii(result: RobustnessResult, max_radii: int = MAX_PROBE_RADII) -> tuple[float, ...]:
    """The radii where a weak attack shows: robust accuracy in :data:`PROBE_RANGE` (5-95 %), the largest first,
    at most ``max_radii``; :func:`default_probe_eps` alone when no radius is in the range."""
    lo, hi = PROBE_RANGE
    inside = [e for e, a in zip(result.eps_grid, result.robust_accuracy) if lo <= a <= hi]
    return tuple(sorted(inside, reverse=True)[:max_radii]) or (default_probe_eps(result),)


@dataclass(frozen=True)
class ReferenceProbe:
    """The reference attack at one radius on the probe points: the evaluated robust accuracy there, and the
    robust accuracy when the reference attacks the points the evaluated attack left robust (worst case of both)."""

    eps: float
    num_samples: int
    evaluated: float
    reference: float

    @property
    def gap(self) -> float:
        """Points (fraction) the evaluated attack left robust and the reference broke."""
        return self.evaluated - self.reference


def _evaluated_robust(result: RobustnessResult, index: torch.Tensor, eps: float) -> torch.Tensor:
    """The result's per-sample robust outcome at ``eps`` for the dataset indices ``index`` (CPU bool)."""
    pos = torch.searchsorted(result.index, index.cpu()).clamp(max=result.num_samples - 1)
    if not torch.equal(result.index[pos], index.cpu()):
        raise ValueError("result must cover the probe samples: pass the same data (same order) that "
                         "produced it")
    return result.robust[pos, result.eps_position(eps)]


def _apgd_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, alive: torch.Tensor, norm: str, eps: float,
                 nb_iter: int, restarts: int, seed: int) -> torch.Tensor:
    """APGD-CE then APGD-DLR (torchattacks, Croce & Hein 2020) on the points still ``alive``; returns ``alive``
    less the points either broke."""
    from mma_lightning.evaluation.autoattack import load_torchattacks

    torchattacks = load_torchattacks()
    alive = alive.clone()
    for loss in ("ce", "dlr"):
        rows = alive.nonzero().squeeze(1)
        if rows.numel() == 0:
            break
        attack = torchattacks.APGD(model, norm="Linf" if norm == "linf" else "L2", eps=eps, steps=nb_iter,
                                   n_restarts=restarts, loss=loss, seed=seed)
        x_adv = attack(x[rows], y[rows])
        with torch.no_grad():
            alive[rows] = model(x_adv).argmax(dim=1) == y[rows]
    return alive


def reference_probes(
    model: nn.Module,
    data: EvalData,
    result: RobustnessResult,
    radii: Sequence[float],
    *,
    probe_samples: int = 256,
    reference: str = "pgd",
    nb_iter: int = PGD_STEPS,
    restarts: int = 1,
    batch_size: int = 256,
    shard: bool | None = None,
) -> list[ReferenceProbe]:
    """The reference attack (module docstring, check 2) at each of ``radii`` on the first ``probe_samples``
    points: only the points the evaluated ``result`` left robust are attacked, so the reference's robust
    accuracy is the worst case of both attacks and the gap counts the points the evaluation missed."""
    settings = result.settings
    fraction = fit_step_fraction(nb_iter, settings["protocol_step_fraction"])
    device = model_device(model)
    positions = [result.eps_position(e) for e in radii]
    collector = SampleCollector([c for k in positions for c in (f"eval@{k}", f"ref@{k}")], device,
                                sync=resolve_shard(shard))
    batches = evaluation_batches(data, device, batch_size=batch_size,
                                 max_samples=min(probe_samples, result.num_samples), shard=shard)
    run = PGDRun(model, result.norm, nb_iter, True, settings["clip_min"], settings["clip_max"])
    seed = settings["seed"] + REFERENCE_SEED_OFFSET
    with torch.inference_mode(False), torch.no_grad(), model_mode(model, train=False):
        for b, (x, y, index) in enumerate(batches):
            columns = {}
            for k, eps in zip(positions, radii):
                alive = _evaluated_robust(result, index, eps).to(device)
                if reference == "apgd":
                    with torch.enable_grad():
                        robust = _apgd_robust(model, x, y, alive, result.norm, eps, nb_iter, restarts,
                                              restart_seed(seed, k, b))
                else:
                    seeds = [restart_seed(seed, k, li, r, b) for li in range(len(LOSSES)) for r in range(restarts)]
                    robust = worst_case_robust(model, x, y, alive, result.norm, eps, nb_iter=nb_iter,
                                               restarts=restarts, losses=LOSSES, step_fraction=fraction,
                                               rand_init=True, clip_min=settings["clip_min"],
                                               clip_max=settings["clip_max"], seeds=seeds, run=run)
                columns[f"eval@{k}"], columns[f"ref@{k}"] = alive, robust
            collector.update(index, **columns)
    outcomes = collector.compute()
    n = int(outcomes["index"].numel())
    return [ReferenceProbe(eps, n, float(outcomes[f"eval@{k}"].double().mean()),
                           float(outcomes[f"ref@{k}"].double().mean())) for k, eps in zip(positions, radii)]


def reference_description(reference: str, nb_iter: int, restarts: int, protocol_fraction: float) -> str:
    """The reference attack in words, for the report."""
    if reference == "apgd":
        return f"APGD-CE + APGD-DLR (torchattacks), {nb_iter} steps, {restarts} restart{'s' if restarts > 1 else ''} each"
    step = fit_step_fraction(nb_iter, protocol_fraction)
    return (f"PGD, {nb_iter} steps of {step:.4g}·eps, {restarts} random restart{'s' if restarts > 1 else ''} "
            f"with each of {' and '.join(loss.upper() for loss in LOSSES)}")


def check_reference_agrees(probes: Sequence[ReferenceProbe], description: str,
                           tolerance: float = TOLERANCE) -> SanityCheck:
    """Flag an evaluation that left robust more than the tolerance of points the reference attack breaks, at
    any probed radius; the message names every probed radius with its gap, and the worst one when flagged."""
    n = probes[0].num_samples
    tol = tolerance_for(n, tolerance)
    worst = max(probes, key=lambda p: (p.gap, p.eps))
    per_radius = "; ".join(f"eps {format_eps(p.eps)}: {p.evaluated:.1%} evaluated, {p.reference:.1%} with the "
                           f"reference, gap {_points(p.gap, sign=True)}" for p in probes)
    figure = f"reference attack ({description}) on {n} points: {per_radius} (flagged above +{_points(tol)})"
    passed = worst.gap <= tol
    message = figure if passed else (
        f"{figure}: at eps {format_eps(worst.eps)} the evaluated attack is WEAKER than the reference by "
        f"{_points(worst.gap)}, its robust accuracy is overestimated; use more steps, a step that fits them, or "
        "more restarts")
    return SanityCheck("reference_attack_agrees", passed, worst.gap, tol, message)


def _input_numel(data: EvalData, device: torch.device) -> int:
    for x, _, _ in evaluation_batches(data, device, max_samples=1, shard=False):
        return x[0].numel()
    raise ValueError("data yielded no samples to evaluate")


def gradient_masking_checks(
    model: nn.Module,
    data: EvalData,
    result: RobustnessResult,
    *,
    probe_eps: float | Sequence[float] | None = None,
    probe_samples: int = 256,
    max_probe_radii: int = MAX_PROBE_RADII,
    reference: str = "pgd",
    reference_nb_iter: int = PGD_STEPS,
    reference_restarts: int = 1,
    tolerance: float = TOLERANCE,
    batch_size: int = 256,
    shard: bool | None = None,
    progress: bool = False,
) -> SanityReport:
    """Run the sanity checks (module docstring) for a PGD ``result`` of :func:`robust_accuracy`.

    Args:
        model, data: the model and the data (same order) that produced ``result``.
        result: the PGD evaluation to check; its settings define the unbounded-eps probe's attack.
        probe_eps: the radius or radii of the reference probe (grid values); default :func:`probe_radii`.
        probe_samples: size of the probe set (the first points of ``data``, no more than ``result`` covers).
        max_probe_radii: at most this many radii are probed (the largest in the 5-95 % range first).
        reference: ``"pgd"`` (the protocol's PGD with more steps and its small step) or ``"apgd"`` (needs the
            optional ``torchattacks`` extra).
        reference_nb_iter, reference_restarts: the reference's steps and random restarts per loss.
        tolerance: accuracy difference (fraction) tolerated, at least one sample.

    Without a data box (``clip_min=None``) the unbounded-eps check is left out (the data range is unknown).
    ``settings["probe_seconds"]`` is the probes' time.
    """
    if result.attack != "pgd":
        raise ValueError("result must come from robust_accuracy (attack 'pgd'), "
                         f"got attack {result.attack!r}")
    check_positive_int("probe_samples", probe_samples)
    check_positive_int("max_probe_radii", max_probe_radii)
    check_positive_int("reference_nb_iter", reference_nb_iter)
    check_positive_int("reference_restarts", reference_restarts)
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {list(REFERENCES)}, got {reference!r}")
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be a fraction in [0, 1), got {tolerance!r}")
    grid = result.eps_grid
    if probe_eps is None:
        radii = probe_radii(result, max_probe_radii)
    else:
        asked = (probe_eps,) if isinstance(probe_eps, (int, float)) else tuple(probe_eps)
        for e in asked:
            if not any(abs(g - e) <= 1e-9 * max(1.0, abs(g)) for g in grid):
                raise ValueError(f"probe_eps must be one of the result's eps grid {list(grid)}, got {e!r}")
        radii = tuple(grid[result.eps_position(e)] for e in asked)
    base = {key: result.settings[key] for key in ("nb_iter", "restarts", "losses", "step_fraction",
                                                  "protocol_step_fraction", "rand_init", "clip_min",
                                                  "clip_max", "seed")}
    n_probe = min(probe_samples, result.num_samples)
    checks = [check_monotone_in_eps(result, tolerance)]
    start = time.perf_counter()
    probes = reference_probes(model, data, result, radii, probe_samples=n_probe, reference=reference,
                              nb_iter=reference_nb_iter, restarts=reference_restarts, batch_size=batch_size,
                              shard=shard)
    description = reference_description(reference, reference_nb_iter, reference_restarts,
                                        base["protocol_step_fraction"])
    checks.append(check_reference_agrees(probes, description, tolerance))

    clip_min, clip_max = base["clip_min"], base["clip_max"]
    unbounded = None
    if clip_min is not None and clip_max is not None:
        diameter = clip_max - clip_min
        if result.norm == "l2":
            diameter *= math.sqrt(_input_numel(data, model_device(model)))
        unbounded = UNBOUNDED_FACTOR * diameter
        far = robust_accuracy(model, data, result.norm, [unbounded], **{
            **base, "batch_size": batch_size, "max_samples": n_probe, "shard": shard, "progress": progress})
        acc, tol = far.robust_accuracy[0], tolerance_for(far.num_samples, tolerance)
        passed = acc <= tol
        figure = (f"eps {unbounded:.4g} beyond the data range leaves {acc:.1%} of {far.num_samples} points "
                  f"robust (flagged above {tol:.1%})")
        message = figure if passed else (f"{figure}: the attack cannot reach points any input could reach, a "
                                         "sign of gradient masking")
        checks.append(SanityCheck("unbounded_eps", passed, acc, tol, message))
    settings = {"probe_radii": list(radii), "probe_samples": probes[0].num_samples, "reference": description,
                "reference_nb_iter": reference_nb_iter, "reference_restarts": reference_restarts,
                "tolerance": tolerance, "unbounded_eps": unbounded,
                "probe_seconds": time.perf_counter() - start}
    return SanityReport(checks, settings)
