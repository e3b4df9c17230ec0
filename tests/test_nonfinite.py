"""Non-finite values: a NaN loss stops training with the step, the offending dataset
indices and the last good checkpoint, and no checkpoint is written after it; ``mode="skip"`` drops the
update instead and counts it."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from mma_lightning.callbacks import NonFiniteError, NonFiniteGuard
from mma_lightning.data import TensorDataModule
from mma_lightning.data.resumable import ResumableSampler
from test_resume import module

BAD_INDEX = 37  # a training sample whose image holds a NaN


def poisoned_data() -> TensorDataModule:
    g = torch.Generator().manual_seed(3)
    y = torch.arange(120) % 3
    x = (0.5 + 0.25 * (y.view(-1, 1, 1, 1).float() - 1) + 0.15 * torch.randn(120, 1, 4, 4, generator=g)).clamp(0, 1)
    x[BAD_INDEX, 0, 1, 2] = float("nan")
    return TensorDataModule(x, y, batch_size=20, seed=7)


def bad_step() -> int:
    """The step (batch of epoch 0) that holds BAD_INDEX, from the training order."""
    order = list(ResumableSampler(list(range(120)), seed=7))
    return order.index(BAD_INDEX) // 20


def fit(root: Path, guard: NonFiniteGuard, steps: int = 6) -> tuple[pl.Trainer, pl.LightningModule]:
    m = module()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, num_sanity_val_steps=0,
                         callbacks=[guard, ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_last=True)],
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(m, datamodule=poisoned_data())
    return trainer, m


def test_nan_loss_stops_with_step_indices_and_last_good_checkpoint(tmp_path: Path) -> None:
    step = bad_step()
    assert 0 < step < 5
    with pytest.raises(NonFiniteError) as info:
        fit(tmp_path, NonFiniteGuard(check_every_n_steps=50))  # found before the next checkpoint, not at step 50
    message = str(info.value)
    assert f"non-finite training loss at step {step}" in message
    assert f"step {step} has non-finite inputs at dataset indices [{BAD_INDEX}]" in message
    last = tmp_path / "last.ckpt"
    assert f"last good checkpoint is {last}" in message
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == step  # written before the bad step, none after
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_skip_mode_drops_the_update_and_counts_it(tmp_path: Path) -> None:
    guard = NonFiniteGuard(mode="skip")
    trainer, m = fit(tmp_path, guard)
    assert guard.skipped == 1
    assert trainer.global_step == 6
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert float(trainer.callback_metrics["train/skipped_batches"]) == 1.0
