"""Files that are never half-written: the report's files and the evaluation cache go to a temporary file in
the target's folder, are flushed to disk and renamed into place, so a crash or a kill at any moment leaves
either the previous complete file or the new one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def new_file_mode() -> int:
    """The permission bits the user's umask gives a new file (``0o644`` under umask ``022``)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, ``fsync`` it, then rename it onto ``path``. The file
    gets the permissions of any new file (the temporary file is created ``0600``, so it is opened up first)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
