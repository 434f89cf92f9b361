"""A content-addressed blob store: immutable files named by the sha256 of their bytes.

Holds :class:`BlobStore`, which keeps blobs under ``$LORA_STUDIO_HOME/blobs`` as
``blobs/ab/abcdef...`` (the first two hex digits fan out into 256 folders, so no folder grows to
hundreds of thousands of entries). It writes atomically, verifies hashes, and never changes a blob
once written.

Does not hold: which blobs are still needed. The store knows bytes, not adapters; the registry
(``adapters/registry.py``) owns references and decides what :meth:`BlobStore.delete` may remove.

Write protocol (crash-safe at every step; ``studio.core.atomic.write_atomic``): copy into a temporary file
in the blob's own folder while hashing, compare with the expected sha256, fsync the file, chmod 0644,
rename over the final name, fsync the folder. A crash leaves either no blob or a complete one, plus
at worst a ``.tmp`` file that :meth:`BlobStore.stale_temp_files` finds for garbage collection; a
full disk is a ``DiskFullError`` that leaves nothing. Rename is atomic on POSIX, so two processes
putting the same bytes at once both succeed with one identical file.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from pathlib import Path

from studio.core.atomic import fsync_dir, write_atomic
from studio.core.errors import BlobNotFoundError, HashMismatchError, InputFileNotFoundError, InvalidRequestError
from studio.core.hashing import file_sha256
from studio.core.settings import get_settings

CHUNK = 1 << 20
BLOB_MODE = 0o644  # readable by everyone like any shared model file; safetensors writes 0600 sources
TEMP_SUFFIX = ".tmp"
_SHA256 = re.compile(r"[0-9a-f]{64}")
# (path, size, mtime_ns) of blobs whose bytes this process checked against their names (BlobStore.verified).
_VERIFIED: set[tuple[str, int, int]] = set()


# A rename or unlink is durable only once the folder holding the entry is flushed.
_fsync_dir = fsync_dir


def check_sha256(sha256: str) -> str:
    """Return ``sha256`` if it is 64 lowercase hex digits, else raise: blob names never come from users raw."""
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise InvalidRequestError(f"{sha256!r} is not a sha256 (64 lowercase hex digits)")
    return sha256


class BlobStore:
    """Files named by their sha256 under ``root`` (default ``$LORA_STUDIO_HOME/blobs``).

    >>> store = BlobStore()
    >>> sha = store.put_bytes(b"hello")
    >>> store.path(sha).read_bytes()
    b'hello'
    """

    def __init__(self, root: str | Path | None = None) -> None:
        if root is None:
            root = get_settings().blobs_dir
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"BlobStore({str(self.root)!r})"

    # ---- reading ---------------------------------------------------------------------------

    def path(self, sha256: str) -> Path:
        """Where the blob ``sha256`` lives (whether or not it exists)."""
        check_sha256(sha256)
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            raise BlobNotFoundError(f"blob {sha256} is not in the store {self.root}") from None

    def verify(self, sha256: str) -> bool:
        """Re-hash the stored blob: True when its bytes still hash to its name."""
        try:
            actual = file_sha256(self.path(sha256))
        except FileNotFoundError:
            raise BlobNotFoundError(f"blob {sha256} is not in the store {self.root}") from None
        return actual == sha256

    def verified(self, sha256: str) -> Path:
        """The blob's path once its bytes were checked against its name in this process (again whenever
        its size or modification time changes): a store on a shared disk can be damaged by another
        machine or the network, and a damaged adapter must not be applied as if it were the recorded one.
        Raises :class:`HashMismatchError` naming the blob and the store."""
        path = self.path(sha256)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise BlobNotFoundError(f"blob {sha256} is not in the store {self.root}") from None
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in _VERIFIED:
            if file_sha256(path) != sha256:
                raise HashMismatchError(f"blob {sha256[:12]}... in the store {self.root} no longer hashes to its "
                                        f"name: the stored copy is damaged; restore it from a backup or register "
                                        f"the original file again")
            _VERIFIED.add(key)
        return path

    def __iter__(self) -> Iterator[str]:
        """Every stored sha256 (a folder walk: for garbage collection, never for lookups)."""
        if not self.root.is_dir():
            return
        for fan in sorted(self.root.iterdir()):
            if fan.is_dir() and len(fan.name) == 2:
                for entry in sorted(fan.iterdir()):
                    if _SHA256.fullmatch(entry.name) and entry.name.startswith(fan.name):
                        yield entry.name

    def stale_temp_files(self, older_than_s: float = 3600.0) -> list[Path]:
        """Temporary files left by a crashed put, older than ``older_than_s`` (younger ones may be in flight)."""
        if not self.root.is_dir():
            return []
        cutoff = time.time() - older_than_s
        stale = []
        for fan in self.root.iterdir():
            if fan.is_dir():
                for entry in fan.iterdir():
                    if entry.name.endswith(TEMP_SUFFIX) and entry.stat().st_mtime < cutoff:
                        stale.append(entry)
        return stale

    # ---- writing ---------------------------------------------------------------------------

    def put_file(self, source: str | Path, *, sha256: str | None = None) -> str:
        """Store a copy of the file ``source``; return its sha256.

        ``sha256``: the hash the caller already computed (skips one read of the source). Either way
        the bytes actually copied are hashed again and must match, so a source that changes during
        the copy raises :class:`HashMismatchError` instead of storing a misnamed blob. Putting bytes
        that are already stored is a no-op.
        """
        source = Path(source)
        if not source.is_file():
            raise InputFileNotFoundError(f"{source} does not exist or is not a file")
        if sha256 is None:
            sha256 = file_sha256(source)
        check_sha256(sha256)
        if self._present(sha256, source.stat().st_size):
            return sha256

        def chunks():
            with open(source, "rb") as f:
                while chunk := f.read(CHUNK):
                    yield chunk

        self._write(sha256, chunks())
        return sha256

    def put_bytes(self, data: bytes, *, sha256: str | None = None) -> str:
        """Store ``data``; return its sha256 (a no-op when already stored)."""
        actual = hashlib.sha256(data).hexdigest()
        if sha256 is not None and check_sha256(sha256) != actual:
            raise HashMismatchError(f"bytes hash to {actual}, not the expected {sha256}")
        if not self._present(actual, len(data)):
            self._write(actual, iter((data,)))
        return actual

    def delete(self, sha256: str) -> bool:
        """Remove a blob; True if it existed. Only the registry's garbage collection should call this."""
        target = self.path(sha256)
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        _fsync_dir(target.parent)
        return True

    def _present(self, sha256: str, size: int) -> bool:
        """True when the blob is already stored, intact. A file of the wrong size, or of the right size whose
        bytes no longer hash to its name (damaged on a shared disk), is replaced by the put: registering
        the original file again repairs it. The hash is checked once per process and file state, as
        :meth:`verified` checks it."""
        path = self.path(sha256)
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        if st.st_size != size:
            return False
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in _VERIFIED:
            if file_sha256(path) != sha256:
                return False
            _VERIFIED.add(key)
        return True

    def _write(self, sha256: str, chunks) -> None:
        target = self.path(sha256)
        folder = target.parent
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            _fsync_dir(folder.parent)  # the new fan-out folder's entry in blobs/ must survive a crash too

        def copy(out) -> None:
            h = hashlib.sha256()
            for chunk in chunks:
                h.update(chunk)
                out.write(chunk)
            if h.hexdigest() != sha256:  # raised before the rename: the atomic writer removes the copy
                raise HashMismatchError(
                    f"the bytes copied hash to {h.hexdigest()}, not {sha256}: the source changed while it was "
                    f"being stored; try again once nothing is writing to it"
                )

        # The atomic writer removes its temporary file on any error and turns a full disk into
        # DiskFullError naming this folder; the folder is flushed here, through _fsync_dir.
        write_atomic(target, copy, mode=BLOB_MODE)
        _fsync_dir(folder)
