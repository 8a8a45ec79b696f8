"""Writing files safely, shared by site and coordinator: nothing partial ever replaces a good file, and a secret
is never readable by others, not even for an instant."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file in the same folder, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_with_mode(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write ``data`` to ``path`` with exactly ``mode``; the file never exists with wider permissions.

    New files: ``O_CREAT|O_EXCL`` with ``mode``. Overwrite: a temporary file (created 0600 by ``mkstemp``)
    in the same directory, chmod, fsync, then an atomic ``os.replace``.
    """
    if overwrite:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        target, cleanup = tmp, Path(tmp)
    else:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            raise FileExistsError(f"{path} already exists; refusing to overwrite it (use overwrite=True / --force)") \
                from None
        target, cleanup = None, path
    try:
        os.fchmod(fd, mode)  # exact mode whatever the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if target is not None:
            os.replace(target, path)
    except BaseException:
        cleanup.unlink(missing_ok=True)
        raise
