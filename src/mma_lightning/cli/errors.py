"""How ``mma-train`` / ``mma-eval`` report errors: every error goes to the run's log; a bad-input error (the
library's ``ValueError`` / ``FileNotFoundError``, whose message names the parameter and the allowed values)
is shown without the Lightning frames it came through, unless ``HYDRA_FULL_ERROR=1``. The exception still
propagates, so the exit code is non-zero."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
BAD_INPUT_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError)


def run_reporting_errors(task: Callable[[], T]) -> T:
    """``task()``; any exception is logged and re-raised, a bad-input error with a short traceback."""
    try:
        return task()
    except Exception as err:
        log.error("%s: %s", type(err).__name__, err)
        if isinstance(err, BAD_INPUT_ERRORS) and os.environ.get("HYDRA_FULL_ERROR") != "1":
            raise err.with_traceback(None) from None
        raise
