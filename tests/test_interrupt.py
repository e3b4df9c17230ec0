"""Interruptions: a signal stops training after the current step with a checkpoint to
resume from; a checkpoint write killed at any moment never leaves a truncated file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from mma_lightning.callbacks import StopOnSignal
from mma_lightning.cli.checkpoint import AtomicCheckpointIO
from test_resume import data, max_diff, module

BIN = Path(sys.executable).parent


class SendSignalLogic:
    """Test helper: sends ``signum`` to this process at the start of batch ``at_step``."""

    def __init__(self, signum: int, at_step: int) -> None:
        self.signum, self.at_step = signum, at_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)


class SendSignal(SendSignalLogic, pl.Callback):
    """For the pytorch_lightning Trainer."""


def trainer(root: Path, steps: int, *callbacks: pl.Callback) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, deterministic=True,
                      logger=False, callbacks=[ModelCheckpoint(dirpath=root, save_last=True), *callbacks],
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      plugins=[AtomicCheckpointIO()], default_root_dir=root)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_after_the_step_and_the_resumed_run_is_exact(tmp_path: Path, signum: int) -> None:
    """The step during which the signal arrives completes, last.ckpt holds it, and resuming from it gives
    bitwise the uninterrupted run (mid-epoch: 6 steps per epoch, signal during step 3)."""
    straight = module()
    pl.seed_everything(0)
    trainer(tmp_path / "straight", 8).fit(straight, datamodule=data())

    stop = StopOnSignal()
    first = module()
    before = signal.getsignal(signum)
    pl.seed_everything(0)
    with pytest.raises(SIGTERMException):
        trainer(tmp_path / "first", 8, stop, SendSignal(signum, at_step=3)).fit(first, datamodule=data())
    assert stop.received == signal.Signals(signum).name
    last = tmp_path / "first" / "last.ckpt"
    assert stop.saved_path == str(last)
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert signal.getsignal(signum) == before  # handlers put back

    resumed = module()
    pl.seed_everything(0)
    trainer(tmp_path / "resumed", 8).fit(resumed, datamodule=data(), ckpt_path=str(last))
    assert max_diff(straight, resumed) == 0.0


def test_stop_on_signal_under_a_lightning_pytorch_trainer(tmp_path: Path) -> None:
    """The lightning.pytorch mirrors: SIGTERM during step 3 stops the run after it, last.ckpt (written through
    the mirrored AtomicCheckpointIO) holds step 4, and lightning.pytorch's SIGTERMException ends fit."""
    pytest.importorskip("lightning")
    import lightning.pytorch as L
    from lightning.pytorch.utilities.exceptions import SIGTERMException as LSIGTERMException

    import mma_lightning.lightning as mml

    class SendSignalL(SendSignalLogic, L.Callback):
        """For the lightning.pytorch Trainer."""

    pl.seed_everything(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    module = mml.MMAModule(net, max_eps=0.2, min_eps=0.02, nb_iter=2, search_steps=2, eval_eps=0.05,
                           eval_nb_iter=2, eval_search_steps=2)
    x, y = torch.rand(60, 1, 4, 4), torch.arange(60) % 3
    dm = mml.data.TensorDataModule(x, y, val_size=0, batch_size=10, seed=7)
    stop, io = mml.callbacks.StopOnSignal(), mml.checkpoint.AtomicCheckpointIO()
    t = L.Trainer(accelerator="cpu", devices=1, max_steps=8, max_epochs=-1, logger=False,
                  callbacks=[L.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True), stop,
                             SendSignalL(signal.SIGTERM, at_step=3)],
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                  limit_val_batches=0, plugins=[io], default_root_dir=tmp_path)
    assert t.strategy.checkpoint_io is io
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(LSIGTERMException):
        t.fit(module, datamodule=dm)
    assert stop.received == "SIGTERM" and stop.saved_path == str(tmp_path / "last.ckpt")
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 4
    assert not list(tmp_path.glob("*.tmp")) and signal.getsignal(signal.SIGTERM) == before


def test_atomic_checkpoint_io_keeps_the_old_file_when_a_write_fails(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def dies(fd: int) -> None:  # the new bytes are written, the process "dies" before they are in place
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", dies)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left
    with pytest.raises(ValueError, match="storage_options"):
        io.save_checkpoint({"step": 3}, path, storage_options={"x": 1})


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_permissions_of_any_new_file(tmp_path: Path, umask: int) -> None:
    """Checkpoints and the evaluation's files are written to a temporary file (created 0600) and renamed into
    place: they get the mode the user's umask gives any new file (0644 under 022), as open() would."""
    from mma_lightning.evaluation.atomic import write_atomically

    old = os.umask(umask)
    try:
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
        write_atomically(tmp_path / "results.json", b"{}")
        (tmp_path / "plain.txt").write_text("x")  # what any other new file gets
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"last.ckpt": 0o666 & ~umask, "results.json": 0o666 & ~umask, "plain.txt": 0o666 & ~umask}


def test_sigkill_during_checkpoint_writes_leaves_a_loadable_file(tmp_path: Path) -> None:
    """A process rewriting a 16 MB checkpoint in a loop is SIGKILLed: the file left is always whole."""
    script = textwrap.dedent(f"""
        import torch
        from mma_lightning.cli.checkpoint import AtomicCheckpointIO
        io, step = AtomicCheckpointIO(), 0
        while True:
            state = {{"step": step, "w": torch.full((4_000_000,), float(step))}}
            io.save_checkpoint(state, {str(tmp_path / "last.ckpt")!r})
            step += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "last.ckpt").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.3)  # in the middle of later writes
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["w"].shape == (4_000_000,) and bool((ckpt["w"] == ckpt["step"]).all())


def test_stop_on_signal_refuses_unknown_signals() -> None:
    with pytest.raises(ValueError, match="signals"):
        StopOnSignal(signals=["SIGHUP"])
    with pytest.raises(ValueError, match="signals"):
        StopOnSignal(signals="SIGTERM")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs Fashion-MNIST")
def test_mma_train_sigterm_exits_0_with_a_loadable_last_checkpoint(tmp_path: Path) -> None:
    """``mma-train`` sent SIGTERM after its first checkpoint: exit status 0, last.ckpt at a later step, no
    test pass of the half-trained model, and the message says how to resume."""
    from test_cli import TINY

    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    proc = subprocess.Popen([str(BIN / "mma-train"), *TINY, "trainer.max_steps=100000", "logger=csv",
                             f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert last.exists(), "no first checkpoint"
        first_step = torch.load(last, weights_only=True)["global_step"]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] >= first_step
    assert "stopped by a signal" in out and f"ckpt_path={last}" in out
    assert "test/acc" not in out
    assert not list(run_dir.rglob("*.tmp"))
