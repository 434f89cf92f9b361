"""Atomic file writes: a reader (or a crash) never sees half a file.

Every write that matters goes to a temporary file in the destination folder, is flushed to disk,
then renamed over the destination: a rename within one filesystem is atomic, so the old content or
the new one is there, never a mix. The folder itself is flushed after the rename where durability
across a power cut matters (``durable=True``). A folder of files (a training checkpoint) is written
the same way: filled under a temporary name, then renamed into place (:func:`write_folder_atomic`).

A full disk (``ENOSPC``, or ``EDQUOT`` for a quota) is turned into :class:`~studio.core.errors.DiskFullError`
here and only here, after the temporary file or folder is removed: every write that goes through
this module leaves either the old content or the new, and says which folder needs space.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

from studio.core.errors import DiskFullError

SHARED_MODE = 0o644  # mkstemp creates 0600; studio outputs are meant to be read by the user's other tools
_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full_error(error: BaseException, folder: str | Path) -> BaseException:
    """``error`` as a :class:`DiskFullError` naming ``folder`` when it says the disk is full, else itself."""
    if isinstance(error, OSError) and not isinstance(error, DiskFullError) and error.errno in _FULL:
        what = "the disk quota is used up" if error.errno == errno.EDQUOT else "the disk is full"
        return DiskFullError(f"{what}: a write into {folder} stopped and left nothing partial; free space there "
                             f"(lora-studio gc --dry-run shows what it can remove) and try again", str(folder))
    return error


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename or unlink is durable only once its folder is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], object], *, mode: int = SHARED_MODE,
                 durable: bool = False) -> Path:
    """Create or replace ``path`` with what ``write(f)`` writes to a binary file object.

    Raises :class:`DiskFullError` when the disk fills up; the temporary file is gone by then and
    ``path`` holds what it held before.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        error = disk_full_error(e, path.parent)
        if error is e:
            raise
        raise error from e
    return path


def write_folder_atomic(path: str | Path, fill: Callable[[Path], object], *, durable: bool = True) -> Path:
    """Create or replace the folder ``path`` with what ``fill(tmp)`` writes into an empty folder.

    ``fill`` should write each file with :func:`write_atomic` (flushed to disk); the temporary folder
    is named ``.tmp-<name>-<random>`` beside ``path`` and removed on any error, so a reader sees the
    old folder or the complete new one. Replacing an existing folder removes it just before the
    rename (a rename cannot replace a non-empty folder), so only that instant has neither.
    """
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        fill(tmp)
        fsync_dir(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # A file written by ``fill`` already raised DiskFullError naming the temporary folder: name ours.
        error = disk_full_error(e.__cause__ if isinstance(e, DiskFullError) else e, path.parent)
        if error is e:
            raise
        raise error from e
    return path


def write_bytes_atomic(path: str | Path, data: bytes, *, mode: int = SHARED_MODE, durable: bool = False) -> Path:
    """Create or replace ``path`` with ``data``."""
    return write_atomic(path, lambda f: f.write(data), mode=mode, durable=durable)


__all__ = ["SHARED_MODE", "disk_full_error", "fsync_dir", "write_atomic", "write_bytes_atomic", "write_folder_atomic"]
