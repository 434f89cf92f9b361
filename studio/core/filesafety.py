"""The one safety check in front of every weight file a user hands the studio.

Holds :data:`PICKLE_SUFFIXES` and :func:`refuse_pickle` (pickles can run code when loaded, so the studio
reads safetensors only: refused by suffix and by magic bytes), and :func:`check_safetensors`, which
validates a safetensors header byte by byte before any library parses it (adapter import, detection,
registration, base models, single files). Also :func:`json_nesting_within`, the bounded-depth test that
keeps Python's recursive JSON parser away from hostile nesting (headers, metadata, recipes).

Does not hold what the tensors mean (``adapters/formats.py``) or their hashes (``studio/core/hashing.py``).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

from studio.core.errors import CorruptWeightsError, InputFileNotFoundError, UnsafeWeightsError
from studio.core.hashing import SafetensorsHeader, TensorEntry

# Suffixes of torch.save / pickle checkpoints: never opened, whatever they hold.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")

# Bytes per element of each safetensors dtype (the format's own list; F4/F6 pack two per byte
# and are not used by adapters, so a file with them is refused as unknown rather than mis-sized).
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}

# Header bounds (see check_safetensors). The safetensors library refuses headers over 100,000,000
# bytes (its MAX_HEADER_SIZE), so a larger one cannot be a file it wrote or reads.
MAX_HEADER_BYTES = 100_000_000
# {"name": {"shape": [...]}}: a safetensors header nests exactly 3 levels; __metadata__ values are strings.
HEADER_DEPTH = 3
# 2**48 elements is 256 TiB at one byte each, past any real tensor; bounding every partial product of
# a shape by it keeps the library's own arithmetic (elements x bits per element, in 64 bits) at most
# 2**48 x 64 = 2**54, far from overflow, even for shapes like [2**40, 2**40, 0] that hold no data.
MAX_TENSOR_ELEMENTS = 2**48
_ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def refuse_pickle(path: Path, head: bytes = b"") -> None:
    """Raise UnsafeWeightsError when ``path`` is a pickle by its suffix or by its first bytes ``head``."""
    what = None
    if path.suffix.lower() in PICKLE_SUFFIXES:
        what = f"a pickle file ({path.suffix})"
    elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        what = f"a pickle (protocol {head[1]}) despite its name"
    elif head[:4] == b"PK\x03\x04":
        what = "a zip archive, the layout of torch.save checkpoints (a pickle inside)"
    if what:
        raise UnsafeWeightsError(
            f"{path} is {what}: pickles can run code when loaded, so the studio reads safetensors only. "
            f"Convert it first with a tool you trust (load it once in an isolated environment, then "
            f"safetensors.torch.save_file(state_dict, 'adapter.safetensors')) and import the .safetensors file."
        )


def json_nesting_within(text: str, levels: int) -> bool:
    """False when the JSON ``text`` nests more than ``levels`` deep; found without parsing it.

    Python's json parser recurses once per level, so text nested 100,000 deep raises RecursionError.
    Strings are cut out and only brackets kept; each pass then deletes every innermost ``[]``/``{}``
    pair, which lowers the depth by one or two, so ``levels`` passes empty any text at most ``levels``
    deep, and text that passes is at most ``2 * levels`` deep. Every step is a C-speed string operation:
    a 100 MB header costs ``levels`` passes over it. Brackets that do not balance are left for the
    parser to name.
    """
    skeleton = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    for _ in range(levels):
        shorter = skeleton.replace("[]", "").replace("{}", "")
        if shorter == skeleton:
            return True  # empty, or brackets that do not balance (the parser reports those)
        skeleton = shorter
    return not skeleton or skeleton.replace("[]", "").replace("{}", "") == skeleton


def quoted(value, limit: int = 80) -> str:
    """``repr`` of a name or value for a one-line message, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TENSOR_ELEMENTS


def _is_text(value) -> bool:
    """A str that UTF-8 can carry: JSON's ``\\ud800`` escapes give lone surrogates, which Python keeps
    and the safetensors library (serde_json) refuses."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unique_pairs(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k, n in Counter(keys).items() if n > 1)
        raise ValueError(f"the key {quoted(duplicate)} appears twice")
    return dict(pairs)


def refuse_json_constant(name: str):
    """``json.loads(parse_constant=...)``: NaN and Infinity are not JSON; refuse them like any bad text."""
    raise ValueError(f"{name} is not a JSON number")


def parse_safetensors_header(raw: bytes, file_size: int, corrupt) -> SafetensorsHeader:
    """Validate the ``raw`` JSON header of a ``file_size``-byte safetensors file and return it parsed.

    ``corrupt(reason)`` makes the error to raise. Checks everything the safetensors library checks, and
    the inputs that make it (or Python's json) fail with something other than a clear error: nesting,
    booleans or floats as numbers, dimensions past 64 bits, lone surrogates, NaN, duplicate keys.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise corrupt(f"header is not JSON: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not json_nesting_within(text, HEADER_DEPTH):
        raise corrupt(f"header nests more than {HEADER_DEPTH} levels deep; a safetensors header has {HEADER_DEPTH}: "
                      f"tensors, their entries, shapes")
    try:
        obj = json.loads(text, parse_constant=refuse_json_constant, object_pairs_hook=_unique_pairs)
    except ValueError as e:  # JSONDecodeError, NaN, duplicate keys, integers past Python's digit limit
        raise corrupt(f"header is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise corrupt("header is not a JSON object")
    meta = obj.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(_is_text(k) and _is_text(v) for k, v in meta.items()):
        raise corrupt("__metadata__ must map strings to strings")
    data_len = file_size - 8 - len(raw)
    tensors: dict[str, TensorEntry] = {}
    spans = []
    for name, entry in obj.items():
        label = quoted(name)
        if not _is_text(name):
            raise corrupt(f"tensor name {label} is not valid UTF-8 text")
        if not isinstance(entry, dict) or set(entry) != _ENTRY_FIELDS:
            raise corrupt(f"tensor {label} has a malformed entry: it needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise corrupt(f"tensor {label} has unknown dtype {quoted(dtype, 24)}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise corrupt(f"tensor {label} has shape {quoted(shape, 60)}: a shape is a list of whole numbers "
                          f"from 0 to 2**48")
        elements = 1
        for d in shape:
            # The library multiplies dimensions in order in 64 bits: every partial product must stay small.
            elements *= d
            if elements > MAX_TENSOR_ELEMENTS:
                raise corrupt(f"tensor {label} has shape {quoted(shape, 60)}: more than 2**48 elements")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise corrupt(f"tensor {label} has data_offsets {quoted(offsets, 60)}: they must be [begin, end] "
                          f"with 0 <= begin <= end")
        begin, end = offsets
        if end > data_len:
            raise corrupt(f"truncated: tensor {label} ends at byte {end} of a {data_len}-byte data section")
        expected = elements * DTYPE_BYTES[dtype]
        if end - begin != expected:
            raise corrupt(f"tensor {label} {dtype}{shape} needs {expected} bytes, its offsets give {end - begin}")
        spans.append((begin, end, name))
        tensors[name] = TensorEntry(dtype=dtype, shape=tuple(shape), data_offsets=(begin, end))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            why = "overlaps the tensor before it" if begin < position else f"leaves {begin - position} bytes unused"
            raise corrupt(f"tensor {quoted(name)} at data offset {begin} {why}")
        position = end
    if position != data_len:
        # The safetensors library refuses such files too: bytes no tensor owns mean a damaged write.
        raise corrupt(f"{data_len - position} trailing bytes after the last tensor")
    return SafetensorsHeader(header_size=len(raw), file_size=file_size, tensors=tensors, metadata=meta)


def check_safetensors(path: str | Path) -> SafetensorsHeader:
    """Refuse pickles, then validate ``path``'s safetensors header without trusting any library.

    The one check every path that opens a user's safetensors file goes through first (adapter import,
    detection, registration, base models): the 8-byte little-endian header length must fit the file
    and :data:`MAX_HEADER_BYTES`; the header is parsed here (:func:`parse_safetensors_header`): a JSON
    object at most :data:`HEADER_DEPTH` deep of well-formed entries with known dtypes, whole-number
    shapes and offsets, every tensor's byte range exactly ``numel * itemsize`` long, the ranges tiling
    the data section with no gap and no overlap, and ``__metadata__`` mapping text to text. A file
    that passes opens in the safetensors library.
    """
    path = Path(path)

    def corrupt(reason: str) -> CorruptWeightsError:
        return CorruptWeightsError(f"{path} cannot be read as safetensors ({reason}); the file is damaged or not "
                                   f"a weights file: download or export it again")

    if not path.exists():
        raise InputFileNotFoundError(f"{path} does not exist")
    if not path.is_file():
        raise corrupt("it is not a regular file")  # a FIFO or device would block or never end
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        refuse_pickle(path, head)
        if len(head) < 8:
            raise corrupt(f"only {len(head)} bytes long; a safetensors file starts with an 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise corrupt(f"header length {n} does not fit a {size}-byte file")
        raw = f.read(n)
    if len(raw) != n:
        raise corrupt(f"header length {n} does not fit a {8 + len(raw)}-byte file")  # shrank while read
    return parse_safetensors_header(raw, size, corrupt)
