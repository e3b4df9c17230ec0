"""Evaluation: PGD protocol vs an independent implementation, worst-case aggregation, margins, sanity flags,
sharding without padding, AutoAttack extra, report files, training-time callback (all CPU, small)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import struct
import sys
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from mma_lightning import MMAModule
from mma_lightning.attacks import pgd
from mma_lightning.data import FashionMNISTDataModule, TensorDataModule
from mma_lightning.evaluation import (
    MNIST_LINF_EPS,
    ModelEvaluation,
    RobustnessCallback,
    RobustnessResult,
    ShardSampler,
    autoattack_accuracy,
    check_monotone_in_eps,
    data_identity,
    eps_grid,
    estimate_margins,
    evaluate_model,
    format_eps,
    gradient_masking_checks,
    margin_histogram_figure,
    model_identity,
    robust_accuracy,
    robust_accuracy_figure,
    summarize_margins,
    write_report,
)
from mma_lightning.evaluation import report as report_module
from mma_lightning.evaluation.sanity import probe_radii

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
needs_fashion = pytest.mark.skipif(not os.path.isdir(FASHION_DIR),
                                   reason=f"Fashion-MNIST not installed in {FASHION_DIR} "
                                          "(apt-get install dataset-fashion-mnist)")


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))


class ZeroGradient(nn.Module):
    """Gradient masking by construction: inputs are quantised with ``round``, whose gradient is zero."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.round(x * 8) / 8)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and do not slow to a crawl when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fashion() -> dict[str, torch.Tensor]:
    """3,000 real Fashion-MNIST training images and the first 200 test images, in [0, 1]."""
    if not os.path.isdir(FASHION_DIR):
        pytest.skip(f"Fashion-MNIST not installed in {FASHION_DIR} (apt-get install dataset-fashion-mnist)")
    dm = FashionMNISTDataModule(data_dir=FASHION_DIR, download=False, val_size=1000, train_subset=3000,
                                num_workers=0)
    dm.setup()

    def stack(dataset, n):
        xs, ys = zip(*(dataset[i] for i in range(n)))
        return torch.stack(xs), torch.tensor(ys)

    x_train, y_train = stack(dm.train_set, 3000)
    x_test, y_test = stack(dm.test_set, 200)
    return {"x_train": x_train, "y_train": y_train, "x": x_test, "y": y_test}


@pytest.fixture(scope="module")
def fixed_model(fashion) -> nn.Module:
    """The fixed small model: an MLP trained (seeded) for 3 epochs on the 3,000 Fashion-MNIST images."""
    torch.manual_seed(0)
    net = mlp()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(3):
        for i in range(0, 3000, 100):
            opt.zero_grad()
            x, y = fashion["x_train"][i:i + 100], fashion["y_train"][i:i + 100]
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    return net.eval()


# --- agreement with an independent implementation ---------------------------------------------------------
@pytest.mark.parametrize("norm, eps", [("linf", 0.05), ("l2", 1.0)])
def test_pgd_agrees_with_torchattacks(fixed_model, fashion, norm: str, eps: float) -> None:
    torchattacks = pytest.importorskip("torchattacks", reason="the independent PGD is torchattacks, from the "
                                                              "'test' extra: pip install '.[test]'")
    x, y = fashion["x"], fashion["y"]
    steps, alpha = 20, 0.25 * eps
    ours = robust_accuracy(fixed_model, (x, y), norm, [eps], nb_iter=steps, restarts=1, losses=["ce"],
                           step_fraction=0.25, rand_init=False)
    cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    x_adv = cls(fixed_model, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    with torch.no_grad():
        robust = (fixed_model(x).argmax(1) == y) & (fixed_model(x_adv).argmax(1) == y)
    theirs = robust.double().mean().item()
    assert 0.2 < theirs < ours.clean_accuracy - 0.1  # a regime where a wrong attack would show
    assert abs(ours.robust_accuracy[0] - theirs) <= 0.01, (ours.robust_accuracy[0], theirs)


# --- the result and its aggregation -----------------------------------------------------------------------
def test_result_numbers_follow_the_definitions(fixed_model, fashion) -> None:
    x, y = fashion["x"][:100], fashion["y"][:100]
    grid = [0.1, 0.02, 0.05]  # given unsorted
    res = robust_accuracy(fixed_model, (x, y), "linf", grid, nb_iter=10, restarts=1)
    assert res.eps_grid == (0.02, 0.05, 0.1)
    assert torch.equal(res.index, torch.arange(100)) and torch.equal(res.label, y)
    with torch.no_grad():
        correct = fixed_model(x).argmax(1) == y
    assert torch.equal(res.correct, correct)
    assert res.clean_accuracy == pytest.approx(correct.double().mean().item())
    assert res.robust.shape == (100, 3) and res.robust.dtype == torch.bool
    assert not (res.robust & ~res.correct[:, None]).any()  # robust implies correct
    assert res.robust_accuracy == pytest.approx(res.robust.double().mean(0).tolist())
    assert res.avg_robust_accuracy == pytest.approx(sum(res.robust_accuracy) / 3)
    assert res.avg_accuracy == pytest.approx((res.clean_accuracy + sum(res.robust_accuracy)) / 4)
    assert res.accuracy_at(0.05) == res.robust_accuracy[1]
    assert res.settings["nb_iter"] == 10 and res.settings["losses"] == ["ce", "cw"]
    assert res.to_dict()["eps"] == [0.02, 0.05, 0.1]


def test_worst_case_aggregation_is_monotone(fixed_model, fashion) -> None:
    """More restarts or more losses can only remove points from the robust set, sample by sample."""
    x, y = fashion["x"][:100], fashion["y"][:100]
    run = partial(robust_accuracy, fixed_model, (x, y), "l2", [0.5, 1.0], nb_iter=5, step_fraction=0.5)
    one = run(restarts=1, losses=["ce"]).robust
    more_restarts = run(restarts=4, losses=["ce"]).robust
    more_losses = run(restarts=4, losses=["ce", "cw"]).robust
    assert not (more_restarts & ~one).any()
    assert not (more_losses & ~more_restarts).any()
    assert (more_losses.sum() < one.sum()).item()  # the extra attacks did find more points here


def test_same_results_from_tensors_and_loaders_and_reproducible_seeds(fixed_model, fashion) -> None:
    x, y = fashion["x"][:60], fashion["y"][:60]
    run = partial(robust_accuracy, fixed_model, norm="linf", eps_grid=[0.05], nb_iter=5, restarts=2,
                  batch_size=16)
    a = run(data=(x, y))
    b = run(data=DataLoader(TensorDataset(x, y), batch_size=16))
    c = run(data=DataLoader(TensorDataset(x, y, torch.arange(60)), batch_size=16))
    for other in (b, c):
        assert torch.equal(a.robust, other.robust) and torch.equal(a.index, other.index)
    d = run(data=(x, y), seed=1)
    assert d.settings["seed"] == 1 and d.num_samples == 60


def test_indices_from_the_data_and_max_samples(fixed_model, fashion) -> None:
    x, y = fashion["x"][:50], fashion["y"][:50]
    loader = DataLoader(TensorDataset(x, y, 1000 + torch.arange(50)), batch_size=16)
    res = robust_accuracy(fixed_model, loader, "linf", [0.05], nb_iter=3, restarts=1, max_samples=21)
    assert torch.equal(res.index, 1000 + torch.arange(21))


def test_one_point_and_indices_above_float32_precision(fixed_model, fashion) -> None:
    """max_samples=1 gives a result of one point; an index above 2**24 (where float32 has no odd integers)
    comes back exactly."""
    x, y = fashion["x"][:4], fashion["y"][:4]
    one = robust_accuracy(fixed_model, (x, y), "linf", [0.05], nb_iter=2, restarts=1, max_samples=1)
    assert one.index.tolist() == [0] and one.robust.shape == (1, 1)
    big = 2**24 + 1 + torch.arange(4)
    res = robust_accuracy(fixed_model, DataLoader(TensorDataset(x, y, big), batch_size=2), "linf", [0.05],
                          nb_iter=2, restarts=1)
    assert res.index.tolist() == big.tolist()


def test_no_side_effects_on_the_model_and_inference_mode() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
    net.train()
    net[2].eval()  # a frozen BatchNorm inside a model in train mode
    for p in net.parameters():
        p.grad = torch.full_like(p, 7.0)
    stats = net[2].running_mean.clone()
    x, y = torch.rand(20, 1, 4, 4), torch.randint(0, 3, (20,))
    rng = torch.get_rng_state()
    with torch.inference_mode():
        res = robust_accuracy(net, (x, y), "linf", [0.1], nb_iter=3, restarts=2)
        est = estimate_margins(net, (x, y), "linf", 0.5, nb_iter=3, search_steps=3)
    assert res.num_samples == 20 and est.eps.shape == (20,)
    assert [m.training for m in net.modules()] == [True, True, True, False, True, True]
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in net.parameters())
    assert torch.equal(net[2].running_mean, stats)
    assert torch.equal(torch.get_rng_state(), rng)  # restarts use their own generators


@pytest.mark.parametrize("kwargs, match", [
    (dict(norm="l3"), "norm must be one of"),
    (dict(eps_grid=[]), "eps_grid must hold at least one"),
    (dict(eps_grid=[0.1, -0.1]), "eps_grid must hold finite eps > 0"),
    (dict(eps_grid=[0.1, 0.1]), "eps_grid must not repeat"),
    (dict(nb_iter=0), "nb_iter must be an integer >= 1"),
    (dict(restarts=0), "restarts must be an integer >= 1"),
    (dict(losses=["hinge"]), "losses must be a non-empty sequence"),
    (dict(step_fraction=0.0), "step_fraction must be a float > 0"),
    (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(data="abc"), "data must be a DataLoader"),
    (dict(data=[(torch.rand(2, 4),)]), r"batches \(x, y\) or \(x, y, index\)"),
])
def test_bad_input_is_a_clear_value_error(kwargs: dict, match: str) -> None:
    args = dict(model=nn.Linear(4, 2), data=(torch.rand(4, 4), torch.zeros(4, dtype=torch.long)), norm="linf",
                eps_grid=[0.1], nb_iter=2, restarts=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        robust_accuracy(**args)


def test_a_point_counted_twice_is_an_error() -> None:
    x, y = torch.rand(8, 4), torch.zeros(8, dtype=torch.long)
    loader = DataLoader(TensorDataset(x, y, torch.arange(8) % 6), batch_size=4)
    with pytest.raises(ValueError, match="more than once"):
        robust_accuracy(nn.Linear(4, 2), loader, "linf", [0.1], nb_iter=1, restarts=1)


def test_presets_and_labels() -> None:
    assert eps_grid("mnist-linf") == MNIST_LINF_EPS == (0.1, 0.2, 0.3, 0.4)
    assert [format_eps(e) for e in eps_grid("cifar10-linf")][:2] == ["4/255", "8/255"]
    assert format_eps(0.3) == "0.3" and format_eps(1.5) == "1.5"
    with pytest.raises(ValueError, match="eps grid name must be one of"):
        eps_grid("svhn-linf")


# --- sharding ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 7, 10])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_sampler_partitions_without_padding(n: int, world: int) -> None:
    shards = [list(ShardSampler(n, num_replicas=world, rank=r)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))  # every index exactly once
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [len(ShardSampler(n, num_replicas=world, rank=r)) for r in range(world)] == list(map(len, shards))


def test_shard_sampler_bad_rank() -> None:
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 1\]"):
        ShardSampler(5, num_replicas=2, rank=2)


def _sharded_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        x, y = torch.rand(13, 1, 4, 4), torch.randint(0, 3, (13,))
        dataset = TensorDataset(x, y)
        # A padding DistributedSampler (13 -> 14 points) is replaced by the non-padding shard sampler.
        loader = DataLoader(dataset, batch_size=4, sampler=DistributedSampler(dataset, shuffle=False))
        run = partial(robust_accuracy, net, norm="linf", eps_grid=[0.05, 0.1], nb_iter=3, restarts=1,
                      rand_init=False)
        results = {"loader": run(data=loader), "tensors": run(data=(x, y)),
                   "unsharded": run(data=(x, y), shard=False)}  # every rank evaluates all, nothing gathered
        torch.save({k: (r.index, r.robust, r.correct) for k, r in results.items()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_sharded_evaluation_counts_every_point_once(tmp_path: Path) -> None:
    out = str(tmp_path / "res")
    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(13, 1, 4, 4), torch.randint(0, 3, (13,))
    single = robust_accuracy(net, (x, y), "linf", [0.05, 0.1], nb_iter=3, restarts=1, rand_init=False)
    for rank in range(2):
        for kind, (index, robust, correct) in torch.load(f"{out}.{rank}").items():
            assert torch.equal(index, torch.arange(13)), kind  # on every rank, each point exactly once
            assert torch.equal(robust, single.robust) and torch.equal(correct, single.correct), kind


# --- margins ----------------------------------------------------------------------------------------------
def test_margin_estimates_match_exact_linear_margins() -> None:
    torch.manual_seed(0)
    model = nn.Linear(10, 2)
    x = torch.rand(64, 10)
    with torch.no_grad():
        y = model(x).argmax(1)
        y[:4] = 1 - y[:4]  # four misclassified points: margin 0
        w = model.weight[1] - model.weight[0]
        exact = (x @ w + model.bias[1] - model.bias[0]).abs() / w.abs().sum()  # Linf margin, no box
    est = estimate_margins(model, (x, y), "linf", max_eps=float(2 * exact.max()),
                           init_eps=[float(exact.median())], nb_iter=20, search_steps=20, clip_min=None,
                           clip_max=None, rand_init=False)
    assert (est.eps[:4] == 0).all() and est.found.all() and not est.correct[:4].any()
    rel = (est.eps[4:] - exact[4:]) / exact[4:]
    assert rel.min() > -1e-4 and rel.max() < 0.01  # verified upper bounds, tight
    s = est.summary([0.01, 0.05])
    assert s.mean == pytest.approx(est.eps.double().mean().item())
    assert s.median == pytest.approx(est.eps.double().quantile(0.5).item())
    assert s.q25 <= s.median <= s.q75
    assert s.fraction_above[0.05] == pytest.approx((est.eps > 0.05).double().mean().item())
    assert s.num_found == 64


def test_margin_summary_values_and_errors() -> None:
    s = summarize_margins(torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4]), [0.15, 0.35])
    assert (s.mean, s.q25, s.median, s.q75) == pytest.approx((0.2, 0.1, 0.2, 0.3))
    assert s.fraction_above == pytest.approx({0.15: 0.6, 0.35: 0.2})
    with pytest.raises(ValueError, match="eps must be a non-empty 1-D tensor"):
        summarize_margins(torch.tensor([]))
    with pytest.raises(ValueError, match="init_eps must all be <= max_eps"):
        estimate_margins(nn.Linear(4, 2), (torch.rand(4, 4), torch.zeros(4, dtype=torch.long)), "linf", 0.1,
                         init_eps=[0.2])


# --- sanity flags -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm, grid", [("linf", [0.02, 0.05, 0.1]), ("l2", [0.5, 1.0, 2.0])])
def test_sanity_flags_fire_on_zero_gradient_model_and_stay_quiet_on_normal_one(
        fixed_model, fashion, norm: str, grid: list[float]) -> None:
    x, y = fashion["x"][:100], fashion["y"][:100]
    for model, masked in ((fixed_model, False), (ZeroGradient(fixed_model), True)):
        res = robust_accuracy(model, (x, y), norm, grid, nb_iter=10, restarts=1)
        report = gradient_masking_checks(model, (x, y), res, probe_samples=100)
        names = [c.name for c in report.checks]
        assert names == ["monotone_in_eps", "reference_attack_agrees", "unbounded_eps"]
        if masked:
            assert not report.passed and "unbounded_eps" in report.failed, report.to_dict()
        else:
            assert report.passed, report.to_dict()


def test_sanity_probe_is_limited_to_the_points_the_result_covers(fixed_model, fashion) -> None:
    """evaluation.max_samples below probe_samples: the probes run on the result's 20 points (was an error)."""
    x, y = fashion["x"][:100], fashion["y"][:100]
    res = robust_accuracy(fixed_model, (x, y), "linf", [0.02, 0.05], nb_iter=5, restarts=1, max_samples=20)
    report = gradient_masking_checks(fixed_model, (x, y), res, probe_samples=100)
    assert report.settings["probe_samples"] == 20


def test_monotone_check_flags_a_rising_curve() -> None:
    n = 100
    correct = torch.ones(n, dtype=torch.bool)
    robust = torch.zeros(n, 3, dtype=torch.bool)
    robust[:50, 0] = True
    robust[:20, 1] = True
    robust[:40, 2] = True  # 20% at the middle eps, 40% at the largest: an attack got weaker
    res = RobustnessResult("linf", (0.1, 0.2, 0.3), 1.0, (0.5, 0.2, 0.4), torch.arange(n),
                           torch.zeros(n, dtype=torch.long), correct, robust)
    check = check_monotone_in_eps(res)
    assert not check.passed and check.value == pytest.approx(0.2) and "0.2 to 0.3" in check.message
    robust[:40, 2] = False
    robust[:10, 2] = True
    ok = RobustnessResult("linf", (0.1, 0.2, 0.3), 1.0, (0.5, 0.2, 0.1), torch.arange(n),
                          torch.zeros(n, dtype=torch.long), correct, robust)
    assert check_monotone_in_eps(ok).passed


# --- AutoAttack (optional extra) --------------------------------------------------------------------------
def test_autoattack_missing_extra_is_a_clear_message(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # makes `import torchattacks` fail
    data = (torch.rand(4, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ImportError, match=r"pip install \"mma-lightning\[autoattack\]\""):
        autoattack_accuracy(nn.Linear(4, 2), data, "linf", [0.1])
    with pytest.raises(ImportError, match="autoattack"):  # before any PGD work
        evaluate_model(nn.Linear(4, 2), data, "linf", [0.1], autoattack=True)


def test_autoattack_runs_through_torchattacks_without_side_effects(fixed_model, fashion) -> None:
    pytest.importorskip("torchattacks", reason="AutoAttack needs the 'autoattack' extra (torchattacks)")
    x, y = fashion["x"][:32], fashion["y"][:32]
    rng = torch.get_rng_state()
    fixed_model.train()
    try:
        aa = autoattack_accuracy(fixed_model, (x, y), "linf", [0.05])
        assert fixed_model.training and all(m.training for m in fixed_model.modules())
    finally:
        fixed_model.eval()
    assert torch.equal(torch.get_rng_state(), rng)  # torchattacks re-seeds the global RNG: restored
    pgd = robust_accuracy(fixed_model, (x, y), "linf", [0.05], nb_iter=20, restarts=1, losses=["ce"])
    assert aa.attack == "autoattack" and aa.settings["version"] == "standard"
    assert torch.equal(aa.correct, pgd.correct) and not (aa.robust & ~aa.correct[:, None]).any()
    assert aa.robust_accuracy[0] <= pgd.robust_accuracy[0]  # the stronger yardstick


# --- identity, report, callback ---------------------------------------------------------------------------
def test_identity_fingerprints() -> None:
    torch.manual_seed(0)
    a, b = mlp(), mlp()
    assert model_identity(a) == model_identity(a) and model_identity(a) != model_identity(b)
    assert model_identity(a)["num_parameters"] == 784 * 64 + 64 + 64 * 10 + 10
    idx, lab = torch.arange(5), torch.tensor([1, 2, 3, 4, 5])
    assert data_identity(idx, lab)["num_samples"] == 5
    assert data_identity(idx, lab) != data_identity(idx, lab.flip(0))


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


@needs_fashion
def test_write_report_end_to_end_on_a_fashion_mnist_checkpoint(tmp_path: Path) -> None:
    """Train a tiny MMA model on real Fashion-MNIST, checkpoint, reload, evaluate, write the report."""
    pl.seed_everything(0)
    dm = FashionMNISTDataModule(data_dir=FASHION_DIR, download=False, val_size=100, batch_size=50,
                                train_subset=500, num_workers=0)
    module = MMAModule(mlp(), norm="linf", max_eps=0.2, min_eps=0.02, nb_iter=5, search_steps=5, eval_eps=0.1,
                       eval_nb_iter=5, optimizer=partial(torch.optim.Adam, lr=1e-3))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, dm)
    ckpt = tmp_path / "mma.ckpt"
    trainer.save_checkpoint(ckpt)
    reloaded = MMAModule.load_from_checkpoint(ckpt, net=mlp())
    assert torch.equal(reloaded.net[1].weight, module.net[1].weight)

    dm.setup("test")
    test_loader = dm.test_dataloader()
    common = dict(nb_iter=10, restarts=1, margin_nb_iter=10, margin_search_steps=8, probe_samples=32,
                  max_samples=64, progress=False, data_info={"dataset": "FashionMNIST", "split": "test"})
    evaluations = [
        evaluate_model(reloaded.net, test_loader, "linf", MNIST_LINF_EPS, name="MMA-0.2",
                       model_info={"checkpoint": str(ckpt)}, **common),
        evaluate_model(mlp(), test_loader, "linf", MNIST_LINF_EPS, name="untrained", **common),
    ]
    out = tmp_path / "report"
    paths = write_report(evaluations, out)

    doc = json.loads(paths.results_json.read_text())
    assert doc["format"] == "mma-lightning/robustness-results" and "torch" in doc["software"]
    first = doc["models"][0]
    assert first["name"] == "MMA-0.2" and first["model"]["checkpoint"] == str(ckpt)
    assert first["model"]["state_sha256"] == model_identity(reloaded.net)["state_sha256"]
    assert first["data"]["num_samples"] == 64 and first["data"]["split"] == "test"
    assert first["pgd"]["eps"] == list(MNIST_LINF_EPS) and first["pgd"]["settings"]["nb_iter"] == 10
    assert first["pgd"]["clean_accuracy"] > 0.5  # trained on real data
    assert first["pgd"]["avg_accuracy"] == pytest.approx(evaluations[0].pgd.avg_accuracy)
    assert set(first["margins"]["summary"]["fraction_above"]) == {"0.1", "0.2", "0.3", "0.4"}
    assert [c["name"] for c in first["sanity"]["checks"]][0] == "monotone_in_eps"

    table = paths.table_markdown.read_text()
    assert "| model | Clean | AvgAcc | AvgRobAcc | 0.1 | 0.2 | 0.3 | 0.4 | sanity |" in table
    assert "| MMA-0.2 | " in table and "| untrained | " in table and "## Margins, linf" in table
    for png in (paths.robust_accuracy_png, paths.margins_png):
        width, height = png_size(png)
        assert width > 300 and height > 200
    assert sorted(p.name for p in out.iterdir()) == ["margins.png", "results.json", "results.md",
                                                     "robust_accuracy.png"]  # no temp file left


def test_a_failing_report_writes_no_file(tmp_path: Path, monkeypatch) -> None:
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    res = robust_accuracy(mlp(), (x, y), "linf", [0.1], nb_iter=1, restarts=1)

    def broken(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(report_module, "robust_accuracy_figure", broken)
    with pytest.raises(RuntimeError, match="plotting failed"):
        write_report([ModelEvaluation("m", res)], tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="names must be distinct"):
        write_report([ModelEvaluation("m", res), ModelEvaluation("m", res)], tmp_path)


def test_callback_logs_curve_and_margins_to_csv_and_tensorboard(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.rand(96, 1, 4, 4)
    y = (x.flatten(1).mean(1) > 0.5).long()
    dm = TensorDataModule(x, y, x_val=x[:32], y_val=y[:32], batch_size=32)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    module = MMAModule(net, norm="linf", max_eps=0.2, min_eps=0.02, nb_iter=2, search_steps=2, eval_eps=0.05,
                       eval_nb_iter=2, eval_search_steps=2, optimizer=partial(torch.optim.Adam, lr=1e-2))
    callback = RobustnessCallback([0.02, 0.05], every_n_epochs=2, max_samples=24, nb_iter=3, margin_nb_iter=3,
                                  margin_search_steps=3)
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=loggers, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(module, dm)
    assert net.training  # the check restored the training mode
    assert callback.last_result is not None and callback.last_result.num_samples == 24

    rows = list(csv.DictReader(open(next((tmp_path / "csv").rglob("metrics.csv")))))
    logged = [(int(r["epoch"]), float(r["robust/acc@0.05"])) for r in rows if r.get("robust/acc@0.05")]
    assert [epoch for epoch, _ in logged] == [1]  # every 2 epochs: only after the second of three
    assert logged[0][1] == pytest.approx(callback.last_result.robust_accuracy[1])
    assert any(r.get("robust/margin_mean") for r in rows)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"robust/curve", "robust/margins"} <= set(events.Tags()["images"])
    assert "robust/acc@0.02" in events.Tags()["scalars"]


# --- step sizes that fit the step count, sanity checks that flag a weak attack ---------------------------
def test_step_fits_the_step_count_and_the_papers_protocol_is_unchanged() -> None:
    from mma_lightning.evaluation import fit_step_fraction, protocol_step_fraction

    assert protocol_step_fraction("linf", eps_grid("mnist_linf")) == pytest.approx(1 / 40)
    assert protocol_step_fraction("linf", eps_grid("cifar10-linf")) == 0.25
    assert protocol_step_fraction("l2", eps_grid("mnist-l2")) == 0.25
    assert fit_step_fraction(100, 1 / 40) == pytest.approx(1 / 40)  # the paper's 100 steps: unchanged
    assert fit_step_fraction(100, 0.25) == 0.25
    for k in (1, 5, 20, 60):
        assert k * fit_step_fraction(k, 1 / 40) >= 2.5 - 1e-12  # K steps reach 2.5 eps: past the surface
    x, y = torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    for k, expected in ((100, 1 / 40), (20, 1 / 8), (3, 2.5 / 3)):
        res = robust_accuracy(net, (x, y), "linf", MNIST_LINF_EPS, nb_iter=k, restarts=1, losses=["ce"])
        assert res.settings["step_fraction"] == pytest.approx(expected) and res.settings["step_fitted"]
    given = robust_accuracy(net, (x, y), "linf", MNIST_LINF_EPS, nb_iter=20, restarts=1, step_fraction=0.01)
    assert given.settings["step_fraction"] == 0.01 and not given.settings["step_fitted"]  # used as given


def test_evaluate_model_step_follows_the_grid_protocol_and_eps_grid_accepts_underscores() -> None:
    assert eps_grid("mnist_linf") == eps_grid("MNIST-Linf") == MNIST_LINF_EPS
    x, y = torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    ev = evaluate_model(net, (x, y), "linf", eps_grid("mnist_linf"), restarts=1, margins=False, sanity=False,
                        progress=False)
    assert ev.pgd.settings["step_fraction"] == pytest.approx(1 / 40) and ev.pgd.settings["nb_iter"] == 100
    assert ev.protocol == "custom"  # 1 restart per loss: not the paper's
    ev = evaluate_model(net, (x, y), "linf", eps_grid("cifar10_linf"), nb_iter=20, restarts=1, margins=False,
                        sanity=False, progress=False, protocol="fast")
    assert ev.pgd.settings["step_fraction"] == 0.25 and ev.protocol == "fast"


def test_paper_only_with_the_papers_data_norm_steps_and_step_sizes() -> None:
    """Issue 19, item 5: a custom grid on MNIST-like data was called "paper" with steps of eps/4 (the paper's
    MNIST Linf step is eps/40), the data being read off the grid's values."""
    from mma_lightning.evaluation.report import protocol_text

    x, y = torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    quick = dict(margins=False, sanity=False, progress=False)

    def run(grid, **kwargs):
        return evaluate_model(net, (x, y), "linf", grid, **quick, **kwargs)

    custom = run([0.05, 0.1])  # the case: no dataset, a grid that is not a preset
    assert custom.protocol == "custom" and custom.pgd.settings["step_fraction"] == 0.25
    assert custom.pgd.settings["dataset"] is None
    assert protocol_text(custom).startswith(
        "protocol **custom** (not the MMA paper's protocol: the data is not known to be one of the paper's (pass "
        "dataset='mnist', 'fashion-mnist' or 'cifar10')): data unknown, norm linf, whitebox PGD, 100 steps of "
        "0.25·eps, fitted to the step count, 5 restarts with each of the losses ce, cw")
    mnist = run([0.05, 0.1], dataset="fashion-mnist")  # the data named: the paper's MNIST Linf step, eps/40
    assert mnist.protocol == "paper" and mnist.pgd.settings["step_fraction"] == pytest.approx(1 / 40)
    assert protocol_text(mnist).startswith("protocol **paper** (the MMA paper's protocol): data fashion-mnist, "
                                           "norm linf, whitebox PGD, 100 steps of 0.025·eps")
    wrong_step = run([0.05, 0.1], dataset="MNIST", protocol_step_fraction=0.25, protocol="paper")
    assert wrong_step.protocol == "custom"  # a "paper" name the settings do not match is refused
    assert "(not the MMA paper's protocol: step 0.25·eps, not 0.025·eps)" in protocol_text(wrong_step)
    other = run([0.05, 0.1], dataset="svhn")
    assert other.protocol == "custom" and other.pgd.settings["step_fraction"] == 0.25
    assert "the data svhn is not one of the paper's" in protocol_text(other)
    preset = run(MNIST_LINF_EPS)  # the paper's MNIST grid still means MNIST, as before, and says so
    assert preset.protocol == "paper" and preset.pgd.settings["step_fraction"] == pytest.approx(1 / 40)
    assert "data mnist (read off the eps grid)" in protocol_text(preset)
    cifar = run(eps_grid("cifar10-linf")[:2], dataset="cifar10")
    assert cifar.protocol == "paper" and cifar.pgd.settings["step_fraction"] == 0.25
    with pytest.raises(ValueError, match="dataset must be the data's name"):
        run([0.1], dataset=3)


def test_callback_default_step_fits_its_steps() -> None:
    callback = RobustnessCallback([0.1, 0.2], nb_iter=20)
    assert callback.step_fraction is None  # fitted by robust_accuracy: max(eps/4, 2.5 eps / 20)
    with pytest.raises(ValueError, match="step_fraction must be a float > 0"):
        RobustnessCallback([0.1], step_fraction=-1.0)


def test_a_weak_attack_is_flagged_and_a_strong_one_on_the_same_model_is_not(fixed_model, fashion,
                                                                             tmp_path: Path) -> None:
    """The issue's case: eps/40 steps with far fewer than 100 steps cannot reach the ball's surface."""
    x, y = fashion["x"], fashion["y"]
    common = dict(restarts=1, margins=False, probe_samples=200, progress=False)
    weak = evaluate_model(fixed_model, (x, y), "linf", [0.02, 0.05, 0.1], name="weak", step_fraction=1 / 40,
                          nb_iter=10, losses=["ce"], **common)
    # the fast protocol's attack: 20 steps of a step that fits them, CE and CW
    strong = evaluate_model(fixed_model, (x, y), "linf", [0.02, 0.05, 0.1], name="strong", nb_iter=20, **common)
    assert weak.flagged and "reference_attack_agrees" in weak.sanity.failed, weak.sanity.to_dict()
    check = next(c for c in weak.sanity.checks if c.name == "reference_attack_agrees")
    assert check.value > check.threshold and check.threshold == pytest.approx(0.02)
    assert "WEAKER than the reference" in check.message and "flagged above +2.0 points" in check.message
    assert not strong.flagged, strong.sanity.to_dict()
    assert strong.pgd.avg_robust_accuracy < weak.pgd.avg_robust_accuracy - 0.05  # the weak one overstates

    paths = write_report([weak, strong], tmp_path / "both")
    table = paths.table_markdown.read_text()
    assert table.splitlines()[2].startswith("**FLAGGED by the sanity checks: weak (reference_attack_agrees)")
    assert "| weak | `reference_attack_agrees` | **FLAGGED** |" in table and "| 2.0 |" in table
    assert "of the evaluation's" in table  # the probes' time next to the evaluation's
    doc = json.loads(paths.results_json.read_text())
    assert doc["flagged"] and doc["flagged_checks"] == {"weak": ["reference_attack_agrees"]}
    assert [m["flagged"] for m in doc["models"]] == [True, False]
    alone = write_report([strong], tmp_path / "strong")
    assert alone.table_markdown.read_text().splitlines()[2] == "Sanity: all sanity checks passed."
    assert not json.loads(alone.results_json.read_text())["flagged"]


@pytest.fixture(scope="module")
def adversarial_model(fashion) -> nn.Module:
    """The fixed MLP trained adversarially instead (PGD-AT, eps 0.1, 5 steps; 3 epochs, ~3 s): its robust
    accuracy is in the middle of its range at eps 0.1 and 0.2, where a one-step attack falls short."""
    torch.manual_seed(0)
    net = mlp()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(3):
        for i in range(0, 3000, 100):
            x, y = fashion["x_train"][i:i + 100], fashion["y_train"][i:i + 100]
            x_adv = pgd(net, x, y, "linf", 0.1, 5, 0.05)
            opt.zero_grad()
            nn.functional.cross_entropy(net(x_adv), y).backward()
            opt.step()
    return net.eval()


def test_probe_radii_are_those_where_weakness_shows() -> None:
    """Radii with robust accuracy in 5-95 %, the largest first, at most max_radii; else the one nearest half."""
    n = 100
    correct = torch.ones(n, dtype=torch.bool)
    robust = torch.zeros(n, 4, dtype=torch.bool)
    for k, count in enumerate((97, 60, 30, 2)):
        robust[:count, k] = True
    res = RobustnessResult("linf", (0.05, 0.1, 0.2, 0.3), 1.0, (0.97, 0.6, 0.3, 0.02), torch.arange(n),
                           torch.zeros(n, dtype=torch.long), correct, robust)
    assert probe_radii(res, 2) == (0.2, 0.1) and probe_radii(res, 1) == (0.2,)
    flat = RobustnessResult("linf", (0.1, 0.2), 1.0, (0.99, 0.97), torch.arange(n),
                            torch.zeros(n, dtype=torch.long), correct, robust[:, :2])
    assert probe_radii(flat, 2) == (0.2,)  # none in range: the radius nearest half the clean accuracy


def test_a_one_step_evaluation_is_flagged_at_the_large_radius_and_the_fast_protocol_is_not(
        adversarial_model, fashion, tmp_path: Path) -> None:
    """Issue 18: a one-step attack with the fitted step (2.5 eps) is nearly as strong as a long one at small
    radii; the reference probes at the radii where robust accuracy is 5-95 % (0.2 and 0.1 here) catch it at
    0.2, naming the radius and the gap. The fast protocol's attack on the same model is not flagged."""
    x, y = fashion["x"], fashion["y"]
    grid = [0.05, 0.1, 0.2]
    weak = evaluate_model(adversarial_model, (x, y), "linf", grid, name="one_step", nb_iter=1, margins=False,
                          progress=False)
    fast = evaluate_model(adversarial_model, (x, y), "linf", grid, name="fast", nb_iter=20, restarts=1,
                          margins=False, probe_samples=100, probe_radii=1, progress=False, protocol="fast")
    assert weak.sanity.settings["probe_radii"] == [0.2, 0.1]
    assert weak.flagged and weak.sanity.failed == ["reference_attack_agrees"], weak.sanity.to_dict()
    check = next(c for c in weak.sanity.checks if c.name == "reference_attack_agrees")
    assert check.value > check.threshold == pytest.approx(0.02)
    assert "at eps 0.2 the evaluated attack is WEAKER than the reference by" in check.message
    assert not fast.flagged, fast.sanity.to_dict()
    assert fast.sanity.settings["probe_radii"] == [0.2] and fast.sanity.settings["probe_samples"] == 100
    assert fast.pgd.robust_accuracy[-1] < weak.pgd.robust_accuracy[-1]  # the one-step attack overstates
    table = write_report([weak, fast], tmp_path).table_markdown.read_text()
    assert "| one_step | `reference_attack_agrees` | **FLAGGED** |" in table
    assert "| fast | `reference_attack_agrees` | ok |" in table
    assert "fast: probes at eps 0.2 on the first 100 test points; the probes took" in table
    with pytest.raises(ValueError, match="probe_reference must be one of"):
        evaluate_model(adversarial_model, (x, y), "linf", grid, probe_reference="fgsm")


@pytest.mark.skipif(importlib.util.find_spec("torchattacks") is None, reason="the autoattack extra")
def test_apgd_reference_flags_the_one_step_evaluation(adversarial_model, fashion) -> None:
    """The optional APGD reference (torchattacks) catches the same weak evaluation."""
    x, y = fashion["x"], fashion["y"]
    res = robust_accuracy(adversarial_model, (x, y), "linf", [0.05, 0.1, 0.2], nb_iter=1)
    report = gradient_masking_checks(adversarial_model, (x, y), res, reference="apgd", max_probe_radii=1)
    assert "reference_attack_agrees" in report.failed and "APGD" in report.settings["reference"]


@pytest.mark.slow
def test_the_quickstart_case_weak_evaluations_flagged_protocols_not(fashion, tmp_path: Path) -> None:
    """Issue 18's case: LeNet5-Madry trained 60 MMA steps as ``experiment=quickstart`` does (Fashion-MNIST, batch
    50, AN-PGD 10 steps, d_max 0.2, Adam 1e-3), 300 test points, eps 0.05 / 0.1 / 0.2. The 1-step and 3-step
    evaluations overstate the robust accuracy at eps 0.2 and are flagged there; the paper's protocol and
    ``evaluation=fast`` are not, and their probes cost at most 15 % of their evaluation's time."""
    from mma_lightning.models import LeNet5Madry

    pl.seed_everything(0)
    net = LeNet5Madry()
    module = MMAModule(net, norm="linf", max_eps=0.2, min_eps=0.02, nb_iter=10, eval_eps=0.1, eval_nb_iter=10,
                       optimizer=partial(torch.optim.Adam, lr=1e-3))
    data = FashionMNISTDataModule(data_dir=FASHION_DIR, download=False, val_size=1000, batch_size=50,
                                  num_workers=0)
    pl.Trainer(accelerator="cpu", max_steps=60, logger=False, enable_checkpointing=False, limit_val_batches=0,
               num_sanity_val_steps=0, enable_progress_bar=False).fit(module, datamodule=data)
    data.setup("test")
    x, y = (torch.stack(t) for t in zip(*((data.test_set[i][0], torch.tensor(data.test_set[i][1]))
                                         for i in range(300))))
    net.eval()
    grid = [0.05, 0.1, 0.2]
    fast = dict(nb_iter=20, restarts=1, margin_nb_iter=20, margin_search_steps=10, probe_samples=100,
                probe_radii=1, protocol="fast")  # conf/evaluation/fast.yaml
    runs = {"one_step": dict(nb_iter=1), "three_steps": dict(nb_iter=3), "fast": fast, "paper": {}}
    evaluations = {name: evaluate_model(net, (x, y), "linf", grid, name=name, progress=False, **kwargs)
                   for name, kwargs in runs.items()}
    for name in ("one_step", "three_steps"):
        check = next(c for c in evaluations[name].sanity.checks if c.name == "reference_attack_agrees")
        assert not check.passed and "at eps 0.2 the evaluated attack is WEAKER" in check.message, check.message
    for name in ("fast", "paper"):
        ev = evaluations[name]
        assert not ev.flagged, ev.sanity.to_dict()
        assert ev.sanity.settings["probe_seconds"] <= 0.15 * ev.sanity.settings["evaluation_seconds"]
    write_report(list(evaluations.values()), tmp_path)


def test_report_and_plots_name_the_protocol_and_the_points(fixed_model, fashion, tmp_path: Path) -> None:
    x, y = fashion["x"][:64], fashion["y"][:64]
    ev = evaluate_model(fixed_model, (x, y), "linf", MNIST_LINF_EPS, nb_iter=20, restarts=1, margin_nb_iter=5,
                        margin_search_steps=5, probe_samples=32, progress=False, protocol="fast")
    sha = ev.data_info["samples_sha256"][:12]
    table = write_report([ev], tmp_path).table_markdown.read_text()
    assert ("protocol **fast** (not the MMA paper's protocol: 20 steps, not 100; step 0.125·eps, not "
            "0.025·eps; 1 restart per loss, not 5): data mnist (read off the eps grid), norm linf, whitebox PGD, "
            "20 steps of 0.125·eps, fitted to the step count, 1 restart with each of the losses ce, cw") in table
    assert f"64 test points (sha256 {sha})" in table
    from mma_lightning.evaluation.report import plot_subtitle

    subtitle = plot_subtitle([ev])
    assert subtitle == ("protocol fast: PGD 20 steps of 0.125·eps, 1 restart per loss (ce, cw); 64 test "
                        f"points (sha256 {sha})")
    for fig in (robust_accuracy_figure({"m": ev.pgd}, subtitle=subtitle),
                margin_histogram_figure({"m": ev.margins}, MNIST_LINF_EPS, subtitle=subtitle)):
        ax = fig.axes[0]
        assert ax.get_legend() is None and len(fig.legends) == 1  # the legend is outside the axes
        assert fig._suptitle is not None and sha in fig._suptitle.get_text().replace("\n", " ")
    curve_ax = robust_accuracy_figure({"m": ev.pgd}).axes[0]
    assert curve_ax.get_ylim()[1] <= min(100, 100 * ev.pgd.clean_accuracy + 5) + 1e-9  # fitted to the data
    hist = margin_histogram_figure({"m": ev.margins}).axes[0]
    drawn = ev.margins.eps[ev.margins.correct]
    assert hist.get_xlim()[1] <= float(drawn.max()) * 1.06 + 1e-9  # no empty half of the x-axis
    assert hist.get_ylabel() == "correctly classified test points"
    assert f"{int(ev.margins.correct.sum())} correctly classified points (mean" in fig_legend_text(
        margin_histogram_figure({"m": ev.margins}))


def fig_legend_text(fig) -> str:
    return " ".join(t.get_text().replace("\n", " ") for t in fig.legends[0].get_texts())


def test_margin_search_is_passed_through() -> None:
    torch.manual_seed(0)
    model = nn.Linear(10, 2)
    x = torch.rand(32, 10)
    with torch.no_grad():
        y = model(x).argmax(1)
    runs = {search: estimate_margins(model, (x, y), "linf", 1.0, nb_iter=5, search_steps=6, search=search,
                                     clip_min=None, clip_max=None, rand_init=False)
            for search in ("bisection", "refined")}
    assert {s: r.settings["search"] for s, r in runs.items()} == {s: s for s in ("bisection", "refined")}
    assert not torch.equal(runs["bisection"].eps, runs["refined"].eps)  # a different search ran
    ev = evaluate_model(model, (x, y), "linf", [0.1], nb_iter=2, restarts=1, search="refined", sanity=False,
                        clip_min=None, clip_max=None, margin_nb_iter=5, margin_search_steps=6, progress=False)
    assert ev.margins.settings["search"] == "refined"
    with pytest.raises(ValueError, match=r"search must be one of \['bisection', 'refined'\]"):
        estimate_margins(model, (x, y), "linf", 1.0, search="golden")


@pytest.mark.parametrize("kwargs, match", [
    (dict(nb_iter=0), "nb_iter must be an integer >= 1"),
    (dict(margin_search_steps=0), "margin_search_steps must be an integer >= 1"),
    (dict(probe_samples=-1), "probe_samples must be an integer >= 1"),
    (dict(max_samples=0), "max_samples must be an integer >= 1 or None"),
    (dict(step_fraction="big"), "step_fraction must be a float > 0"),
    (dict(margin_max_eps=-1.0), "margin_max_eps must be a finite float > 0 or None"),
    (dict(search="golden"), r"search must be one of \['bisection', 'refined'\]"),
    (dict(autoattack_version="apgd"), "autoattack_version must be one of"),
    (dict(margins="yes"), "margins must be true or false"),
    (dict(clip_min=1.0, clip_max=0.0), "clip_min and clip_max must both be None"),
    (dict(losses=[]), "losses must be a non-empty sequence"),
])
def test_evaluate_model_refuses_bad_settings_before_any_work(kwargs: dict, match: str) -> None:
    class Untouchable(nn.Linear):
        def forward(self, x):
            raise AssertionError("the model ran before the settings were checked")

    with pytest.raises(ValueError, match=match):
        evaluate_model(Untouchable(4, 2), (torch.rand(4, 4), torch.zeros(4, dtype=torch.long)), "linf", [0.1],
                       **kwargs)


def test_a_long_evaluation_is_announced_with_the_fast_protocol(monkeypatch, caplog) -> None:
    from mma_lightning.evaluation import evaluate as evaluate_module

    x, y = torch.rand(40, 1, 4, 4), torch.zeros(40, dtype=torch.long)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    run = partial(evaluate_model, net, (x, y), "linf", [0.1], nb_iter=2, restarts=1, margin_nb_iter=2,
                  margin_search_steps=2, probe_samples=8, batch_size=10, progress=False)
    with caplog.at_level("INFO", logger="mma_lightning.evaluation.evaluate"):
        run(name="short")
    (record,) = [r for r in caplog.records if "short" in r.getMessage()]
    assert record.levelname == "INFO" and "the whole evaluation (40 points) will take about" in record.message
    monkeypatch.setattr(evaluate_module, "LONG_EVALUATION_S", 0.0)
    caplog.clear()
    with caplog.at_level("INFO", logger="mma_lightning.evaluation.evaluate"):
        run(name="long")
    (record,) = [r for r in caplog.records if "long" in r.getMessage()]
    assert record.levelname == "WARNING" and "evaluation=fast" in record.message
