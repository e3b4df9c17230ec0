"""The checkpoints of an ``mma-train`` run: the best by a monitored metric and ``last.ckpt``, the latest
state.

Lightning's ``ModelCheckpoint(save_last=True)`` (2.5+) refreshes ``last.ckpt`` only at steps where it also
saved a top-k checkpoint, so a validation that is not the best leaves ``last.ckpt`` at an older step, and
resuming from it (``ckpt_path=<run>/checkpoints/last.ckpt``) would silently repeat training steps with an
older optimiser state and MMA eps table. :class:`BestAndLastCheckpoint` writes ``last.ckpt`` wherever
Lightning considers saving (after validation or at epoch end) and when training ends, whatever the monitored
value.

:class:`AtomicCheckpointIO` makes every checkpoint write atomic (``trainer.plugins`` in ``conf/trainer/default.yaml``).
Both classes are namespace-free logic classes on this namespace's bases; ``mma_lightning.lightning.checkpoint``
has them on ``lightning.pytorch``'s (whose ``Trainer`` refuses a ``lightning_fabric`` checkpoint plugin).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.callbacks import ModelCheckpoint

from mma_lightning.evaluation.atomic import write_atomically
from mma_lightning.namespaces import ModelCheckpointHost


class BestAndLastCheckpointLogic(ModelCheckpointHost):
    """``ModelCheckpoint`` (same arguments) whose ``last.ckpt`` always holds the latest training state.

    The MMA reference keeps the checkpoint with the highest average validation margin
    (``monitor="val/avg_eps"``, ``mode="max"``); ``last.ckpt`` is the point to resume from.
    """

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning's top-k / last saving, then ``last.ckpt`` if it was not written at this step."""
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):  # else Lightning saves at train epoch end
            self._save_latest(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning's top-k / last saving (when it saves at epoch ends), then ``last.ckpt`` likewise."""
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_latest(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``last.ckpt`` of the final step (Lightning writes it only when no checkpoint was saved at all)."""
        super().on_train_end(trainer, pl_module)
        self._save_latest(trainer)

    def _save_latest(self, trainer: pl.Trainer) -> None:
        # Skipped when not fitting, in the sanity check, or when a checkpoint was saved at this step.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


# The pytorch_lightning classes: the namespace-free logic above on pytorch_lightning's base classes
# (mma_lightning.lightning builds the lightning.pytorch ones from the same logic classes).
class BestAndLastCheckpoint(BestAndLastCheckpointLogic, ModelCheckpoint):
    """:class:`BestAndLastCheckpointLogic` on pytorch_lightning (the default namespace)."""


class AtomicCheckpointIOLogic:
    """Lightning's ``TorchCheckpointIO`` (the class it is combined with) whose local writes are atomic and
    durable: the checkpoint goes to a temporary file in the destination's folder, is flushed to disk
    (``fsync``), then ``os.replace``-d over the destination and the folder is synced. A process killed at any
    moment (SIGKILL, power loss) leaves either the previous file or the new one, never a truncated
    ``last.ckpt``.

    (``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in the system's temp
    folder and is then moved, i.e. copied when that is another file system, without ``fsync``.) Remote paths
    (``s3://`` ...) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """``torch.save`` to memory, then :func:`~mma_lightning.evaluation.atomic.write_atomically` (a temporary
        file beside ``path``, ``fsync``, ``os.replace``) and an ``fsync`` of the folder."""
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)  # type: ignore[misc]
            return
        if storage_options is not None:
            raise ValueError("storage_options is not supported for local checkpoints (AtomicCheckpointIO), "
                             f"got {storage_options!r}")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()  # as Lightning's own writer and the evaluation cache do
        torch.save(checkpoint, buffer)
        write_atomically(target, buffer.getvalue())
        _fsync_dir(target.parent)


class AtomicCheckpointIO(AtomicCheckpointIOLogic, TorchCheckpointIO):
    """:class:`AtomicCheckpointIOLogic` on ``lightning_fabric``'s ``TorchCheckpointIO`` (pytorch_lightning's)."""


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
