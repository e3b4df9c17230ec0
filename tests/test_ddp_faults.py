"""DDP faults, 2 CPU processes (``ddp_spawn``, gloo): a training set whose size the world
size does not divide, and resuming on another number of processes, keep one correct global eps table and
the data order. (A rank with no correct sample: tests/test_mma_module.py.)"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.strategies import DDPStrategy

from mma_lightning.data import TensorDataModule
from mma_lightning.data.resumable import ResumableSampler
from test_resume import module


class Record(pl.Callback):
    """Each rank saves its eps table at the start and the end of training, and the dataset indices of its
    training batches, as ``<out>/rank<r>.pt``."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.seen: list[list[int]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = pl_module.eps_store.eps.clone().cpu()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append([trainer.current_epoch, *batch[2].tolist()])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save({"start": self.start, "end": pl_module.eps_store.eps.cpu(), "seen": self.seen},
                   self.out / f"rank{trainer.global_rank}.pt")


def data(n: int) -> TensorDataModule:
    g = torch.Generator().manual_seed(3)
    y = torch.arange(n) % 3
    x = (0.5 + 0.25 * (y.view(-1, 1, 1, 1).float() - 1) + 0.15 * torch.randn(n, 1, 4, 4, generator=g)).clamp(0, 1)
    return TensorDataModule(x, y, batch_size=20, seed=7)


def fit(devices: int, out: Path, steps: int, n: int, ckpt_path: str | None = None,
        save_every: int | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    callbacks: list[pl.Callback] = [Record(out)]
    if save_every:
        callbacks.append(ModelCheckpoint(dirpath=out, every_n_train_steps=save_every, save_top_k=-1,
                                         filename="{step}"))
    # A hang would surface as gloo's timeout error instead of blocking the suite.
    strategy = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=120)) if devices > 1 else "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, logger=False,
                         enable_checkpointing=bool(save_every), callbacks=callbacks, limit_val_batches=0,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module(), datamodule=data(n), ckpt_path=ckpt_path)


def test_world_size_that_does_not_divide_the_training_set(tmp_path: Path) -> None:
    """101 samples on 2 ranks: DistributedSampler's order padded to 102, 5 batches of 10 per rank and epoch;
    both ranks end with the same 101-entry table and the batches are that order's."""
    fit(2, tmp_path, steps=10, n=101)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["end"].shape == (101,) and torch.equal(r0["end"], r1["end"])
    assert bool((r0["end"] > 0).any())
    for rank, rec in enumerate((r0, r1)):
        for epoch in (0, 1):
            sampler = ResumableSampler(list(range(101)), num_replicas=2, rank=rank, seed=7)
            sampler.set_epoch(epoch)
            batches = [b[1:] for b in rec["seen"] if b[0] == epoch]
            assert sum(batches, []) == list(sampler)[:50]


def check_resume_on_other_world_size(tmp_path: Path, first: int, then: int) -> None:
    """``first`` processes stop mid-epoch (step 3 of 5, 60 of 100 samples); ``then`` processes resume: the
    table they start from is the checkpoint's on every rank, they see exactly the 40 samples of epoch 0
    that were left, and they end with one table."""
    fit(first, tmp_path / "first", steps=3, n=100, save_every=3)
    ckpt = tmp_path / "first" / "step=3.ckpt"
    saved = torch.load(ckpt, weights_only=True)["state_dict"]["eps_store.eps"]
    fit(then, tmp_path / "then", steps=7, n=100, ckpt_path=str(ckpt))
    records = [torch.load(tmp_path / "then" / f"rank{r}.pt") for r in range(then)]
    order = list(ResumableSampler(list(range(100)), seed=7))
    rest = sorted(i for rec in records for b in rec["seen"] if b[0] == 0 for i in b[1:])
    assert rest == sorted(order[60:])
    for rec in records:
        assert torch.equal(rec["start"], saved)
        assert torch.equal(rec["end"], records[0]["end"])


@pytest.mark.slow
def test_resume_one_process_checkpoint_on_two(tmp_path: Path) -> None:
    check_resume_on_other_world_size(tmp_path, first=1, then=2)


@pytest.mark.slow
def test_resume_two_process_checkpoint_on_one(tmp_path: Path) -> None:
    check_resume_on_other_world_size(tmp_path, first=2, then=1)
