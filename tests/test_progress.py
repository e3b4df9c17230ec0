"""Resume-aware progress bars: a run resumed mid-epoch and extended counts ``6/6``, not
Lightning's ``6/1`` (``220/19`` in the issue), and the rich bar's title has no ``/-2`` for unbounded epochs;
``mma-train`` refuses to resume a finished run, saying how to extend or evaluate it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
from pytorch_lightning.demos.boring_classes import BoringModel

from mma_lightning.callbacks import RichProgressBar, TQDMProgressBar
from mma_lightning.cli.train import check_resume_has_steps_left


class Recorder(TQDMProgressBar):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, Any]] = []

    def on_train_end(self, trainer: Any, module: Any) -> None:
        self.seen.append((self.train_progress_bar.n, self.train_progress_bar.total))
        super().on_train_end(trainer, module)


def fit(tmp_path: Path, max_steps: int, ckpt_path: Path | None = None) -> Recorder:
    bar = Recorder()
    trainer = pl.Trainer(max_steps=max_steps, max_epochs=-1, accelerator="cpu", logger=False, callbacks=[bar],
                         enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path)
    trainer.fit(BoringModel(), ckpt_path=ckpt_path)  # 32 batches an epoch
    trainer.save_checkpoint(tmp_path / f"step{max_steps}.ckpt")
    return bar


def test_a_resumed_and_extended_run_counts_its_epoch_to_max_steps(tmp_path: Path) -> None:
    assert fit(tmp_path, 4).seen == [(4, 4)]
    assert fit(tmp_path, 6, tmp_path / "step4.ckpt").seen == [(6, 6)]  # Lightning's own bar: 6/1


def test_the_rich_title_leaves_out_unbounded_epochs() -> None:
    pytest.importorskip("rich")

    class Trainer:  # what the title reads
        max_epochs = -1

    bar = RichProgressBar()
    bar._trainer = Trainer()  # type: ignore[assignment]
    assert bar._get_train_description(0).strip() == "Epoch 0"
    Trainer.max_epochs = 5
    assert bar._get_train_description(2).strip() == "Epoch 2/4"


def test_resuming_a_finished_run_says_so(tmp_path: Path) -> None:
    fit(tmp_path, 4)
    ckpt = tmp_path / "step4.ckpt"
    with pytest.raises(ValueError, match=r"is the end of a finished run \(it trained 4 steps and "
                                         r"trainer.max_steps=4\): resuming it would train nothing. To train it "
                                         r"longer, raise trainer.max_steps \(e.g. trainer.max_steps=8\)"):
        check_resume_has_steps_left(ckpt, {"max_steps": 4, "max_epochs": -1})
    check_resume_has_steps_left(ckpt, {"max_steps": 6, "max_epochs": -1})  # steps left: fine
