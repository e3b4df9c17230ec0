"""``mma-train`` / ``mma-eval`` end to end: the installed console scripts as subprocesses, on real
Fashion-MNIST (Debian's dataset-fashion-mnist) with tiny settings (200 training images, 4 steps per epoch,
2 PGD steps).

Covered: what a run directory holds, resuming from ``ckpt_path`` (step count, optimiser, LR schedule, eps
table), ``mma-eval``, a multirun with two values, an Optuna sweep of 2 trials, 2-process CPU DDP (one run
directory, the same eps table on both ranks and in the checkpoint) and the bad-input errors.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

BIN = Path(sys.executable).parent
TESTS = Path(__file__).resolve().parent
FASHION = Path("/usr/share/datasets/fashion-mnist")
IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

pytestmark = pytest.mark.skipif(
    not all((FASHION / f"{name}.gz").is_file() for name in IDX),
    reason=f"Fashion-MNIST IDX files not in {FASHION}: `apt-get install -y dataset-fashion-mnist`",
)

# experiment=quickstart (Fashion-MNIST from FASHION, LeNet5-Madry, Linf, MMA, CPU), made tiny: batch 50 of 200
# training images = 4 steps per epoch, validation (100 images) and checkpoints at every epoch end.
TINY = [
    "experiment=quickstart",
    "data.train_subset=200",
    "data.val_size=100",
    "data.eval_batch_size=100",
    "trainer.val_check_interval=1.0",
    "trainer.check_val_every_n_epoch=1",
    "trainer.limit_test_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "attack.nb_iter=2",
    "attack.eval_nb_iter=2",
    "method.search_steps=3",
    "method.eval_search_steps=3",
]
# mma-eval's robustness evaluation made tiny: 50 test points, 2 PGD steps, 1 restart per loss, short margin
# searches and sanity probes (the method's test_step runs on one batch of 100).
EVAL_FAST = [
    "evaluation=fast",
    "evaluation.max_samples=50",
    "evaluation.nb_iter=2",
    "evaluation.margin_nb_iter=2",
    "evaluation.margin_search_steps=3",
    "evaluation.probe_samples=20",
    "evaluation.progress=false",
    "+data.num_workers=0",
    "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
]
# A step-indexed LR table that changes inside the runs below: lr 1e-3, then 1e-4 from step 6.
SCHEDULE = ["scheduler=piecewise_constant", "scheduler.boundaries=[6]", "scheduler.factors=[1.0,0.1]"]


class EpsTableDump(pl.Callback):
    """Test helper, built inside the subprocesses (``PYTHONPATH`` holds tests/): saves each rank's MMA eps
    table at the start and the end of training as ``<dirpath>/<start|end>_rank<r>.pt``."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Dump the table as training starts (after a checkpoint was restored)."""
        self._dump(trainer, pl_module, "start")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Dump the table as training ends."""
        self._dump(trainer, pl_module, "end")

    def _dump(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"{when}_rank{trainer.global_rank}.pt"
        torch.save(pl_module.eps_store.eps.detach().cpu().clone(), path)


def eps_dump(dirpath: Path) -> list[str]:
    """Overrides adding :class:`EpsTableDump` to a run's callbacks."""
    return ["+callbacks.eps_dump._target_=test_cli.EpsTableDump", f"+callbacks.eps_dump.dirpath={dirpath}"]


def run_cli(command: str, *overrides: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    """Run an installed console script from ``cwd``; with ``ok`` it must succeed."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    proc = subprocess.run([str(BIN / command), *overrides], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    if ok:
        output = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        assert proc.returncode == 0, f"{command} {' '.join(overrides)} failed:\n{output}"
    return proc


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSVLogger metrics file."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def column(rows: list[dict[str, str]], name: str) -> list[tuple[int, float]]:
    """``(step, value)`` of the rows where ``name`` was logged."""
    return [(int(r["step"]), float(r[name])) for r in rows if r.get(name)]


def load_ckpt(path: Path) -> dict:
    """A Lightning checkpoint as a dict."""
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny training run of 8 steps (2 epochs, 2 validations) with an LR step at 6, then tested."""
    root = tmp_path_factory.mktemp("trained")
    run_dir = root / "run"
    run_cli("mma-train", *TINY, *SCHEDULE, "trainer.max_steps=8", f"hydra.run.dir={run_dir}",
            *eps_dump(root / "dumps"), cwd=root)
    return run_dir


def test_train_run_dir_holds_resolved_config_checkpoints_and_logs(trained_run: Path):
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert "${" not in (trained_run / "config.yaml").read_text()  # resolved
    assert config["trainer"]["max_steps"] == 8 and config["method"]["net"]["_target_"].endswith("LeNet5Madry")
    assert config["paths"]["output_dir"] == str(trained_run)
    assert (trained_run / ".hydra" / "overrides.yaml").is_file()

    checkpoints = sorted(p.name for p in (trained_run / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and "last.ckpt" in checkpoints and checkpoints[0].startswith("best-step")
    last = load_ckpt(trained_run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 8
    eps = last["state_dict"]["eps_store.eps"]
    assert eps.shape == (200,) and (eps > 0).any()
    assert torch.equal(eps, torch.load(trained_run.parent / "dumps" / "end_rank0.pt"))

    rows = read_csv(trained_run / "csv" / "metrics.csv")
    assert [step for step, _ in column(rows, "val/avg_eps")] == [3, 7]  # each epoch end (steps 0-based)
    assert len(column(rows, "test/robust_acc")) == 1
    assert list((trained_run / "tensorboard").glob("events.out.tfevents.*"))
    assert (trained_run / "train.log").is_file()


def test_resume_continues_step_count_optimiser_schedule_and_eps_table(trained_run: Path, tmp_path: Path):
    last = trained_run / "checkpoints" / "last.ckpt"
    run_dir = tmp_path / "resumed"
    run_cli("mma-train", *TINY, *SCHEDULE, "trainer.max_steps=12", "test=false", f"ckpt_path={last}",
            f"hydra.run.dir={run_dir}", *eps_dump(tmp_path / "dumps"), cwd=tmp_path)

    saved = load_ckpt(last)["state_dict"]["eps_store.eps"]
    assert torch.equal(torch.load(tmp_path / "dumps" / "start_rank0.pt"), saved)  # eps memory restored
    resumed = load_ckpt(run_dir / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 12
    assert int(resumed["optimizer_states"][0]["state"][0]["step"]) == 12  # Adam went on, did not restart
    assert resumed["lr_schedulers"][0]["last_epoch"] == 12
    lrs = column(read_csv(run_dir / "csv" / "metrics.csv"), "lr-Adam")
    assert lrs and min(step for step, _ in lrs) >= 8  # logging continues at step 8, not 0
    assert all(lr == pytest.approx(1e-4) for _, lr in lrs)  # the schedule is past its step-6 boundary


def test_eval_tests_a_checkpoint_with_its_run_config_and_writes_the_report(trained_run: Path, tmp_path: Path):
    best = next((trained_run / "checkpoints").glob("best-*.ckpt"))
    out = tmp_path / "eval"
    proc = run_cli("mma-eval", f"ckpt_path={best}", f"hydra.run.dir={out}", *EVAL_FAST, "test_step=true",
                   cwd=tmp_path)
    report = json.loads((out / "metrics.json").read_text())
    (tested,) = report["checkpoints"]
    assert tested["ckpt_path"] == str(best) and tested["attack"]["eval_eps"] == pytest.approx(0.1)
    metrics = tested["metrics"]
    assert set(metrics) == {"test/acc", "test/robust_acc", "test/avg_eps", "test/loss"}
    assert 0 <= metrics["test/robust_acc"] <= metrics["test/acc"] <= 1

    # The robustness report: the paper's (Fashion-)MNIST Linf grid, chosen from the run's data and norm.
    (model,) = json.loads((out / "results.json").read_text())["models"]
    assert model["name"] == "quickstart/mma" and model["protocol"] == "fast"
    pgd = model["pgd"]
    # test_step ran on the robustness evaluation's 50 points: one clean accuracy per report.
    assert tested["num_samples"] == 50 and tested["samples_sha256"] == model["data"]["samples_sha256"]
    assert metrics["test/acc"] == pytest.approx(pgd["clean_accuracy"])
    assert pgd["norm"] == "linf" and pgd["eps"] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert len(pgd["robust_accuracy"]) == 4 and all(0 <= a <= 1 for a in pgd["robust_accuracy"])
    # 2 steps of the MNIST Linf protocol's eps/40 could not leave the ball's centre: the step fits 2 steps.
    assert pgd["settings"]["nb_iter"] == 2 and pgd["settings"]["step_fraction"] == pytest.approx(2.5 / 2)
    assert pgd["settings"]["protocol_step_fraction"] == pytest.approx(1 / 40)
    assert pgd["settings"]["dataset"] == "FashionMNIST"  # the run's data names the protocol
    last = [line for line in proc.stdout.splitlines() if line.strip()][-1]  # the log's last line: the verdict
    assert "sanity checks passed" in last or "FLAGGED by the sanity checks" in last, last
    assert model["model"]["ckpt_path"] == str(best.resolve()) and len(model["model"]["state_sha256"]) == 64
    assert model["data"]["split"] == "test" and model["data"]["num_samples"] == 50
    assert model["margins"] is not None and model["sanity"] is not None
    table = (out / "results.md").read_text()
    assert "| model | Clean | AvgAcc | AvgRobAcc | 0.1 | 0.2 | 0.3 | 0.4 | sanity |" in table
    assert "| quickstart/mma |" in table and "protocol **fast**" in table
    for png in ("robust_accuracy.png", "margins.png"):
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_eval_compares_several_checkpoints_in_one_table(trained_run: Path, tmp_path: Path):
    best = next((trained_run / "checkpoints").glob("best-*.ckpt"))
    last = trained_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "eval"
    run_cli("mma-eval", f"ckpt_paths=[{best},{last}]", f"hydra.run.dir={out}", *EVAL_FAST, "test_step=false",
            "evaluation.eps_grid=[0.05,0.1]", "evaluation.losses=[ce]", "evaluation.margins=false",
            "evaluation.sanity=false", cwd=tmp_path)
    models = json.loads((out / "results.json").read_text())["models"]
    names = [m["name"] for m in models]
    assert names == [f"quickstart/mma@{best.stem}", "quickstart/mma@last"]  # same run: told apart by file
    assert all(m["pgd"]["eps"] == pytest.approx([0.05, 0.1]) for m in models)
    table = (out / "results.md").read_text()
    assert table.count("| model | Clean | AvgAcc | AvgRobAcc | 0.05 | 0.1 | sanity |") == 1  # one table
    assert all(f"| {name} |" in table for name in names)
    assert (out / "robust_accuracy.png").read_bytes().startswith(b"\x89PNG")
    assert not (out / "margins.png").exists() and not (out / "metrics.json").exists()


def test_eval_started_again_reuses_the_finished_checkpoints(trained_run: Path, tmp_path: Path):
    last = trained_run / "checkpoints" / "last.ckpt"
    cache = tmp_path / "cache"
    args = [f"ckpt_path={last}", *EVAL_FAST, f"cache_dir={cache}", "evaluation.margins=false",
            "test_step=true"]
    run_cli("mma-eval", *args, f"hydra.run.dir={tmp_path / 'first'}", cwd=tmp_path)
    assert len(list(cache.glob("evaluation-*.pt"))) == 1 and list(cache.glob("pgd-*.pt"))
    assert len(list(cache.glob("test_step-*.json"))) == 1
    proc = run_cli("mma-eval", *args, f"hydra.run.dir={tmp_path / 'again'}", cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert "finished before with the same model, data and settings: reusing" in log
    assert "test_step finished before with the same weights, points and settings: reusing" in log
    first, again = (json.loads((tmp_path / d / "results.json").read_text())["models"][0]
                    for d in ("first", "again"))
    assert first["pgd"] == again["pgd"] and first["model"]["state_sha256"] == again["model"]["state_sha256"]
    assert (json.loads((tmp_path / "first" / "metrics.json").read_text())["checkpoints"][0]["metrics"]
            == json.loads((tmp_path / "again" / "metrics.json").read_text())["checkpoints"][0]["metrics"])


def test_eval_refuses_checkpoints_of_different_norms(trained_run: Path, tmp_path: Path):
    l2_run = tmp_path / "l2_run"
    (l2_run / "checkpoints").mkdir(parents=True)
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    config["method"]["norm"] = "l2"
    (l2_run / "config.yaml").write_text(yaml.safe_dump(config))
    (l2_run / "checkpoints" / "last.ckpt").symlink_to(trained_run / "checkpoints" / "last.ckpt")
    proc = run_cli("mma-eval", f"ckpt_paths=[{trained_run / 'checkpoints' / 'last.ckpt'},"
                   f"{l2_run / 'checkpoints' / 'last.ckpt'}]", f"hydra.run.dir={tmp_path / 'eval'}",
                   cwd=tmp_path, ok=False)
    assert proc.returncode != 0
    assert "the checkpoints of one comparison must share one norm" in proc.stderr, proc.stderr[-3000:]
    assert not list((tmp_path / "eval").glob("*.json"))


def test_multirun_two_values(tmp_path: Path):
    sweep = tmp_path / "multirun"
    run_cli("mma-train", "-m", *TINY, "seed=0,1", "trainer.max_steps=4", "test=false",
            f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    seeds = [yaml.safe_load((sweep / job / "config.yaml").read_text())["seed"] for job in ("0", "1")]
    assert seeds == [0, 1]
    weights = [load_ckpt(sweep / job / "checkpoints" / "last.ckpt")["state_dict"]["net.classifier.fc2.weight"]
               for job in ("0", "1")]
    assert not torch.equal(*weights)


def test_optuna_sweep_of_two_trials(tmp_path: Path):
    sweep = tmp_path / "optuna"
    run_cli("mma-train", *TINY, "hparams_search=optuna", "hydra.sweeper.n_trials=2", "trainer.max_steps=4",
            "test=false", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert 0 <= result["best_value"] <= 1
    assert set(result["best_params"]) == {"optimizer.lr", "method.clean_loss_coeff"}
    lrs = {yaml.safe_load((sweep / job / "config.yaml").read_text())["optimizer"]["lr"] for job in ("0", "1")}
    assert len(lrs) == 2  # two different trials


def test_ddp_cpu_two_processes_one_run_dir_one_eps_table(tmp_path: Path):
    cwd, dumps = tmp_path / "cwd", tmp_path / "dumps"
    run_dir = cwd / "run"
    run_cli("mma-train", *TINY, "trainer=ddp_cpu", "trainer.max_steps=8", "test=false",
            f"hydra.run.dir={run_dir}", *eps_dump(dumps), cwd=cwd)
    assert sorted(p.name for p in cwd.iterdir()) == ["run"]  # no second run directory for the second process
    assert (run_dir / "train_ddp_process_1.log").is_file() and (run_dir / "config.yaml").is_file()
    rank0, rank1 = torch.load(dumps / "end_rank0.pt"), torch.load(dumps / "end_rank1.pt")
    assert rank0.shape == (200,) and (rank0 > 0).any()
    assert torch.equal(rank0, rank1)
    assert torch.equal(load_ckpt(run_dir / "checkpoints" / "last.ckpt")["state_dict"]["eps_store.eps"], rank0)


def test_a_trainer_of_the_other_namespace_names_the_package_to_use(tmp_path: Path) -> None:
    """Issue 19, item 6: ``trainer._target_=lightning.pytorch.Trainer`` with the default (pytorch_lightning)
    method and data stops before the Trainer is built, naming mma_lightning.lightning."""
    pytest.importorskip("lightning")
    proc = run_cli("mma-train", *TINY, f"hydra.run.dir={tmp_path / 'run'}", "trainer._target_=lightning.pytorch.Trainer",
                   cwd=tmp_path, ok=False)
    assert proc.returncode != 0
    assert ("MMAModule is a pytorch_lightning class (from mma_lightning) and the Trainer is a lightning.pytorch "
            "Trainer (lightning.Trainer): a Trainer takes only the classes of its own namespace. With a "
            "lightning.pytorch Trainer, take the same classes from mma_lightning.lightning") in proc.stderr, \
        proc.stderr[-3000:]
    assert [p for p in tmp_path.rglob("*") if p.suffix in (".ckpt", ".json")] == []


@pytest.mark.parametrize(("command", "overrides", "message"), [
    ("mma-train", ["norm.name=l3"], "norm must be one of ['linf', 'l2'], got 'l3'"),
    ("mma-train", ["data.data_dir={tmp}/nowhere"], "FashionMNIST not found (download=False)"),
    ("mma-train", ["trainer=ddp_cpu", "data.batch_size=51"],
     "batch_size=51 is the global batch size and must be divisible by the trainer's world size (2 devices)"),
    ("mma-train", ["ckpt_path={tmp}/missing.ckpt"], "no such checkpoint file to resume from"),
    ("mma-train", ["trainer=ddp_cpu", "seed=0,1", "--multirun"],
     "use trainer.strategy=ddp_spawn in a multirun"),
    ("mma-eval", ["ckpt_path={tmp}/missing.ckpt"], "no such checkpoint file"),
    ("mma-eval", [], "give the checkpoint to evaluate as ckpt_path=<file> or several to compare as"),
    ("mma-eval", ["ckpt_path={ckpt}", "evaluation.eps_grid=[0.1,-0.2]"],
     "evaluation.eps_grid must hold finite eps > 0"),
    ("mma-eval", ["ckpt_path={ckpt}", "evaluation.eps_grid=svhn-linf"],
     "evaluation.eps_grid must be one of ['cifar10-l2', 'cifar10-linf', 'mnist-l2', 'mnist-linf']"),
    ("mma-eval", ["ckpt_path={tmp}/x.ckpt", "evaluation.nb_iter=0"],
     "evaluation.nb_iter must be an integer >= 1"),
    ("mma-eval", ["ckpt_path={tmp}/x.ckpt", "evaluation.search=golden"],
     "evaluation.search must be one of ['bisection', 'refined'], got 'golden'"),
    ("mma-eval", ["ckpt_path={tmp}/x.ckpt", "+evaluation.nb_iters=5"],
     "evaluation.nb_iters is not a setting of evaluate_model; the settings are ['name', 'nb_iter'"),
    ("mma-eval", ["ckpt_path={tmp}/x.ckpt", "evaluation.step_fraction=big"],
     "evaluation.step_fraction must be a float > 0"),
    ("mma-eval", ["ckpt_path={tmp}/x.ckpt", "device=tpu"],
     "device must be null (cuda when available, else cpu)"),
    ("mma-eval", ["ckpt_path={tmp}/x.ckpt", "test_step=maybe"], "test_step must be true, false or null"),
], ids=["norm", "missing-data", "batch-vs-devices", "resume-missing", "multirun-ddp", "eval-missing",
        "eval-no-ckpt", "eval-bad-grid", "eval-unknown-grid", "eval-nb-iter", "eval-search",
        "eval-unknown-key", "eval-step-fraction", "eval-device", "eval-test-step"])
def test_bad_input_fails_with_the_library_message(command: str, overrides: list[str], message: str,
                                                  tmp_path: Path, request: pytest.FixtureRequest):
    ckpt = ""
    if "{ckpt}" in " ".join(overrides):  # only these cases need the trained run
        ckpt = str(request.getfixturevalue("trained_run") / "checkpoints" / "last.ckpt")
    overrides = [o.format(tmp=tmp_path, ckpt=ckpt) for o in overrides]
    base = TINY if command == "mma-train" else []
    dirs = [f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = run_cli(command, *base, *dirs, *overrides, cwd=tmp_path, ok=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-3000:]
    report = proc.stderr[proc.stderr.index("Error executing job"):]
    # The message, without Lightning's or Hydra's frames (our own frames may live in site-packages).
    assert "pytorch_lightning" not in report and "hydra/_internal" not in report, report
    leftovers = [p for p in tmp_path.rglob("*") if p.suffix in (".ckpt", ".json")]
    assert leftovers == []  # nothing written that looks like a result


def plugin_path(tmp_path: Path) -> list[str]:
    """``PYTHONPATH`` entries that let Hydra find the project's launcher plugin: none when it is installed as a
    normal package; with an editable install (whose import hook Hydra's plugin scan cannot list) a folder
    holding ``hydra_plugins/mma_lightning_packed`` as a link to the source."""
    import pkgutil

    import hydra_plugins

    if any(m.name == "mma_lightning_packed" for m in pkgutil.iter_modules(hydra_plugins.__path__)):
        return []
    (tmp_path / "plugins" / "hydra_plugins").mkdir(parents=True)
    (tmp_path / "plugins" / "hydra_plugins" / "mma_lightning_packed").symlink_to(
        Path(__file__).resolve().parents[1] / "src" / "hydra_plugins" / "mma_lightning_packed")
    return [str(tmp_path / "plugins")]


def run_layout(run: Path) -> set[str]:
    """The files of a run directory, named without what changes between two runs of one config (a checkpoint's
    metric value, an event file's time and host)."""
    names = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
    return {re.sub(r"best-.*\.ckpt$", "best-<metric>.ckpt", re.sub(r"events\.out\.tfevents\..*$", "events", n))
            for n in names}


def test_packed_multirun_trains_as_the_basic_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hydra/launcher=packed with pack_size=3: of 4 runs (2 seeds x 2 radii), 3 train as one pack and the 4th
    alone; each equals the same run launched by the basic launcher (SGD: Adam's first steps turn float noise
    in the near-zero gradients of never-lit input pixels into whole steps of lr, by the sign of that noise)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(plugin_path(tmp_path) + [os.environ.get("PYTHONPATH", "")]))
    sweep = ["-m", *TINY, "seed=0,1", "attack.max_eps=0.15,0.2", "trainer.max_steps=4", "test=false",
             "optimizer=sgd", "optimizer.lr=0.05"]
    packed = run_cli("mma-train", *sweep, "hydra/launcher=packed", "hydra.launcher.pack_size=3",
                     f"hydra.sweep.dir={tmp_path / 'packed'}", cwd=tmp_path)
    assert "packed #0, #1, #2" in packed.stdout + packed.stderr
    assert "#3 runs alone: no other job of the sweep shares its shapes" in packed.stdout + packed.stderr
    run_cli("mma-train", *sweep, f"hydra.sweep.dir={tmp_path / 'basic'}", cwd=tmp_path)
    for job in ("0", "1", "2", "3"):
        runs = [tmp_path / kind / job for kind in ("packed", "basic")]
        configs = [yaml.safe_load((run / "config.yaml").read_text()) for run in runs]
        assert configs[0]["attack"] == configs[1]["attack"] and configs[0]["seed"] == configs[1]["seed"]
        states = [load_ckpt(run / "checkpoints" / "last.ckpt")["state_dict"] for run in runs]
        assert states[0].keys() == states[1].keys()
        for key in states[0]:
            assert torch.allclose(states[0][key].float(), states[1][key].float(), atol=1e-5), (job, key)
        rows = read_csv(runs[0] / "csv" / "metrics.csv")
        assert column(rows, "val/avg_eps") and column(rows, "train/loss")  # the run's own logs, unprefixed
        assert list((runs[0] / "checkpoints").glob("best-*.ckpt"))
        # what it leaves is what it leaves alone: the same files (margin plots, logs, checkpoints, summary), the
        # same logged columns (learning rate included)
        assert run_layout(runs[0]) == run_layout(runs[1]), job
        assert set(rows[0]) == set(read_csv(runs[1] / "csv" / "metrics.csv")[0]), job
