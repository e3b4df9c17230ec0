"""Packed runs (issue 17): a pack of N runs trains as the N runs trained one by one; it resumes exactly; a run
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


def module(i: int, method: str = "mma") -> pl.LightningModule:
    """Run ``i``'s module, built after ``seed_everything(SEEDS[i])`` as a separate run would be."""
    pl.seed_everything(SEEDS[i])
    net = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    common: dict[str, Any] = dict(norm="linf", eval_eps=0.05, eval_nb_iter=2, eval_search_steps=2,
                                  optimizer=partial(torch.optim.Adam, lr=LRS[i]))
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
    with pytest.raises(ValueError, match=r"these runs also differ in \['method.nb_iter'\]"):
        train_pack([compose("experiment=quickstart"), compose("experiment=quickstart", "method.nb_iter=3")],
                   Path("/unused"))


def test_the_packing_benchmark_runs_at_a_reduced_size(tmp_path: Path) -> None:
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "packed.py"
    spec = importlib.util.spec_from_file_location("packed_benchmark", path)
    assert spec is not None and spec.loader is not None
    benchmark = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = benchmark  # its dataclass looks its module up
    spec.loader.exec_module(benchmark)
    report = benchmark.main(["--device", "cpu", "--model", "tiny", "--runs", "1,2", "--reps", "1",
                             "--json", str(tmp_path / "packed.json")])
    assert [(r["runs"], r["batching"]) for r in report["rows"]] == [(1, "-"), (2, "loop"), (2, "vmap")]
    assert all(r["images_per_s"] > 0 for r in report["rows"]) and report["rows"][0]["vs_one_run"] == 1.0
    assert (tmp_path / "packed.json").is_file()
