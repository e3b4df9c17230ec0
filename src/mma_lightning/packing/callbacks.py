"""Each run of a pack keeps its own callbacks, as if it had trained alone.

A run's config names callbacks that watch that run: margin plots (``margins/*.png`` in its directory and its
TensorBoard), the learning-rate monitor (``lr-Adam`` in its logs), the robustness check, or a user's own. In a
pack, :class:`RunCallback` wraps such a callback for run ``i``: every hook reaches it with run ``i``'s module (the
pack's member, attached to the pack's trainer) and :class:`RunTrainerView`, the pack's trainer as run ``i`` sees
it (its own loggers, checkpoint callback and directory, its validation and test loaders, its share of the merged
optimiser); validation and test batches reach it for run ``i``'s loader only, training batches as run ``i``'s
batch. Callbacks that steer training are the pack's own (checkpoints, the non-finite guard, the signal handler)
and are not wrapped; a run with early stopping is not packed (:mod:`mma_lightning.packing.train`).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from torch.optim import Optimizer

from mma_lightning.namespaces import CallbackHost, lightning_types
from mma_lightning.packing.checkpoint import RunCheckpointLogic
from mma_lightning.packing.logger import RunLoggerLogic


class RunTrainerView:
    """The pack's trainer as run ``run`` of the pack sees it; every attribute not listed below is the pack's
    trainer's (read and written).

    ``loggers`` / ``logger``: the run's own loggers (inside its :class:`~mma_lightning.packing.RunLogger`);
    ``checkpoint_callback``: its :class:`~mma_lightning.packing.RunCheckpoint`; ``default_root_dir``: its
    directory (beside its checkpoint folder); ``datamodule``, ``val_dataloaders``, ``test_dataloaders``: its own;
    ``optimizers`` / ``lr_scheduler_configs``: its share of the merged optimiser (its parameter groups, the same
    group dicts, so a scheduler's changes show), as its own optimiser of the same class.
    """

    def __init__(self, trainer: Any, pack: Any, run: int) -> None:
        self._trainer = trainer
        self._pack = pack
        self._run = run
        self._optimizer: tuple[Any, Optimizer] | None = None  # (the merged optimiser, the run's view of it)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trainer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):  # the view's own fields
            object.__setattr__(self, name, value)
        else:  # e.g. should_stop: the pack's trainer's (the view is not a second trainer)
            setattr(self._trainer, name, value)

    @property
    def loggers(self) -> list[Any]:
        """The run's own loggers (unwrapped: they receive what they are given, unprefixed)."""
        prefix = f"{self._pack.names[self._run]}/"
        return [lg.logger for lg in self._trainer.loggers if isinstance(lg, RunLoggerLogic) and lg.prefix == prefix]

    @property
    def logger(self) -> Any:
        """The run's first logger (``None`` without one)."""
        loggers = self.loggers
        return loggers[0] if loggers else None

    @property
    def checkpoint_callback(self) -> Any:
        """The run's :class:`~mma_lightning.packing.RunCheckpoint` (``None`` without one)."""
        return next((c for c in self._trainer.callbacks if isinstance(c, RunCheckpointLogic) and c.run == self._run),
                    None)

    @property
    def default_root_dir(self) -> str:
        """The run's directory: its checkpoint folder's parent (the trainer's directory without one)."""
        callback = self.checkpoint_callback
        dirpath = getattr(callback, "dirpath", None)
        return str(Path(dirpath).parent) if dirpath else self._trainer.default_root_dir

    @property
    def datamodule(self) -> Any:
        """The run's own datamodule (inside the pack's :class:`~mma_lightning.packing.PackedDataModule`)."""
        packed = self._trainer.datamodule
        return packed.datamodules[self._run] if packed is not None else None

    @property
    def val_dataloaders(self) -> Any:
        """The run's validation loader."""
        return self._own(self._trainer.val_dataloaders)

    @property
    def test_dataloaders(self) -> Any:
        """The run's test loader."""
        return self._own(self._trainer.test_dataloaders)

    def _own(self, loaders: Any) -> Any:
        return loaders[self._run] if isinstance(loaders, (list, tuple)) else loaders

    @property
    def optimizers(self) -> list[Optimizer]:
        """The run's share of the merged optimiser, as an optimiser of the same class."""
        merged = self._trainer.optimizers
        if not merged:
            return []
        if self._optimizer is None or self._optimizer[0] is not merged[0]:
            view = copy.copy(merged[0])  # same class, defaults and state; its own list of the run's groups
            view.param_groups = merged[0].param_groups[self._pack.run_param_groups(self._run)]
            self._optimizer = (merged[0], view)
        return [self._optimizer[1]]

    @property
    def lr_scheduler_configs(self) -> list[Any]:
        """The pack's schedules, each stepping the run's share of the optimiser (what a run's LR monitor reads)."""
        optimizers = self.optimizers
        return [replace(config, scheduler=_ScheduleView(config.scheduler, optimizers[0]))
                for config in self._trainer.lr_scheduler_configs] if optimizers else []


class _ScheduleView:
    """A scheduler of the merged optimiser as a run sees it: its ``optimizer`` is the run's share."""

    def __init__(self, scheduler: Any, optimizer: Optimizer) -> None:
        self._scheduler = scheduler
        self.optimizer = optimizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scheduler, name)


class RunCallbackLogic(CallbackHost):
    """``callback`` watching run ``run`` of a :class:`~mma_lightning.packing.PackedModule` as if it trained alone.

    Every hook is called with :class:`RunTrainerView` and the run's module; validation / test / predict batch
    hooks only for the run's own loader (as ``dataloader_idx=0``); training batch hooks with the run's batch
    and its loss (``outputs={"loss": ...}``, detached); optimiser hooks with the run's share of the optimiser.
    A run stopped after a non-finite loss gets no more hooks but ``on_exception`` and ``teardown``. The
    callback's state is saved in the pack's checkpoint under its own key, one per run.
    """

    def __init__(self, callback: Any, run: int) -> None:
        if isinstance(run, bool) or not isinstance(run, int) or run < 0:
            raise ValueError(f"run must be the index of a run of the pack (an int >= 0), got {run!r}")
        if not isinstance(callback, lightning_types("Callback")):
            raise TypeError(f"callback must be a Lightning callback, got {type(callback).__name__}")
        self.callback: Any = callback
        self.run = run
        self._view: RunTrainerView | None = None

    @property
    def state_key(self) -> str:
        """The wrapped callback's key, with the run's index (one state per run in the pack's checkpoint)."""
        return f"RunCallback[run={self.run}]{self.callback.state_key}"

    def state_dict(self) -> dict[str, Any]:
        """The wrapped callback's state."""
        return dict(self.callback.state_dict())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the wrapped callback's state."""
        self.callback.load_state_dict(state_dict)

    def _target(self, trainer: Any, pack: Any, hook: str) -> tuple[RunTrainerView, Any] | None:
        """The view and module the hook reaches the callback with (``None``: not for this run)."""
        if self.run >= len(pack.runs):
            raise ValueError(f"RunCallback(run={self.run}) but the pack has {len(pack.runs)} runs")
        if self.run in pack.stopped and hook not in ("on_exception", "teardown"):
            return None
        if self._view is None or self._view._trainer is not trainer or self._view._pack is not pack:
            self._view = RunTrainerView(trainer, pack, self.run)
        return self._view, pack.members[self.run]

    def _call(self, hook: str, trainer: Any, pack: Any, *args: Any, **kwargs: Any) -> None:
        target = self._target(trainer, pack, hook)
        if target is not None:
            getattr(self.callback, hook)(*target, *args, **kwargs)

    def _call_for_loader(self, hook: str, trainer: Any, pack: Any, dataloader_idx: int, *args: Any) -> None:
        if dataloader_idx == self.run or len(pack.runs) == 1:
            self._call(hook, trainer, pack, *args, 0)

    def _run_loss(self, pack: Any) -> Any:
        losses = getattr(pack, "last_losses", None)
        return None if losses is None else losses[self.run]

    # --- hooks that carry run-specific arguments ----------------------------------------------------------
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """The run's batch."""
        self._call("on_train_batch_start", trainer, pl_module, batch[self.run], batch_idx)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """The run's batch and loss."""
        self._call("on_train_batch_end", trainer, pl_module, {"loss": self._run_loss(pl_module)}, batch[self.run],
                   batch_idx)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        """The run's loss (detached: the pack's backward goes through the sum)."""
        self._call("on_before_backward", trainer, pl_module, self._run_loss(pl_module))

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """The run's share of the optimiser."""
        target = self._target(trainer, pl_module, "on_before_optimizer_step")
        if target is not None:
            self.callback.on_before_optimizer_step(*target, target[0].optimizers[0])

    def on_before_zero_grad(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """The run's share of the optimiser."""
        target = self._target(trainer, pl_module, "on_before_zero_grad")
        if target is not None:
            self.callback.on_before_zero_grad(*target, target[0].optimizers[0])

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        """The run's own validation loader only."""
        self._call_for_loader("on_validation_batch_start", trainer, pl_module, dataloader_idx, batch, batch_idx)

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        """The run's own validation loader only."""
        self._call_for_loader("on_validation_batch_end", trainer, pl_module, dataloader_idx, outputs, batch,
                              batch_idx)

    def on_test_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        """The run's own test loader only."""
        self._call_for_loader("on_test_batch_start", trainer, pl_module, dataloader_idx, batch, batch_idx)

    def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        """The run's own test loader only."""
        self._call_for_loader("on_test_batch_end", trainer, pl_module, dataloader_idx, outputs, batch, batch_idx)

    def on_predict_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        """The run's own loader only."""
        self._call_for_loader("on_predict_batch_start", trainer, pl_module, dataloader_idx, batch, batch_idx)

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        """The run's own loader only."""
        self._call_for_loader("on_predict_batch_end", trainer, pl_module, dataloader_idx, outputs, batch,
                              batch_idx)


def _forwarded(hook: str) -> Any:
    """A hook whose arguments after ``(trainer, pl_module)`` are the same for every run, passed on as they are."""
    def forward(self: RunCallbackLogic, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        self._call(hook, trainer, pl_module, *args, **kwargs)
    forward.__name__ = forward.__qualname__ = hook
    forward.__doc__ = f"The wrapped callback's ``{hook}``, as the run sees it."
    return forward


FORWARDED_HOOKS = (
    "setup", "teardown", "on_fit_start", "on_fit_end", "on_sanity_check_start", "on_sanity_check_end",
    "on_train_start", "on_train_end", "on_train_epoch_start", "on_train_epoch_end", "on_validation_start",
    "on_validation_end", "on_validation_epoch_start", "on_validation_epoch_end", "on_test_start", "on_test_end",
    "on_test_epoch_start", "on_test_epoch_end", "on_predict_start", "on_predict_end", "on_predict_epoch_start",
    "on_predict_epoch_end", "on_exception", "on_after_backward", "on_save_checkpoint", "on_load_checkpoint")
"""The Lightning callback hooks passed on with their arguments unchanged (the others are defined above)."""
for _hook in FORWARDED_HOOKS:
    setattr(RunCallbackLogic, _hook, _forwarded(_hook))


class RunCallback(RunCallbackLogic, pl.Callback):
    """:class:`RunCallbackLogic` on pytorch_lightning (the default namespace)."""
