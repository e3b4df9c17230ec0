"""Bad input: every case is refused with an error that names the parameter and what is
allowed. The Python API cases raise ``ValueError`` / ``FileNotFoundError``; the command cases run
``mma-train`` / ``mma-eval`` in-process through their Hydra ``main`` and must print that one message
(no Python traceback), exit non-zero and leave no checkpoint, report or plot behind."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

from mma_lightning import MMAModule, PGDATModule, PGDLSModule, TRADESModule
from mma_lightning.attacks import find_margin, pgd
from mma_lightning.callbacks import NonFiniteGuard, StopOnSignal
from mma_lightning.cli.checkpoint import AtomicCheckpointIO
from mma_lightning.data import TensorDataModule, per_device_batch_size
from mma_lightning.data.resumable import ResumableDataLoader, ResumableSampler


def net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 3))


X, Y = torch.rand(10, 1, 4, 4), torch.arange(10) % 3
DATASET = list(range(10))

# (id, call, error type, text the message must contain)
API_CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    ("mma-norm", lambda: MMAModule(net(), norm="l3"), ValueError, "norm must be one of ['linf', 'l2']"),
    ("mma-not-a-net", lambda: MMAModule("lenet"), ValueError, "net must be a torch.nn.Module"),
    ("mma-min-eps-0", lambda: MMAModule(net(), min_eps=0.0), ValueError, "0 < min_eps <= max_eps"),
    ("mma-min-above-max", lambda: MMAModule(net(), min_eps=0.5, max_eps=0.1), ValueError,
     "0 < min_eps <= max_eps"),
    ("mma-clean-coeff", lambda: MMAModule(net(), clean_loss_coeff=2.0), ValueError,
     "clean_loss_coeff must be in [0, 1]"),
    ("mma-attack-success", lambda: MMAModule(net(), attack_success="loss"), ValueError,
     "attack_success must be one of"),
    ("mma-nb-iter", lambda: MMAModule(net(), nb_iter=0), ValueError, "nb_iter"),
    ("mma-search-steps", lambda: MMAModule(net(), search_steps=-1), ValueError, "search_steps"),
    ("mma-num-train-samples", lambda: MMAModule(net(), num_train_samples=0), ValueError,
     "num_train_samples must be a positive integer or None"),
    ("scheduler-interval", lambda: MMAModule(net(), scheduler_interval="batch"), ValueError,
     "scheduler_interval must be one of ['step', 'epoch']"),
    ("eval-eps", lambda: MMAModule(net(), eval_eps=0.0), ValueError, "eval_eps must be > 0"),
    ("eval-max-eps", lambda: MMAModule(net(), eval_eps=0.3, eval_max_eps=0.1), ValueError,
     "eval_max_eps must be >= eval_eps"),
    ("pgd-at-eps", lambda: PGDATModule(net(), eps=-0.1), ValueError, "eps must be a float >= 0"),
    ("pgd-at-step-scale", lambda: PGDATModule(net(), step_scale=0), ValueError, "step_scale must be a float > 0"),
    ("pgdls-ramp", lambda: PGDLSModule(net(), ramp_fraction=1.5), ValueError,
     "ramp_fraction must be a float in [0, 1]"),
    ("trades-beta", lambda: TRADESModule(net(), beta=-1.0), ValueError, "beta must be a float >= 0"),
    ("data-lengths", lambda: TensorDataModule(X, Y[:5]), ValueError,
     "x_train and y_train must have the same length"),
    ("data-batch-size", lambda: TensorDataModule(X, Y, batch_size=0), ValueError,
     "batch_size must be a positive int"),
    ("data-val-size", lambda: TensorDataModule(X, Y, val_size=10), ValueError,
     "val_size must satisfy 0 <= val_size < 10"),
    ("data-num-workers", lambda: TensorDataModule(X, Y, num_workers=-1), ValueError, "num_workers must be >= 0"),
    ("data-val-twice", lambda: TensorDataModule(X, Y, X, Y, val_size=2), ValueError,
     "pass either x_val/y_val or val_size > 0"),
    ("global-batch", lambda: per_device_batch_size(51, 2), ValueError, "must be divisible by the trainer's world size"),
    ("pgd-norm", lambda: pgd(net(), X, Y, norm="l1"), ValueError, "norm"),
    ("pgd-nb-iter", lambda: pgd(net(), X, Y, nb_iter=-1), ValueError, "nb_iter"),
    ("pgd-eps", lambda: pgd(net(), X, Y, eps=-0.1), ValueError, "eps"),
    ("margin-bounds", lambda: find_margin(net(), X, Y, init_eps=0.5, max_eps=0.1), ValueError,
     "max_eps must be >= init_eps"),
    ("margin-success", lambda: find_margin(net(), X, Y, success="close"), ValueError, "success must be one of"),
    ("sampler-replicas", lambda: ResumableSampler(DATASET, num_replicas=0), ValueError,
     "num_replicas must be a positive int"),
    ("sampler-rank", lambda: ResumableSampler(DATASET, num_replicas=2, rank=2), ValueError,
     "rank must be an int in [0, 1]"),
    ("sampler-skip", lambda: ResumableSampler(DATASET).skip(0, -3), ValueError, "samples must be >= 0"),
    ("loader-shuffle", lambda: ResumableDataLoader(DATASET, ResumableSampler(DATASET), shuffle=True), ValueError,
     "no shuffle=True: the sampler shuffles"),
    ("loader-sampler", lambda: ResumableDataLoader(DATASET, sampler=None), ValueError,  # type: ignore[arg-type]
     "sampler must be a ResumableSampler"),
    ("loader-state", lambda: ResumableDataLoader(DATASET, ResumableSampler(DATASET)).load_state_dict({"epoch": 0}),
     ValueError, "missing ['samples']"),
    ("signals", lambda: StopOnSignal(signals=["SIGHUP"]), ValueError,
     "signals must be names among ['SIGTERM', 'SIGINT', 'SIGUSR1']"),
    ("nonfinite-mode", lambda: NonFiniteGuard(mode="retry"), ValueError, "mode must be one of ['stop', 'skip']"),
    ("nonfinite-every", lambda: NonFiniteGuard(check_every_n_steps=0), ValueError,
     "check_every_n_steps must be a positive int or None"),
    ("checkpoint-io-options", lambda: AtomicCheckpointIO().save_checkpoint({}, "/tmp/x.ckpt", storage_options=1),
     ValueError, "storage_options is not supported"),
]


@pytest.mark.parametrize(("call", "error", "message"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_python_api_refuses_bad_values(call: Callable[[], Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)


# (id, command, overrides, text of the one message); {tmp} is the test's folder.
COMMAND_CASES = [
    ("train-norm", "train", ["norm.name=l3"], "norm must be one of ['linf', 'l2'], got 'l3'"),
    ("train-missing-ckpt", "train", ["ckpt_path={tmp}/missing.ckpt"], "no such checkpoint file to resume from"),
    ("train-truncated-ckpt", "train", ["ckpt_path={tmp}/truncated.ckpt"], "is not a whole checkpoint"),
    ("train-batch-size", "train", ["data.batch_size=0"], "batch_size must be a positive int, got 0"),
    ("train-eps-order", "train", ["method.min_eps=0.9"], "min_eps and max_eps must satisfy 0 < min_eps <= max_eps"),
    ("train-seed", "train", ["seed=abc"], "seed must be an integer or null, got 'abc'"),
    ("train-flag", "train", ["test=maybe"], "test must be true or false, got 'maybe'"),
    ("train-max-steps", "train", ["trainer.max_steps=abc"],
     "trainer.max_steps must be an integer >= -1 (-1: no limit)"),
    ("train-log-every", "train", ["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps must be an integer >= 1"),
    ("train-nonfinite-mode", "train", ["callbacks.nonfinite.mode=retry"], "mode must be one of ['stop', 'skip']"),
    ("train-signals", "train", ["callbacks.stop_on_signal.signals=[SIGHUP]"], "signals must be names among"),
    ("eval-missing-ckpt", "eval", ["ckpt_path={tmp}/missing.ckpt"], "no such checkpoint file"),
    # A sweep's metric that the run would never log: refused before training.
    ("train-metric-never-validated", "train", ["optimized_metric=val/robust_acc", "trainer.max_steps=2",
                                               "trainer.val_check_interval=5", "trainer.check_val_every_n_epoch=null"],
     "optimized_metric='val/robust_acc' is never logged: the run validates every 5 steps "
     "(trainer.val_check_interval) but trains 2 (trainer.max_steps)"),
    ("train-metric-unknown", "train", ["optimized_metric=val/robust_accuracy"],
     "optimized_metric='val/robust_accuracy' is not a metric of the method: it logs ['val/acc', "),
]


@pytest.mark.parametrize(("command", "overrides", "message"), [c[1:] for c in COMMAND_CASES],
                         ids=[c[0] for c in COMMAND_CASES])
def test_commands_print_one_message_and_write_nothing(command: str, overrides: list[str], message: str,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from mma_lightning.cli import eval as eval_cli
    from mma_lightning.cli import train as train_cli

    (tmp_path / "truncated.ckpt").write_bytes(b"PK\x03\x04" + bytes(100))  # a checkpoint cut short
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    args = [o.format(tmp=tmp_path) for o in overrides]
    base = ["data=mnist5k", "trainer.enable_progress_bar=false", "logger=csv"] if command == "train" else []
    monkeypatch.setattr(sys, "argv", [f"mma-{command}", *base, *args, f"hydra.run.dir={tmp_path / 'run'}"])
    main = train_cli.main if command == "train" else eval_cli.main
    with pytest.raises(SystemExit) as info:
        main()
    assert info.value.code not in (0, None)
    out, err = capsys.readouterr()
    assert message in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "Error executing job" in err
    assert (out + err).count(message) == 1, out + err  # printed once, not also by the console log
    written = [p for p in tmp_path.rglob("*") if p.suffix in (".ckpt", ".json", ".png", ".md", ".pdf")
               and p.name != "truncated.ckpt"]
    assert written == []
    assert not (tmp_path / "run").exists()  # no run directory left behind


def test_ctrl_c_in_mma_eval_prints_one_line_and_leaves_no_run_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from mma_lightning.cli import eval as eval_cli

    def interrupted(cfg):
        (Path(cfg.paths.output_dir) / "partial.txt").write_text("half")  # something the run wrote
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_cli, "evaluate", interrupted)
    monkeypatch.setattr(sys, "argv", ["mma-eval", "ckpt_path=x.ckpt", f"cache_dir={tmp_path / 'cache'}",
                                      f"hydra.run.dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as info:
        eval_cli.main()
    assert info.value.code == 130
    out, err = capsys.readouterr()
    assert err.strip() == (f"mma-eval: interrupted (Ctrl+C); the finished batches are kept in "
                           f"cache_dir={tmp_path / 'cache'}: the same command goes on from them")
    assert "Traceback" not in out + err and not (tmp_path / "run").exists()


def test_a_failed_run_keeps_its_checkpoints_and_what_was_there_before(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from mma_lightning.cli.errors import remove_failed_run, snapshot

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)

    kept = tmp_path / "resumable"  # a run stopped with a checkpoint: everything stays
    (kept / ".hydra").mkdir(parents=True)
    before = snapshot(kept)
    (kept / "checkpoints").mkdir()
    (kept / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (kept / "config.yaml").write_text("a: 1")
    remove_failed_run(kept, before)
    assert (kept / "config.yaml").is_file() and (kept / "checkpoints" / "last.ckpt").is_file()

    fixed = tmp_path / "fixed"  # a fixed hydra.run.dir holding the user's files: only the failed run's go
    (fixed / "notes").mkdir(parents=True)
    (fixed / "notes" / "mine.txt").write_text("keep")
    (fixed / "train.log").write_text("")
    before = snapshot(fixed)
    (fixed / "csv" / "version_0").mkdir(parents=True)
    (fixed / "csv" / "version_0" / "metrics.csv").write_text("step")
    (fixed / "config.yaml").write_text("a: 1")
    remove_failed_run(fixed, before)
    assert sorted(str(p.relative_to(fixed)) for p in fixed.rglob("*")) == ["notes", "notes/mine.txt", "train.log"]

    fresh = tmp_path / "fresh"  # only Hydra's record when the run began: the whole directory goes
    (fresh / ".hydra").mkdir(parents=True)
    (fresh / ".hydra" / "config.yaml").write_text("a: 1")
    (fresh / "train.log").write_text("")
    before = snapshot(fresh)
    (fresh / "config.yaml").write_text("a: 1")
    monkeypatch.setenv("LOCAL_RANK", "1")  # another DDP process of the same run: leaves the folder to rank 0
    remove_failed_run(fresh, before)
    assert fresh.is_dir()
    monkeypatch.setenv("LOCAL_RANK", "0")
    remove_failed_run(fresh, before)
    assert not fresh.exists()
