"""The paper's evaluation protocol as named constants (docs/mma-algorithm.md, "Evaluation protocol").

Ding et al., ICLR 2020, release evaluation script: whitebox PGD, 100 steps, 10 random restarts (5 with
the cross-entropy loss, 5 with the CW margin loss), step ``eps / 40`` for MNIST Linf and ``eps / 4``
otherwise, and per sample the worst case over all restarts. AvgRobAcc is the mean robust accuracy over the
eps grid; AvgAcc is the same mean with the clean accuracy included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MNIST_LINF_EPS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4)
"""MNIST (and Fashion-MNIST) Linf grid of the paper."""
MNIST_L2_EPS: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0)
"""MNIST L2 grid (the doc's best reading of the paper)."""
CIFAR10_LINF_EPS: tuple[float, ...] = tuple(k / 255 for k in range(4, 33, 4))
"""CIFAR10 Linf grid of the paper: 4/255, 8/255, ..., 32/255."""
CIFAR10_L2_EPS: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 2.5)
"""CIFAR10 L2 grid (the doc's best reading of the paper)."""

EPS_GRIDS: dict[str, tuple[float, ...]] = {
    "mnist-linf": MNIST_LINF_EPS,
    "mnist-l2": MNIST_L2_EPS,
    "cifar10-linf": CIFAR10_LINF_EPS,
    "cifar10-l2": CIFAR10_L2_EPS,
}
"""The preset grids by name, ``"<dataset>-<norm>"``."""

PGD_STEPS: int = 100
"""PGD steps of the release evaluation script."""
RESTARTS_PER_LOSS: int = 5
"""Random restarts per loss: 5 with cross-entropy + 5 with the CW loss = 10 in all."""
LOSSES: tuple[str, ...] = ("ce", "cw")
"""The two PGD objectives of the protocol: cross-entropy and the CW margin loss."""
DEFAULT_STEP_FRACTION: float = 0.25
"""Step size as a fraction of eps: ``eps / 4``, the script's choice for every setting but MNIST Linf."""
MNIST_LINF_STEP_FRACTION: float = 1 / 40
"""Step size as a fraction of eps for MNIST Linf in the release script: ``eps / 40``."""
STEP_SCALE: float = 2.5
"""Least distance, in units of eps, that ``K`` PGD steps can travel (the MMA reference's ``step_scale``:
step ``2.5 * eps / K``); ``100 * eps / 40`` is exactly that."""


DATASET_FAMILIES: dict[str, str] = {"mnist": "mnist", "fashionmnist": "mnist", "cifar10": "cifar10"}
"""The datasets of the paper's protocol (names compared without case, ``-`` or ``_``) and the family whose eps
grids and steps they take: MNIST and Fashion-MNIST (MNIST's settings), CIFAR10."""


def dataset_family(dataset: str | None) -> str | None:
    """``"mnist"`` or ``"cifar10"`` for a dataset of the paper's protocol (:data:`DATASET_FAMILIES`: ``"MNIST"``,
    ``"fashion-mnist"``, ``"FashionMNIST"``, ``"cifar10"``, ...); ``None`` for any other or an unknown dataset."""
    if not isinstance(dataset, str):
        return None
    return DATASET_FAMILIES.get(dataset.lower().replace("-", "").replace("_", ""))


def paper_step_fraction(family: str | None, norm: str) -> float | None:
    """The release script's step fraction for a dataset family and norm: ``eps / 40`` for MNIST Linf,
    ``eps / 4`` for MNIST L2 and CIFAR10; ``None`` outside the paper's datasets."""
    if family is None:
        return None
    return MNIST_LINF_STEP_FRACTION if (family, norm) == ("mnist", "linf") else DEFAULT_STEP_FRACTION


def grid_family(norm: str, eps_grid: Sequence[float]) -> str | None:
    """The dataset family whose preset grid for ``norm`` is exactly ``eps_grid`` (:data:`EPS_GRIDS`), else
    ``None``: the only case where the data is read off the grid (a custom grid says nothing about the data)."""
    values = tuple(sorted(float(e) for e in eps_grid))
    for name, grid in EPS_GRIDS.items():
        family, _, grid_norm = name.partition("-")
        if grid_norm == norm and len(grid) == len(values) and all(
                abs(a - b) < 1e-9 for a, b in zip(values, grid)):
            return family
    return None


def protocol_step_fraction(norm: str, eps_grid: Sequence[float], dataset: str | None = None) -> float:
    """The release script's step fraction for a threat model and data: ``eps / 40`` for MNIST-like Linf,
    ``eps / 4`` otherwise. The data is ``dataset`` (:func:`dataset_family`) or, when not given, the family of
    a preset grid (:func:`grid_family`: the MNIST Linf grid :data:`MNIST_LINF_EPS` means MNIST)."""
    family = dataset_family(dataset) if dataset is not None else grid_family(norm, eps_grid)
    return paper_step_fraction(family, norm) or DEFAULT_STEP_FRACTION


def fit_step_fraction(nb_iter: int, protocol_fraction: float, step_scale: float = STEP_SCALE) -> float:
    """The step fraction for ``nb_iter`` PGD steps: ``max(protocol_fraction, step_scale / nb_iter)``, so the
    attack can travel ``step_scale * eps`` (beyond the ball's surface) within its steps.

    Example:
        >>> fit_step_fraction(100, 1 / 40), fit_step_fraction(20, 1 / 40), fit_step_fraction(20, 0.25)
        (0.025, 0.125, 0.25)
    """
    if isinstance(nb_iter, bool) or not isinstance(nb_iter, int) or nb_iter < 1:
        raise ValueError(f"nb_iter must be an integer >= 1, got {nb_iter!r}")
    return max(float(protocol_fraction), step_scale / nb_iter)


def is_paper_protocol(settings: Mapping[str, Any], norm: str) -> bool:
    """Whether PGD ``settings`` (:attr:`RobustnessResult.settings`) under ``norm`` are the release script's
    protocol: a dataset of the paper (``settings["dataset"]``, :func:`dataset_family`), 100 steps of the
    paper's step for that dataset and norm (:func:`paper_step_fraction`), 5 random restarts with each of CE
    and CW. A custom ``protocol_step_fraction`` or an unknown dataset is never the paper's."""
    fraction = settings.get("step_fraction")
    paper = paper_step_fraction(dataset_family(settings.get("dataset")), norm)
    return (settings.get("nb_iter") == PGD_STEPS and settings.get("restarts") == RESTARTS_PER_LOSS
            and tuple(settings.get("losses", ())) == LOSSES and bool(settings.get("rand_init"))
            and fraction is not None and paper is not None and abs(fraction - paper) < 1e-12)


def not_paper_reasons(settings: Mapping[str, Any], norm: str) -> list[str]:
    """Where PGD ``settings`` under ``norm`` differ from the paper's protocol, in words (empty: they are the
    paper's, :func:`is_paper_protocol`)."""
    family = dataset_family(settings.get("dataset"))
    paper = paper_step_fraction(family, norm)
    reasons = []
    if family is None:
        dataset = settings.get("dataset")
        reasons.append("the data is not known to be one of the paper's (pass dataset='mnist', 'fashion-mnist' or "
                       "'cifar10')" if dataset is None else f"the data {dataset} is not one of the paper's")
    if settings.get("nb_iter") != PGD_STEPS:
        reasons.append(f"{settings.get('nb_iter')} steps, not {PGD_STEPS}")
    fraction = settings.get("step_fraction")
    if paper is not None and (fraction is None or abs(fraction - paper) >= 1e-12):
        reasons.append(f"step {fraction:.4g}·eps, not {paper:.4g}·eps" if fraction is not None
                       else "no step size")
    restarts = settings.get("restarts")
    if restarts != RESTARTS_PER_LOSS:
        reasons.append(f"{restarts} restart{'' if restarts == 1 else 's'} per loss, not {RESTARTS_PER_LOSS}")
    if tuple(settings.get("losses", ())) != LOSSES:
        reasons.append(f"losses {' + '.join(settings.get('losses', ()))}, not {' + '.join(LOSSES)}")
    if not settings.get("rand_init"):
        reasons.append("no random start")
    return reasons


def grid_name(name: str) -> str:
    """The canonical preset name; case, ``_`` or ``-`` do not matter (``"MNIST_linf"``: ``"mnist-linf"``)."""
    key = name.strip().lower().replace("_", "-") if isinstance(name, str) else name
    if key not in EPS_GRIDS:
        raise ValueError(f"eps grid name must be one of {sorted(EPS_GRIDS)} ('_' for '-' works too), "
                         f"got {name!r}")
    return key


def eps_grid(name: str) -> tuple[float, ...]:
    """The preset eps grid ``name`` (one of :data:`EPS_GRIDS`; ``"mnist_linf"`` works too), e.g.
    ``eps_grid("cifar10-linf")``."""
    return EPS_GRIDS[grid_name(name)]


def check_eps_grid(eps_grid: Sequence[float] | float, name: str = "eps_grid") -> tuple[float, ...]:
    """Validate an eps grid: finite, ``> 0``, no duplicates; returned sorted ascending as floats."""
    values = (eps_grid,) if isinstance(eps_grid, (int, float)) else tuple(eps_grid)
    try:
        grid = tuple(sorted(float(e) for e in values))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a sequence of positive floats, got {eps_grid!r}") from err
    if not grid:
        raise ValueError(f"{name} must hold at least one eps, got {eps_grid!r}")
    if not all(0 < e < float("inf") for e in grid):
        raise ValueError(f"{name} must hold finite eps > 0, got {eps_grid!r}")
    if len(set(grid)) != len(grid):
        raise ValueError(f"{name} must not repeat an eps, got {eps_grid!r}")
    return grid


def format_eps(eps: float) -> str:
    """A short label for an eps: ``0.3``, ``1.5``, or ``8/255`` for the CIFAR grids' multiples of 1/255."""
    if abs(round(eps, 3) - eps) < 1e-9:
        return f"{eps:g}"
    k = eps * 255
    if abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return f"{eps:.4g}"
