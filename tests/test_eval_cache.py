"""A resumable evaluation: an interrupted run started again attacks only the batches it had not finished and
gives exactly the uninterrupted result; a finished evaluation is reused; any change of the model, the data or
the settings is a new cache entry (tiny CPU models)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mma_lightning.evaluation import evaluate_model, robust_accuracy
from mma_lightning.evaluation.cache import OutcomeCache, stage_cache


class Counting(nn.Module):
    """A model that counts the rows it was asked to classify."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.net(x)


class Interrupted(Exception):
    """Stands for a SIGTERM / Ctrl-C in the middle of a run."""


def batches(x: torch.Tensor, y: torch.Tensor, size: int, stop_after: int | None = None):
    """An iterable of ``(x, y, index)`` batches that is interrupted after ``stop_after`` batches."""

    class Batches:
        def __iter__(self):
            for b, start in enumerate(range(0, len(x), size)):
                if stop_after is not None and b == stop_after:
                    raise Interrupted
                rows = torch.arange(start, min(start + size, len(x)))
                yield x[rows], y[rows], rows

    return Batches()


@pytest.fixture
def setting():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(40, 1, 4, 4), torch.randint(0, 3, (40,))
    return net, x, y


def test_an_interrupted_pgd_run_resumes_from_its_finished_batches(setting, tmp_path: Path) -> None:
    net, x, y = setting
    kwargs = dict(nb_iter=3, restarts=2, losses=["ce", "cw"])
    fresh = robust_accuracy(Counting(net), batches(x, y, 10), "linf", [0.05, 0.1], **kwargs)
    path = tmp_path / "pgd.pt"
    with pytest.raises(Interrupted):
        robust_accuracy(net, batches(x, y, 10, stop_after=2), "linf", [0.05, 0.1], **kwargs,
                        cache=OutcomeCache(path))
    assert len(OutcomeCache(path)) == 2  # the two finished batches are on disk
    model = Counting(net)
    resumed = robust_accuracy(model, batches(x, y, 10), "linf", [0.05, 0.1], **kwargs,
                              cache=OutcomeCache(path))
    assert torch.equal(resumed.robust, fresh.robust) and torch.equal(resumed.correct, fresh.correct)
    assert torch.equal(resumed.index, fresh.index)
    first = Counting(net)
    robust_accuracy(first, batches(x, y, 10), "linf", [0.05, 0.1], **kwargs, cache=OutcomeCache(None))
    assert 0 < model.rows < first.rows  # only the two unfinished batches were attacked
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pgd.pt"]  # atomic writes leave no temp file


def test_a_finished_evaluation_is_reused_and_a_changed_one_is_not(setting, tmp_path: Path) -> None:
    net, x, y = setting
    kwargs = dict(nb_iter=2, restarts=1, margin_nb_iter=2, margin_search_steps=2, probe_samples=8,
                  batch_size=16, progress=False, cache_dir=tmp_path)
    first = evaluate_model(net, (x, y), "linf", [0.05, 0.1], **kwargs)
    again = Counting(net)
    reused = evaluate_model(again, (x, y), "linf", [0.05, 0.1], **kwargs)
    assert again.rows == 0  # nothing was attacked: the finished evaluation came from the cache
    assert torch.equal(reused.pgd.robust, first.pgd.robust)
    assert torch.equal(reused.margins.eps, first.margins.eps)
    assert reused.sanity.to_dict() == first.sanity.to_dict()

    changed = Counting(net)
    evaluate_model(changed, (x, y), "linf", [0.05, 0.1], **{**kwargs, "nb_iter": 3})
    assert changed.rows > 0  # other settings: evaluated again
    other_data = Counting(net)
    evaluate_model(other_data, (x.flip(0), y.flip(0)), "linf", [0.05, 0.1], **kwargs)
    assert other_data.rows > 0
    with torch.no_grad():
        net[1].weight.add_(0.1)
    other_weights = Counting(net)
    evaluate_model(other_weights, (x, y), "linf", [0.05, 0.1], **kwargs)
    assert other_weights.rows > 0


def test_stage_cache_names_depend_on_every_key_part(tmp_path: Path) -> None:
    a = stage_cache(tmp_path, "pgd", model="m", data={"num_samples": 4}, settings={"nb_iter": 2})
    b = stage_cache(tmp_path, "pgd", model="m", data={"num_samples": 4}, settings={"nb_iter": 3})
    c = stage_cache(tmp_path, "margins", model="m", data={"num_samples": 4}, settings={"nb_iter": 2})
    assert len({a.path, b.path, c.path}) == 3 and stage_cache(None, "pgd") is None
