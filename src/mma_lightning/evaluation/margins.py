"""Per-sample margin estimates and their summary (Ding et al., ICLR 2020: the margin is the distance to the
decision boundary in the threat model's norm; the reference selects models by the average margin estimate).

Each estimate comes from :func:`mma_lightning.attacks.find_margin` (PGD at a radius, then a bisection along
the PGD direction over ``[0, max_eps]``, success = misclassified). A successful estimate is a verified
adversarial point at that distance, i.e. an upper bound on the true margin, so "strong settings" run several
searches per sample (several starting radii, both the CE and CW losses, seeded restarts) and keep the
smallest estimate.
A point misclassified clean has margin 0; a point for which no search succeeded is reported at ``max_eps``
(``found = False``: its margin is at least that large as far as the attacks can tell).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mma_lightning.attacks import find_margin
from mma_lightning.attacks.context import model_mode
from mma_lightning.attacks.margin import SEARCHES
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
from mma_lightning.evaluation.protocol import LOSSES, check_eps_grid, format_eps
from mma_lightning.evaluation.robustness import check_losses, check_norm, restart_seed
from mma_lightning.evaluation.sharding import distributed_world

QUARTILES = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class MarginSummary:
    """Summary of per-sample margins: mean, quartiles and the fraction of points above each threshold.

    ``fraction_above[eps]`` is the fraction of points whose margin estimate exceeds ``eps``; as margin
    estimates are upper bounds, it bounds the robust accuracy at ``eps`` from above.
    """

    mean: float
    q25: float
    median: float
    q75: float
    fraction_above: dict[float, float]
    num_samples: int
    num_found: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (threshold keys as their labels, e.g. ``"8/255"``)."""
        return {"mean": self.mean, "q25": self.q25, "median": self.median, "q75": self.q75,
                "fraction_above": {format_eps(e): f for e, f in self.fraction_above.items()},
                "thresholds": list(self.fraction_above), "num_samples": self.num_samples,
                "num_found": self.num_found}


@dataclass
class MarginEstimates:
    """Per-sample margin estimates, sorted by sample index.

    Attributes:
        eps: ``[N]`` margin estimate (0: misclassified clean; ``max_eps``: none found).
        found: ``[N]`` bool, an adversarial point was found within ``max_eps`` (or it is misclassified).
        correct: ``[N]`` bool, classified correctly clean.
        index: ``[N]`` sample indices.
        norm: ``"linf"`` or ``"l2"``.
        max_eps: upper end of the search.
        settings: the search settings, enough to run it again.
    """

    eps: Tensor
    found: Tensor
    correct: Tensor
    index: Tensor
    norm: str
    max_eps: float
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self, thresholds: Sequence[float] = ()) -> MarginSummary:
        """See :func:`summarize_margins`."""
        return summarize_margins(self.eps, thresholds, found=self.found)

    def to_dict(self) -> dict[str, Any]:
        """The settings and counts as JSON-ready values (no per-sample tensors)."""
        return {"norm": self.norm, "max_eps": self.max_eps, "settings": dict(self.settings),
                "num_samples": int(self.eps.numel()), "num_found": int(self.found.sum())}


def summarize_margins(eps: Tensor, thresholds: Sequence[float] = (),
                      found: Tensor | None = None) -> MarginSummary:
    """Mean, quartiles (linear interpolation) and fraction of margins ``> t`` for each threshold ``t``."""
    if eps.dim() != 1 or eps.numel() == 0:
        raise ValueError(f"eps must be a non-empty 1-D tensor of margins, got shape {tuple(eps.shape)}")
    grid = check_eps_grid(thresholds, "thresholds") if len(thresholds) else ()
    e = eps.detach().double().cpu()
    q25, median, q75 = (float(q) for q in torch.quantile(e, torch.tensor(QUARTILES, dtype=torch.float64)))
    return MarginSummary(
        mean=float(e.mean()), q25=q25, median=median, q75=q75,
        fraction_above={t: float((e > t).double().mean()) for t in grid},
        num_samples=int(e.numel()),
        num_found=int(found.sum()) if found is not None else int(e.numel()),
    )


class MarginSearch:
    """One :func:`find_margin` search on a batch (success = misclassified): ``(eps, success)`` per sample.

    With ``capture`` (``True`` or ``torch.compile`` arguments) the model's passes run as captured graphs
    (:class:`~mma_lightning.capture.CapturedModel`: CUDA graphs on a GPU) and the batch is padded to
    :func:`~mma_lightning.capture.bucket_size` (the last batch of a split is shorter).
    """

    def __init__(self, model: nn.Module, norm: str, max_eps: float, nb_iter: int, search_steps: int,
                 step_scale: float, rand_init: bool, clip_min: float | None, clip_max: float | None, search: str,
                 capture: bool | Mapping[str, Any] = False) -> None:
        self.model = model if capture is False else CapturedModel(model, capture)
        self.padded = capture is not False
        self.norm, self.max_eps = norm, max_eps
        self.settings: dict[str, Any] = dict(nb_iter=nb_iter, search_steps=search_steps, step_scale=step_scale,
                             rand_init=rand_init, clip_min=clip_min, clip_max=clip_max, success="argmax",
                             search=search)

    def __call__(self, x: Tensor, y: Tensor, logits: Tensor, start: float, loss: str,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(eps, success)`` of the search from radius ``start`` with PGD objective ``loss``."""
        n = x.shape[0]
        if self.padded:
            size = bucket_size(n)
            x, y = pad_batch(x, y, size)
            logits = torch.cat([logits, logits[:1].expand(size - n, -1)])
        res = find_margin(self.model, x, y, self.norm, init_eps=start, max_eps=self.max_eps, loss=loss,
                          generator=generator, clean_logits=logits, **self.settings)
        return res.eps[:n], res.success[:n]


def estimate_margins(
    model: nn.Module,
    data: EvalData,
    norm: str,
    max_eps: float,
    *,
    init_eps: Sequence[float] | float | None = None,
    nb_iter: int = 100,
    search_steps: int = 20,
    losses: Sequence[str] = LOSSES,
    restarts: int = 1,
    step_scale: float = 2.5,
    rand_init: bool = True,
    clip_min: float | None = 0.0,
    clip_max: float | None = 1.0,
    seed: int = 0,
    search: str = "bisection",
    batch_size: int = 256,
    max_samples: int | None = None,
    shard: bool | None = None,
    progress: bool = False,
    cache: OutcomeCache | None = None,
    capture: bool | Mapping[str, Any] = False,
) -> MarginEstimates:
    """Per-sample margin estimates: the smallest of several :func:`find_margin` searches per sample.

    One search per (starting radius in ``init_eps``, loss, restart): PGD with ``nb_iter`` steps of size
    ``step_scale * init_eps / nb_iter`` (the MMA reference's 2.5), then ``search_steps`` bisection steps along
    its direction over ``[0, max_eps]`` (resolution ``max_eps / 2**search_steps``), success = misclassified.

    Args:
        model: maps inputs in the box to logits; eval mode for the duration (flags restored), never moved.
        data: as for :func:`robust_accuracy` (DataLoader / iterable of batches / tensors).
        norm: ``"linf"`` or ``"l2"``.
        max_eps: upper end of the search (e.g. twice the largest eps of the grid).
        init_eps: starting PGD radii, each in ``(0, max_eps]``; default ``max_eps / 2``. The evaluation passes
            its eps grid.
        losses: PGD objectives (default CE and CW, as the evaluation protocol).
        restarts: seeded random restarts per (radius, loss).
        search: the margin search after PGD, passed to :func:`find_margin`: ``"bisection"`` (the
            reference's) or ``"refined"``.
        batch_size, max_samples, shard, progress, cache, capture: as for :func:`robust_accuracy`
            (``capture``: each search as a captured graph, :class:`MarginSearch`).
    """
    norm = check_norm(norm)
    if not (isinstance(max_eps, (int, float)) and 0 < max_eps < float("inf")):
        raise ValueError(f"max_eps must be a finite float > 0, got {max_eps!r}")
    starts = check_eps_grid(max_eps / 2 if init_eps is None else init_eps, "init_eps")
    if starts[-1] > max_eps:
        raise ValueError(f"init_eps must all be <= max_eps ({max_eps}), got {list(starts)}")
    losses = check_losses(losses)
    check_positive_int("nb_iter", nb_iter)
    check_positive_int("search_steps", search_steps)
    check_positive_int("restarts", restarts)
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {list(SEARCHES)}, got {search!r}")
    settings = {"init_eps": list(starts), "nb_iter": nb_iter, "search_steps": search_steps,
                "losses": list(losses), "restarts": restarts, "step_scale": step_scale,
                "rand_init": bool(rand_init), "clip_min": clip_min, "clip_max": clip_max, "seed": seed,
                "search": search}
    device = model_device(model)
    _, rank = distributed_world()
    collector = SampleCollector(["eps", "found", "correct"], device, sync=resolve_shard(shard))
    batches = evaluation_batches(data, device, batch_size=batch_size, max_samples=max_samples, shard=shard,
                                 progress=progress, desc=f"margins {norm}", box=(clip_min, clip_max))
    run = MarginSearch(model, norm, float(max_eps), nb_iter, search_steps, step_scale, rand_init, clip_min,
                       clip_max, search, capture)
    with torch.inference_mode(False), torch.no_grad(), model_mode(model, train=False):
        for b, (x, y, index) in enumerate(batches):
            columns = None if cache is None else cache.get(b, device)
            if columns is None:
                logits = model(x)
                best = torch.full_like(y, float(max_eps), dtype=x.dtype)
                found = torch.zeros_like(y, dtype=torch.bool)
                for k, start in enumerate(starts):
                    for li, loss in enumerate(losses):
                        for r in range(restarts):
                            run_seed = restart_seed(seed, k, li, r, b, rank)
                            generator = torch.Generator(device=device).manual_seed(run_seed)
                            eps, success = run(x, y, logits, start, loss, generator)
                            best = torch.where(success, torch.minimum(best, eps), best)
                            found = found | success
                columns = {"eps": best, "found": found, "correct": logits.argmax(dim=1) == y}
                if cache is not None:
                    cache.put(b, columns)
            collector.update(index, **columns)
    out = collector.compute()
    return MarginEstimates(eps=out["eps"].float().cpu(), found=out["found"].bool().cpu(),
                           correct=out["correct"].bool().cpu(), index=out["index"].cpu(), norm=norm,
                           max_eps=float(max_eps), settings=settings)
