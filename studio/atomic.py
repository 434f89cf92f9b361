"""Atomic file writes: a reader (or a crash) never sees half a file.

Every write that matters goes to a temporary file in the destination folder, is flushed to disk,
then renamed over the destination: a rename within one filesystem is atomic, so the old content or
the new one is there, never a mix. The folder itself is flushed after the rename where durability
across a power cut matters (``durable=True``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

SHARED_MODE = 0o644  # mkstemp creates 0600; studio outputs are meant to be read by the user's other tools


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename or unlink is durable only once its folder is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], object], *, mode: int = SHARED_MODE,
                 durable: bool = False) -> Path:
    """Create or replace ``path`` with what ``write(f)`` writes to a binary file object."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: str | Path, data: bytes, *, mode: int = SHARED_MODE, durable: bool = False) -> Path:
    """Create or replace ``path`` with ``data``."""
    return write_atomic(path, lambda f: f.write(data), mode=mode, durable=durable)


__all__ = ["SHARED_MODE", "fsync_dir", "write_atomic", "write_bytes_atomic"]
