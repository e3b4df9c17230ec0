"""Stop training on the first non-finite loss (naming the step and the last good checkpoint), or skip such
batches when asked; name the dataset indices of non-finite inputs.

A NaN loss silently ruins the weights, the optimiser moments and, for MMA, the eps table; every checkpoint
after it is worthless. Looking at the loss on the host every step would cost a device synchronisation per
step (the training step is kept free of them), so :class:`NonFiniteGuard` keeps device-side records, updated
without syncs: the first step whose loss was not finite, and the dataset indices of the first batch with a
non-finite input. The host reads them every ``check_every_n_steps`` steps (default: the trainer's
``log_every_n_steps``), at each epoch end, and before every checkpoint is written, so no checkpoint taken
after a non-finite loss is kept as good. Non-finite logits give a non-finite loss, so the loss covers them.

``mode="skip"`` (opt-in; one host sync per step) drops the update of a batch whose gradients are not finite
(every gradient set to ``None``, so the optimiser leaves the weights and its state alone; the LR schedule
still steps) and counts it as ``train/skipped_batches``. The batch's other effects (MMA's eps table, which
gets finite values from the search) stay.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from mma_lightning.namespaces import CallbackHost

log = logging.getLogger(__name__)

MODES = ("stop", "skip")


class NonFiniteError(ValueError):
    """Training produced a non-finite loss, or read a non-finite input."""


class NonFiniteGuardLogic(CallbackHost):
    """Callback logic: device-side records of non-finite losses / inputs, checked on the host now and then.

    Args:
        mode: ``"stop"`` (raise :class:`NonFiniteError` naming the step and the last good checkpoint) or
            ``"skip"`` (drop updates with non-finite gradients and count them; non-finite inputs are logged).
        check_every_n_steps: host check interval in steps (``None``: the trainer's ``log_every_n_steps``).
    """

    def __init__(self, mode: str = "stop", check_every_n_steps: int | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        if check_every_n_steps is not None and (isinstance(check_every_n_steps, bool)
                                                or not isinstance(check_every_n_steps, int)
                                                or check_every_n_steps < 1):
            raise ValueError(f"check_every_n_steps must be a positive int or None, got {check_every_n_steps!r}")
        self.mode = mode
        self.check_every_n_steps = check_every_n_steps
        self.skipped = 0
        """Updates dropped in ``mode="skip"``."""
        self._step: Tensor | None = None  # device-side step counter
        self._bad_step: Tensor | None = None  # first step with a non-finite loss, -1: none
        self._bad_input_step: Tensor | None = None
        self._bad_input_index: Tensor | None = None  # dataset indices of that batch's bad rows, -1 elsewhere
        self._reported_inputs = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Create the device-side records (one host-to-device copy, before the first step)."""
        device = pl_module.device
        self._step = torch.full((), trainer.global_step, dtype=torch.long, device=device)
        self._bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self._bad_input_step = torch.full((), -1, dtype=torch.long, device=device)
        self._bad_input_index = None
        self._reported_inputs = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Record (without a sync) the dataset indices of the first batch with a non-finite input."""
        if self._step is None or not isinstance(batch, (tuple, list)) or len(batch) != 3:
            return
        x, index = batch[0], batch[2]
        if not (torch.is_tensor(x) and x.is_floating_point() and torch.is_tensor(index)):
            return
        rows = ~torch.isfinite(x).reshape(x.shape[0], -1).all(dim=1)
        assert self._bad_input_step is not None
        first = (self._bad_input_step < 0) & rows.any()
        self._bad_input_step = torch.where(first, self._step, self._bad_input_step)
        marked = torch.where(rows, index.long(), torch.full_like(index.long(), -1))
        if self._bad_input_index is None or self._bad_input_index.shape != marked.shape:
            if self._bad_input_index is not None:  # a batch of another size: look now (rare; one sync)
                self._check(trainer, "a batch of another size")
            self._bad_input_index = torch.where(first, marked, torch.full_like(marked, -1))
        else:
            self._bad_input_index = torch.where(first, marked, self._bad_input_index)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Record (without a sync) the first step whose loss was not finite; check every few steps."""
        if self._step is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss):
            bad = ~torch.isfinite(loss.detach()).all()
            assert self._bad_step is not None
            self._bad_step = torch.where(bad & (self._bad_step < 0), self._step, self._bad_step)
        self._step = self._step + 1
        every = self.check_every_n_steps or max(1, int(trainer.log_every_n_steps))  # type: ignore[attr-defined]
        if trainer.global_step % every == 0:
            self._check(trainer, f"step {trainer.global_step}")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """``mode="skip"``: drop this update when a gradient is not finite (one host sync)."""
        if self.mode != "skip":
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self.skipped += 1
            log.warning("non-finite gradients at step %d: update skipped (%d so far)", trainer.global_step,
                        self.skipped)
        pl_module.log("train/skipped_batches", float(self.skipped), on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check at every epoch end."""
        self._check(trainer, "the end of the epoch")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Check before any checkpoint is written: none is kept after a non-finite loss."""
        self._check(trainer, "a checkpoint")

    def _check(self, trainer: pl.Trainer, when: str) -> None:
        if self._bad_step is None or self._bad_input_step is None:
            return
        records = torch.stack([self._bad_step, self._bad_input_step])
        if trainer.world_size > 1:  # every rank decides alike: the first bad step over all ranks
            gathered = trainer.strategy.all_gather(records).reshape(-1, 2)
            big = torch.iinfo(torch.long).max
            first = torch.where(gathered >= 0, gathered, torch.full_like(gathered, big)).min(dim=0).values
            records = torch.where(first == big, torch.full_like(first, -1), first)
        bad_step, bad_input_step = (int(v) for v in records.cpu())
        inputs = ""
        if bad_input_step >= 0 and self._bad_input_index is not None and not self._reported_inputs:
            index = self._bad_input_index.cpu()
            indices = index[index >= 0].tolist()  # this rank's share of the batch
            inputs = (f"the training batch of step {bad_input_step} has non-finite inputs at dataset indices "
                      f"{indices[:20]}{' ...' if len(indices) > 20 else ''}")
            if self.mode == "skip" or bad_step < 0:
                log.warning("%s (checked at %s)", inputs, when)
                self._reported_inputs = True
        if bad_step < 0 or self.mode == "skip":
            return
        raise NonFiniteError(
            f"non-finite training loss at step {bad_step} (checked at {when}); "
            f"{inputs + '; ' if inputs else ''}the last good checkpoint is {last_good_checkpoint(trainer)} "
            "(resume from it with ckpt_path=..., e.g. with a lower learning rate), or skip such batches with "
            "NonFiniteGuard(mode='skip') (mma-train: callbacks.nonfinite.mode=skip)")


def last_good_checkpoint(trainer: pl.Trainer) -> str:
    """The latest checkpoint written (all written before the non-finite step was seen), or ``"none yet"``."""
    callback = trainer.checkpoint_callback
    return (getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
            or "none yet") if callback is not None else "none yet"


class NonFiniteGuard(NonFiniteGuardLogic, pl.Callback):
    """:class:`NonFiniteGuardLogic` on pytorch_lightning (the default namespace)."""
