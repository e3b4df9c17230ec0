"""How ``mma-train`` / ``mma-eval`` report errors: every error goes to the run's log; a bad-input error (the
library's ``ValueError`` / ``FileNotFoundError``, whose message names the parameter and the allowed values)
is shown as that one message, without a Python traceback (Hydra prints a ``CompactHydraException`` as its
text), unless ``HYDRA_FULL_ERROR=1``. The error still propagates, so the exit code is non-zero."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TypeVar

from hydra.errors import CompactHydraException

log = logging.getLogger(__name__)

T = TypeVar("T")
BAD_INPUT_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError)


class BadInputError(CompactHydraException):
    """A bad-input error as the commands show it: ``<ErrorType>: <message>``, no traceback."""


def run_reporting_errors(task: Callable[[], T]) -> T:
    """``task()``; any exception is logged and re-raised, a bad-input error as :class:`BadInputError`."""
    try:
        return task()
    except Exception as err:
        log.error("%s: %s", type(err).__name__, err)
        if isinstance(err, BAD_INPUT_ERRORS) and os.environ.get("HYDRA_FULL_ERROR") != "1":
            raise BadInputError(f"{type(err).__name__}: {err}") from None
        raise
