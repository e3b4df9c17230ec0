"""Packed runs: a pack of N runs trains as the N runs trained one by one; it resumes exactly; a run
that goes non-finite stops alone."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from mma_lightning import MMAModule, PGDATModule
from mma_lightning.data import TensorDataModule
from mma_lightning.packing import PackedDataModule, PackedModule

SEEDS = (0, 1, 2)
MAX_EPS = (0.2, 0.15, 0.25)
LRS = (1e-2, 5e-3, 1e-2)
STEPS = 20  # 100 training samples, batch 20: 5 steps an epoch, so 4 epochs and 4 validations


def data(seed: int) -> TensorDataModule:
    g = torch.Generator().manual_seed(3)
    y = torch.arange(120) % 3
    x = 0.5 + 0.25 * (y.view(-1, 1, 1, 1).float() - 1) + 0.15 * torch.randn(120, 1, 4, 4, generator=g)
    return TensorDataModule(x.clamp(0, 1), y, x_test=x[:20].clamp(0, 1), y_test=y[:20], val_size=20,
                            batch_size=20, seed=seed)


def module(i: int, method: str = "mma", **options: Any) -> pl.LightningModule:
    """Run ``i``'s module, built after ``seed_everything(SEEDS[i])`` as a separate run would be."""
    pl.seed_everything(SEEDS[i])
    net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    common: dict[str, Any] = dict(norm="linf", eval_eps=0.05, eval_nb_iter=2, eval_search_steps=2,
                                  optimizer=partial(torch.optim.Adam, lr=LRS[i]), **options)
    if method == "pgd_at":
        return PGDATModule(net, eps=MAX_EPS[i] / 2, nb_iter=2, **common)
    return MMAModule(net, max_eps=MAX_EPS[i], min_eps=0.02, nb_iter=2, search_steps=3, **common)


def trainer(root: Path, steps: int = STEPS, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, deterministic=True,
                                   logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                   enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root,
                                   log_every_n_steps=5)
    return pl.Trainer(**{**options, **kwargs})


def separate(i: int, root: Path, method: str = "mma") -> tuple[pl.LightningModule, dict[str, float]]:
    m = module(i, method)
    t = trainer(root / f"run{i}")
    pl.seed_everything(SEEDS[i])
    t.fit(m, datamodule=data(SEEDS[i]))
    return m, {k: float(v) for k, v in t.callback_metrics.items()}


def packed(root: Path, method: str = "mma", n: int = 3, batching: str = "vmap", **kwargs: Any
           ) -> tuple[PackedModule, pl.Trainer]:
    runs = [module(i, method) for i in range(n)]
    pack = PackedModule(runs, seeds=SEEDS[:n], batching=batching)
    t = trainer(root, **kwargs)
    t.fit(pack, datamodule=PackedDataModule([data(s) for s in SEEDS[:n]]))
    return pack, t


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


@pytest.mark.parametrize(("method", "batching"), [("mma", "vmap"), ("mma", "loop"), ("pgd_at", "vmap")])
def test_a_pack_of_three_equals_three_separate_runs(tmp_path: Path, method: str, batching: str) -> None:
    pack, t = packed(tmp_path / "pack", method, batching=batching)
    for i in range(3):
        alone, metrics = separate(i, tmp_path, method)
        run = pack.runs[i]
        assert max_diff(run.state_dict(), alone.state_dict()) < 1e-5  # weights, BN statistics, eps table
        if method == "mma":
            assert float(run.eps_store.eps.abs().max()) > 0  # the eps table was written
            assert torch.equal(run.eps_store.eps > 0, alone.eps_store.eps > 0)
        for name in ("val/acc", "val/robust_acc", "val/avg_eps", "train/loss"):
            assert abs(float(t.callback_metrics[f"run{i}/{name}"]) - metrics[name]) < 1e-5, name


def test_a_pack_resumes_exactly_mid_epoch(tmp_path: Path) -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    straight, _ = packed(tmp_path / "straight")
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=7, save_top_k=-1, filename="{step}")
    packed(tmp_path / "first", steps=7, callbacks=[saver], enable_checkpointing=True)
    runs = [module(i) for i in range(3)]
    resumed = PackedModule(runs, seeds=SEEDS, batching="vmap")
    trainer(tmp_path / "second").fit(resumed, datamodule=PackedDataModule([data(s) for s in SEEDS]),
                                     ckpt_path=str(tmp_path / "ckpt" / "step=7.ckpt"))
    assert max_diff(resumed.state_dict(), straight.state_dict()) == 0.0


class PoisonRun(pl.Callback):
    """Puts a NaN into run 1's last layer before step 3."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == 3:
            with torch.no_grad():
                pl_module.runs[1].net[4].weight[0, 0] = float("nan")


def test_a_non_finite_run_stops_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pack, t = packed(tmp_path / "pack", callbacks=[PoisonRun()])
    assert pack.stopped == {1}
    assert "run1 (seed=1, max_eps=0.15): non-finite training loss at step 3" in caplog.text
    for i in (0, 2):  # the others trained as if alone
        alone, _ = separate(i, tmp_path)
        assert max_diff(pack.runs[i].state_dict(), alone.state_dict()) < 1e-5
    frozen = pack.runs[1].net[4].weight.detach().clone()
    assert "run1/val/avg_eps" in t.callback_metrics  # logged before it stopped
    assert pack.run_checkpoint(1) is None  # no checkpoint after the non-finite loss
    assert torch.isnan(frozen).any()


def test_each_run_has_its_own_checkpoints_and_logs(tmp_path: Path) -> None:
    from pytorch_lightning.loggers import CSVLogger

    from mma_lightning.packing.checkpoint import RunCheckpoint
    from mma_lightning.packing.logger import RunLogger

    saves = [RunCheckpoint(run=i, dirpath=tmp_path / f"run{i}", monitor=f"run{i}/val/avg_eps", mode="max",
                           save_top_k=1, save_last=True, filename="best") for i in range(3)]
    loggers = [RunLogger(CSVLogger(tmp_path / f"run{i}", name="csv", version=""), prefix=f"run{i}/")
               for i in range(3)]
    pack, _ = packed(tmp_path / "pack", callbacks=saves, logger=loggers, enable_checkpointing=True)
    for i in range(3):
        last = torch.load(tmp_path / f"run{i}" / "last.ckpt", weights_only=False)
        assert last["global_step"] == STEPS
        alone = MMAModule.load_from_checkpoint(tmp_path / f"run{i}" / "last.ckpt", net=module(i).net)
        assert max_diff(alone.state_dict(), pack.runs[i].state_dict()) == 0.0
        assert alone.hparams.max_eps == MAX_EPS[i]
        optimizer = torch.optim.Adam(alone.net.parameters(), lr=LRS[i])
        optimizer.load_state_dict(last["optimizer_states"][0])  # the run's share of the pack's optimiser
        assert optimizer.param_groups[0]["lr"] == LRS[i]
        assert (tmp_path / f"run{i}" / "best.ckpt").is_file()
        header = (tmp_path / f"run{i}" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
        assert "val/avg_eps" in header and "train/loss" in header
        assert not any(name.startswith("run") for name in header)


class HookLog(pl.Callback):
    """Records what a run's callback is handed: the module, the trainer's directory, batches and losses."""

    def __init__(self) -> None:
        self.modules: set[int] = set()
        self.val_batches: list[int] = []
        self.train_sizes: list[int] = []
        self.losses: list[float] = []
        self.root = ""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.root = trainer.default_root_dir

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.modules.add(id(pl_module))
        self.train_sizes.append(len(batch[0]))
        self.losses.append(float(outputs["loss"]))

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self.val_batches.append(dataloader_idx)


def test_each_run_keeps_its_own_callbacks(tmp_path: Path) -> None:
    """Margin plots, the LR monitor (with a schedule) and any callback watch their run as if it trained alone:
    the run's directory holds what the same callbacks leave for a separate run."""
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    from mma_lightning.evaluation import MarginPlots
    from mma_lightning.packing import RunCallback, RunCheckpoint, RunLogger

    schedule = dict(scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=4, gamma=0.5))

    def outputs(root: Path) -> tuple[list[str], list[str], list[float]]:
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix != ".ckpt")
        rows = (root / "csv" / "metrics.csv").read_text().splitlines()
        lrs = [row.split(",")[rows[0].split(",").index("lr-Adam")] for row in rows[1:]]
        return files, sorted(rows[0].split(",")), [float(lr) for lr in lrs if lr]

    steps = 8
    logs = [HookLog() for _ in range(2)]
    callbacks: list[Any] = []
    for i in range(2):
        callbacks += [RunCheckpoint(run=i, dirpath=tmp_path / f"run{i}" / "checkpoints", save_last=True),
                      RunCallback(MarginPlots(bins=5), run=i), RunCallback(LearningRateMonitor(), run=i),
                      RunCallback(logs[i], run=i)]
    loggers = [RunLogger(CSVLogger(tmp_path / f"run{i}", name="csv", version=""), prefix=f"run{i}/")
               for i in range(2)]
    runs = [module(i, **schedule) for i in range(2)]
    pack = PackedModule(runs, seeds=SEEDS[:2])
    t = trainer(tmp_path, steps=steps, callbacks=callbacks, logger=loggers, enable_checkpointing=True)
    t.fit(pack, datamodule=PackedDataModule([data(s) for s in SEEDS[:2]]))

    alone = trainer(tmp_path / "alone", steps=steps, logger=CSVLogger(tmp_path / "alone", name="csv", version=""),
                    callbacks=[ModelCheckpoint(dirpath=tmp_path / "alone" / "checkpoints", save_last=True),
                               MarginPlots(bins=5), LearningRateMonitor()], enable_checkpointing=True)
    alone.fit(module(0, **schedule), datamodule=data(SEEDS[0]))
    files, header, lrs = outputs(tmp_path / "alone")
    assert any(f.startswith("margins/margins-step") for f in files), files
    for i in range(2):
        own_files, own_header, own_lrs = outputs(tmp_path / f"run{i}")
        assert (own_files, own_header) == (files, header)
        assert own_lrs == pytest.approx([lr * LRS[i] / LRS[0] for lr in lrs]) and len(lrs) > 0  # its own, scheduled
        assert logs[i].modules == {id(pack.runs[i])} and logs[i].root == str(tmp_path / f"run{i}")
        assert logs[i].val_batches == [0]  # its own validation loader (one batch), at the one epoch end
        assert logs[i].train_sizes == [20] * steps
    losses = t.callback_metrics
    assert logs[1].losses[-1] == pytest.approx(float(losses["run1/train/loss"]))


def test_a_run_callback_passes_on_every_lightning_hook() -> None:
    """Every hook of a Lightning callback (both namespaces) reaches the wrapped callback (a new Lightning hook
    would otherwise be silently dropped in packs)."""
    from mma_lightning.packing.callbacks import RunCallbackLogic

    for namespace in ("pytorch_lightning", "lightning.pytorch"):
        base = pytest.importorskip(namespace).Callback
        hooks = {n for n in vars(base) if n.startswith("on_") or n in ("setup", "teardown")}
        assert hooks <= set(vars(RunCallbackLogic)), hooks - set(vars(RunCallbackLogic))
    with pytest.raises(TypeError, match="callback must be a Lightning callback, got int"):
        RunCallbackLogic(3, run=0)
    with pytest.raises(ValueError, match="run must be the index of a run of the pack"):
        RunCallbackLogic(pl.Callback(), run=-1)


def test_a_pack_on_lightning_pytorch(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning.pytorch")
    import mma_lightning.lightning as mml

    runs = []
    for i in range(2):
        pl.seed_everything(SEEDS[i])
        runs.append(mml.MMAModule(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), max_eps=MAX_EPS[i], min_eps=0.02,
                                  nb_iter=2, search_steps=3, eval_eps=0.05, eval_nb_iter=2, eval_search_steps=2))
    datamodules = [mml.data.TensorDataModule(data(s).train_set.tensors[0], data(s).train_set.tensors[1],
                                             val_size=20, batch_size=20, seed=s) for s in SEEDS[:2]]
    pack = mml.packing.PackedModule(runs, seeds=SEEDS[:2])
    before = [run.net[1].weight.detach().clone() for run in runs]
    t = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    t.fit(pack, datamodule=mml.packing.PackedDataModule(datamodules))
    assert pack.global_step == 3
    assert all(not torch.equal(w, run.net[1].weight) for w, run in zip(before, runs))
    assert {"run0/train/loss", "run1/train/loss"} <= set(t.callback_metrics)


def test_a_captured_pack_equals_the_eager_one_without_recompiling(tmp_path: Path) -> None:
    """compile_step in a pack: the vmapped step (the GPU's batching) compiles whole (fullgraph) once and trains
    as the eager pack."""
    from torch._dynamo.utils import counters

    eager, _ = packed(tmp_path / "eager", n=2, steps=4)
    runs = [module(i) for i in range(2)]
    for run in runs:
        run.hparams.compile_step = {"backend": "aot_eager"}
    captured = PackedModule(runs, seeds=SEEDS[:2], batching="vmap")
    assert captured._graphs is not None
    torch._dynamo.reset()
    counters.clear()
    trainer(tmp_path / "captured", steps=4).fit(captured, datamodule=PackedDataModule([data(s) for s in SEEDS[:2]]))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    assert max_diff(captured.state_dict(), eager.state_dict()) < 1e-5


def compose(*overrides: str) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="mma_lightning.conf", version_base="1.3"):
        return hydra_compose(config_name="train", overrides=["paths.output_dir=/runs/x", *overrides])


def test_which_runs_share_a_pack() -> None:
    from mma_lightning.packing.train import pack_key, train_pack, unpackable_reason

    base = pack_key(compose("experiment=quickstart"))
    packable = ("seed=3", "attack.max_eps=0.1", "method.clean_loss_coeff=0", "optimizer.lr=0.01",
                "paths.output_dir=/runs/y")
    assert pack_key(compose("experiment=quickstart", *packable)) == base
    for apart in ("norm=l2", "trainer.max_steps=7"):
        assert pack_key(compose("experiment=quickstart", apart)) != base, apart
    assert unpackable_reason(compose("experiment=quickstart")) is None
    assert "several devices" in str(unpackable_reason(compose("experiment=quickstart", "trainer.devices=2")))
    early = ("+callbacks.stop._target_=pytorch_lightning.callbacks.EarlyStopping", "+callbacks.stop.monitor=val/acc")
    assert "callbacks.stop stops training early" in str(unpackable_reason(compose("experiment=quickstart", *early)))
    with pytest.raises(ValueError, match=r"these runs also differ in \['method.nb_iter'\]"):
        train_pack([compose("experiment=quickstart"), compose("experiment=quickstart", "method.nb_iter=3")],
                   Path("/unused"))


def packing_benchmark() -> Any:
    """``benchmarks/packed.py`` as a module."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "packed.py"
    spec = importlib.util.spec_from_file_location("packed_benchmark", path)
    assert spec is not None and spec.loader is not None
    benchmark = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = benchmark  # its dataclass looks its module up
    spec.loader.exec_module(benchmark)
    return benchmark


def test_the_packing_benchmark_runs_at_a_reduced_size(tmp_path: Path) -> None:
    benchmark = packing_benchmark()
    report = benchmark.main(["--device", "cpu", "--model", "tiny", "--runs", "1,2", "--reps", "1",
                             "--json", str(tmp_path / "packed.json")])
    assert [(r["runs"], r["batching"]) for r in report["rows"]] == [(1, "-"), (2, "loop"), (2, "vmap")]
    assert all(r["images_per_s"] > 0 for r in report["rows"]) and report["rows"][0]["vs_one_run"] == 1.0
    assert all(r["state"] == "off" and r["perf_drop_warnings"] == 0 for r in report["rows"])
    assert (tmp_path / "packed.json").is_file()
    # the captured step (dynamo's eager backend: tracing without code generation), plus the eager fp32 reference
    report = benchmark.main(["--device", "cpu", "--model", "tiny", "--runs", "2", "--reps", "1", "--warmup", "1",
                             "--batching", "loop", "--compile-backend", "eager"])
    rows = report["rows"]
    assert [(r["variant"], r["reference"]) for r in rows] == [
        ("one run", False), ("2 packed, loop", False), ("one run, eager fp32", True)]
    assert [r["state"] for r in rows] == ["captured", "captured", "off"], [r["fallback_reason"] for r in rows]
    assert all(r["first_call_s"] > 0 for r in rows[:2]) and rows[2]["first_call_s"] is None
    assert all(r["perf_drop_warnings"] == 0 and r["vs_reference"] > 0 and r["images_per_s"] > 0 for r in rows)


def test_the_packing_benchmark_times_a_sweep_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--sweep 2``: the same tiny sweep with the basic launcher and packed (it checks the runs were packed)."""
    import os
    import shlex

    from test_cli import FASHION, TINY, plugin_path

    if not FASHION.is_dir():
        pytest.skip(f"Fashion-MNIST not in {FASHION}")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(plugin_path(tmp_path) + [os.environ.get("PYTHONPATH", "")]))
    overrides = shlex.join([*TINY, "trainer.max_steps=2", "test=false"])
    report = packing_benchmark().main(["--sweep", "2", "--reps", "1", "--overrides", overrides,
                                       "--workdir", str(tmp_path / "sweeps")])
    assert [r["variant"] for r in report["rows"]] == ["one after another", "packed"]
    assert all(r["seconds"] > 0 for r in report["rows"]) and report["rows"][0]["vs_one_after_another"] == 1.0
    for job in ("0", "1"):
        assert (tmp_path / "sweeps" / "packed-0" / job / "checkpoints" / "last.ckpt").is_file()
        assert (tmp_path / "sweeps" / "one-after-another-0" / job / "checkpoints" / "last.ckpt").is_file()
