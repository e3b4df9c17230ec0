"""How ``mma-train`` / ``mma-eval`` report errors and interruptions.

- A bad-input error (the library's ``ValueError`` / ``FileNotFoundError``, whose message names the parameter
  and the allowed values) is shown once, as that one message on stderr, without a Python traceback (Hydra
  prints a ``CompactHydraException`` as its text), unless ``HYDRA_FULL_ERROR=1``. Every error also goes to the
  run's log file (not to the console a second time). The error still propagates: the exit code is non-zero.
- Ctrl+C (``KeyboardInterrupt``) outside Lightning's own handling prints one line and exits with code 130.
- A failed or interrupted run leaves nothing that looks like a result: the run directory Hydra made for it is
  removed unless it holds a checkpoint (something to resume or evaluate); in a directory that held files
  before (a fixed ``hydra.run.dir``), only what the failed run added is removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hydra.errors import CompactHydraException

log = logging.getLogger(__name__)

T = TypeVar("T")
BAD_INPUT_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError)
INTERRUPTED_EXIT_CODE = 130
"""The shell's exit code of a command stopped by Ctrl+C (128 + SIGINT)."""


class BadInputError(CompactHydraException):
    """A bad-input error as the commands show it: ``<ErrorType>: <message>``, no traceback."""


def run_reporting_errors(task: Callable[[], T], command: str = "mma-train", interrupted: str = "",
                         remove_run_dir: bool = True) -> T:
    """``task()`` in the run directory Hydra made; any exception is logged to the run's log file and
    re-raised, a bad-input error as :class:`BadInputError`; Ctrl+C prints ``<command>: interrupted (Ctrl+C)``
    and ``interrupted`` (what is kept, how to go on) and exits with :data:`INTERRUPTED_EXIT_CODE`. Either way
    (with ``remove_run_dir``: inside a Hydra job, whose output directory is this task's) a run directory without
    a checkpoint is removed (:func:`remove_failed_run`)."""
    run_dir = hydra_output_dir() if remove_run_dir else None
    before = snapshot(run_dir)
    try:
        return task()
    except KeyboardInterrupt:
        log_to_files(logging.WARNING, f"{command}: interrupted (Ctrl+C)")
        remove_failed_run(run_dir, before)
        print(f"{command}: interrupted (Ctrl+C){interrupted}", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None
    except SystemExit as stop:  # Lightning's own Ctrl+C handling ends with sys.exit(1)
        if stop.code not in (0, None):
            remove_failed_run(run_dir, before)
        raise
    except Exception as err:
        log_to_files(logging.ERROR, f"{type(err).__name__}: {err}")
        remove_failed_run(run_dir, before)
        if isinstance(err, BAD_INPUT_ERRORS) and os.environ.get("HYDRA_FULL_ERROR") != "1":
            raise BadInputError(f"{type(err).__name__}: {err}") from None
        raise


def hydra_output_dir() -> Path | None:
    """The output directory Hydra made for this job (``None`` outside a Hydra command)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return Path(HydraConfig.get().runtime.output_dir)


def snapshot(run_dir: Path | None) -> set[Path]:
    """The paths under ``run_dir`` now (relative), before the task adds its own."""
    if run_dir is None or not run_dir.is_dir():
        return set()
    return {p.relative_to(run_dir) for p in run_dir.rglob("*")}


def hydra_files(path: Path) -> bool:
    """Whether a path of a run directory is Hydra's own record (``.hydra/``, the job's ``.log``)."""
    return path.parts[0] == ".hydra" or (len(path.parts) == 1 and path.suffix == ".log")


def remove_failed_run(run_dir: Path | None, before: set[Path]) -> None:
    """Remove what a failed run wrote into ``run_dir``, unless a checkpoint is there (``*.ckpt``: a state to
    resume or evaluate, kept with everything beside it). A directory that held only Hydra's record when the
    task began is removed whole; otherwise only the paths the task added. Global rank 0 only (DDP)."""
    if run_dir is None or not run_dir.is_dir() or not global_rank_zero():
        return
    if any(run_dir.rglob("*.ckpt")):
        return
    if all(hydra_files(path) for path in before):
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for path in sorted(run_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.relative_to(run_dir) in before:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def global_rank_zero() -> bool:
    """Whether this process is the first of its job: rank 0 under torchrun, Lightning's launched processes and
    srun (any rank variable set to another value means another process)."""
    return all(os.environ.get(key, "0") == "0" for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def log_to_files(level: int, message: str) -> None:
    """``message`` into the log files of the root logger (the run's log) only: the console shows the error
    once, as Hydra prints it."""
    record = log.makeRecord(log.name, level, __file__, 0, message, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
