"""Stop a training run cleanly on a signal: finish the current optimiser step, write ``last.ckpt``, stop.

Long jobs on shared or preemptible machines are ended by a signal: ``SIGTERM`` (``kill``, a scheduler, SLURM
at the time limit or on pre-emption), ``SIGINT`` (Ctrl+C) or ``SIGUSR1`` (SLURM's warning ahead of the end,
``#SBATCH --signal=USR1@90``). Lightning notes a ``SIGTERM`` (``trainer.received_sigterm``) but stops only at the
end of the epoch on one device, and at the next step under DDP without writing a checkpoint; a ``SIGINT``
becomes a ``KeyboardInterrupt`` in the middle of whatever runs. :class:`StopOnSignal` turns all three into
"stop after this step": the step completes, ``last.ckpt`` is written (by the run's ``ModelCheckpoint``, which
then holds the exact state to resume from, data position and random streams included), and Lightning's
``SIGTERMException`` ends ``fit`` (``mma-train`` reports it and exits 0). A second ``SIGINT`` interrupts at once.
Under DDP, rank 0's signal decides for every rank (Lightning's per-step broadcast).

With Lightning's ``SLURMEnvironment(auto_requeue=True)`` (``trainer=slurm``), ``SIGUSR1`` stays Lightning's:
it writes an ``hpc_ckpt_*.ckpt`` and requeues the job, which resumes from it.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl

from mma_lightning.namespaces import CallbackHost, lightning_types

log = logging.getLogger(__name__)

SIGNAL_NAMES = ("SIGTERM", "SIGINT", "SIGUSR1")


class StopOnSignalLogic(CallbackHost):
    """Callback logic: on one of ``signals``, finish the step, write the last checkpoint, stop ``fit``.

    Args:
        signals: names among ``SIGTERM``, ``SIGINT``, ``SIGUSR1`` (those the platform has).
        ckpt_path: where to write the checkpoint when the run has no ``ModelCheckpoint`` with ``save_last``
            (default ``<default_root_dir>/checkpoints/last.ckpt``).
    """

    def __init__(self, signals: list[str] | tuple[str, ...] = SIGNAL_NAMES, ckpt_path: str | None = None) -> None:
        if isinstance(signals, str) or not all(isinstance(s, str) for s in signals):
            raise ValueError(f"signals must be a list of names among {list(SIGNAL_NAMES)}, got {signals!r}")
        unknown = [s for s in signals if s not in SIGNAL_NAMES]
        if unknown:
            raise ValueError(f"signals must be names among {list(SIGNAL_NAMES)}, got {unknown}")
        self.signals = tuple(s for s in signals if hasattr(signal, s))
        self.ckpt_path = ckpt_path
        self.received: str | None = None
        """The name of the signal that stopped the run (``None`` while none arrived)."""
        self.saved_path: str | None = None
        """The checkpoint written when the run stopped."""
        self._previous: dict[int, Any] = {}
        self._saved_step: int | None = None
        self._trainer: pl.Trainer | None = None

    # --- handlers -----------------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Install the handlers (after Lightning's own, which the SIGTERM handler chains)."""
        self.received, self.saved_path, self._saved_step, self._trainer = None, None, None, trainer
        if threading.current_thread() is not threading.main_thread():
            return
        env = trainer._accelerator_connector.cluster_environment
        slurm_requeue = isinstance(env, lightning_types("plugins.environments.SLURMEnvironment")) \
            and env.auto_requeue  # type: ignore[attr-defined]
        for name in self.signals:
            if name == "SIGUSR1" and slurm_requeue:
                continue  # Lightning's requeue handler
            signum = getattr(signal, name)
            previous = signal.getsignal(signum)
            self._previous[signum] = previous
            signal.signal(signum, self._handler(name, previous))

    def _handler(self, name: str, previous: Any) -> Callable[[int, FrameType | None], None]:
        def handle(signum: int, frame: FrameType | None) -> None:
            if name == "SIGINT" and self.received == "SIGINT":
                raise KeyboardInterrupt  # the second Ctrl+C: stop now
            self.received = self.received or name
            log.warning("received %s: stopping after the current step and writing the last checkpoint", name)
            if name == "SIGTERM" and callable(previous):
                previous(signum, frame)  # Lightning's notifier (sets received_sigterm, forwards to DDP children)
            elif self._trainer is not None:
                self._trainer._signal_connector.received_sigterm = True  # Lightning's stop path (DDP broadcast)

        return handle

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Put the previous handlers back."""
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._previous.items():
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}
        self._trainer = None

    # --- stopping -----------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """One device: after the step in which a signal arrived, write the checkpoint and stop (under DDP,
        Lightning's broadcast at the next step raises ``SIGTERMException`` on every rank: see ``on_exception``)."""
        if trainer.world_size == 1 and (self.received is not None or trainer.received_sigterm):
            self.received = self.received or "SIGTERM"
            self._save(trainer)
            trainer.should_stop = True
            trainer._signal_connector.received_sigterm = True

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Lightning stops a signalled run with ``SIGTERMException`` between two steps: write the checkpoint."""
        if isinstance(exception, lightning_types("utilities.exceptions.SIGTERMException")):
            self.received = self.received or "SIGTERM"
            self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> None:
        if self._saved_step == trainer.global_step:
            return
        self._saved_step = trainer.global_step
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "save_last", False) and hasattr(callback, "_save_last_checkpoint"):
                callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))  # type: ignore[attr-defined]
                self.saved_path = callback.last_model_path  # type: ignore[attr-defined]
                break
        else:
            path = self.ckpt_path or str(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt")
            trainer.save_checkpoint(path)
            self.saved_path = path
        log.warning("stopped by %s at step %d; resume with ckpt_path=%s", self.received, trainer.global_step,
                    self.saved_path)


class StopOnSignal(StopOnSignalLogic, pl.Callback):
    """:class:`StopOnSignalLogic` on pytorch_lightning (the default namespace)."""
