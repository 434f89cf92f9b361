"""The hashes people look LoRA files up by, and a strict reader of the safetensors header.

Holds: :func:`read_header` (validates a ``.safetensors`` file's layout and returns its tensors and
metadata without loading a byte of weights), :func:`hash_weights` (every hash in one pass over the
file), and the single hashes on their own: :func:`file_sha256`, :func:`tensor_sha256`,
:func:`autov2`, :func:`a1111_legacy_hash`.
Every file's sha256 in the studio is read here (the blob store, registration, base-model cache
keys, input images): one chunked reader, so a multi-GB file never sits in memory.

Does not hold: key-format detection or conversion (peft vs kohya), metadata writing, or anything that
needs torch; those live in ``adapters/formats.py``.

The safetensors layout this relies on: 8 bytes little-endian ``N``, then ``N`` bytes of JSON header
(tensor name -> dtype, shape, data_offsets; optional ``__metadata__`` of str -> str), then the tensor
bytes. Editing metadata rewrites only the header, so a hash of the bytes after it survives metadata
edits; that is kohya's ``sshs_model_hash`` idea and our ``tensor_sha256``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from studio.core.errors import CorruptWeightsError, InputFileNotFoundError

CHUNK = 1 << 20  # 1 MiB reads: large enough that Python overhead is noise next to sha256 itself
A1111_OFFSET = 0x100000  # A1111's legacy "model hash": 64 KiB read at offset 1 MiB ...
A1111_LENGTH = 0x10000  # ... so files under 1 MiB hash the empty string (e3b0c442), as A1111 does
AUTOV2_LENGTH = 10  # Civitai's AutoV2: the first 10 hex digits of the whole file's sha256
A1111_LEGACY_LENGTH = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library refuses headers above 100 MB too


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header describes it: no data is read."""

    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]  # [begin, end) within the data section that follows the header


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of a ``.safetensors`` file."""

    header_size: int  # N: the JSON header's length; the tensor bytes start at 8 + N
    file_size: int
    tensors: dict[str, TensorEntry] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)  # ``__metadata__``; {} when absent

    @property
    def data_offset(self) -> int:
        return 8 + self.header_size


@dataclass(frozen=True)
class WeightsHashes:
    """Every hash of one weights file (all lowercase hex)."""

    sha256: str  # the whole file: names the blob in the store; ``sha256:<prefix>`` references use it
    tensor_sha256: str  # the bytes after the header (kohya's sshs_model_hash): unchanged by metadata edits
    autov2: str  # first 10 hex of ``sha256`` (Civitai)
    a1111_legacy: str  # sha256 of 64 KiB at offset 1 MiB, first 8 hex (A1111's old "model hash")
    size_bytes: int


def _corrupt(path: Path, reason: str) -> CorruptWeightsError:
    return CorruptWeightsError(
        f"{path} cannot be read as safetensors ({reason}); the file is damaged or not a weights file: "
        f"download or export it again"
    )


def _parse_header(path: Path, head: bytes, raw: bytes, file_size: int) -> SafetensorsHeader:
    n = int.from_bytes(head, "little")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"header is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise _corrupt(path, "header is not a JSON object")
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    data_len = file_size - 8 - n
    tensors: dict[str, TensorEntry] = {}
    end_max = 0
    for name, entry in obj.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise _corrupt(path, f"tensor {name!r} has a malformed entry")
        if end > data_len:
            raise _corrupt(path, f"truncated: tensor {name!r} ends at byte {end} of a {data_len}-byte data section")
        end_max = max(end_max, end)
        tensors[name] = TensorEntry(dtype=dtype, shape=tuple(shape), data_offsets=(begin, end))
    if end_max != data_len:
        # The safetensors library refuses such files too: bytes no tensor owns mean a damaged write.
        raise _corrupt(path, f"{data_len - end_max} trailing bytes after the last tensor")
    return SafetensorsHeader(header_size=n, file_size=file_size, tensors=tensors, metadata=meta)


def _read_header_from(f, path: Path, file_size: int) -> tuple[SafetensorsHeader, bytes, bytes]:
    head = f.read(8)
    if len(head) < 8:
        raise _corrupt(path, f"only {len(head)} bytes long; a safetensors file starts with an 8-byte header length")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise _corrupt(path, f"header length {n} does not fit a {file_size}-byte file")
    raw = f.read(n)
    return _parse_header(path, head, raw, file_size), head, raw


def _open(path: str | Path):
    path = Path(path)
    try:
        return path, open(path, "rb")
    except FileNotFoundError:
        raise InputFileNotFoundError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise _corrupt(path, "it is a folder") from None


def read_header(path: str | Path) -> SafetensorsHeader:
    """Parse and validate the header of ``path``; reads ``8 + N`` bytes, never the tensors."""
    path, f = _open(path)
    with f:
        size = f.seek(0, 2)
        f.seek(0)
        return _read_header_from(f, path, size)[0]


def hash_weights(path: str | Path) -> tuple[SafetensorsHeader, WeightsHashes]:
    """Validate ``path`` as safetensors and compute every hash in a single read of the file.

    The file's sha256 and the tensor-only sha256 are fed from the same chunks (the header bytes go to
    the first only), so a 300 MB LoRA is read once, plus the 64 KiB A1111 window.
    """
    path, f = _open(path)
    with f:
        size = f.seek(0, 2)
        f.seek(0)
        header, head, raw = _read_header_from(f, path, size)
        whole = hashlib.sha256(head)
        whole.update(raw)
        tensors = hashlib.sha256()
        while chunk := f.read(CHUNK):
            whole.update(chunk)
            tensors.update(chunk)
        f.seek(A1111_OFFSET)
        legacy = hashlib.sha256(f.read(A1111_LENGTH)).hexdigest()[:A1111_LEGACY_LENGTH]
    digest = whole.hexdigest()
    return header, WeightsHashes(sha256=digest, tensor_sha256=tensors.hexdigest(), autov2=autov2(digest),
                                 a1111_legacy=legacy, size_bytes=size)


def file_sha256(path: str | Path) -> str:
    """sha256 of the whole file (any file, not only safetensors)."""
    path, f = _open(path)
    h = hashlib.sha256()
    with f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tensor_sha256(path: str | Path) -> str:
    """sha256 of the bytes after the safetensors header: the same tensors give the same hash whatever
    the metadata says (kohya's ``sshs_model_hash``)."""
    return hash_weights(path)[1].tensor_sha256


def autov2(sha256_hex: str) -> str:
    """Civitai's AutoV2 hash from a full file sha256: its first 10 hex digits."""
    return sha256_hex[:AUTOV2_LENGTH].lower()


def a1111_legacy_hash(path: str | Path) -> str:
    """A1111's legacy model hash: sha256 of the 64 KiB at offset 1 MiB, first 8 hex digits."""
    path, f = _open(path)
    with f:
        f.seek(A1111_OFFSET)
        return hashlib.sha256(f.read(A1111_LENGTH)).hexdigest()[:A1111_LEGACY_LENGTH]
