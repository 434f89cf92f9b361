"""The adapter registry: named adapters with immutable numbered versions, movable aliases, lineage.

Holds :class:`Registry` (the client), the records it returns (:class:`AdapterVersion`,
:class:`VersionPage`, :class:`AdapterInfo`, :class:`DeleteReport`, :class:`GcReport`), the input of a
registration (:class:`VersionInfo`, :class:`SampleImage`), the database schema (SQLAlchemy Core
tables on :data:`METADATA`) and the name/alias/reference rules.

Does not hold: reading or converting adapter files (``adapters/formats.py`` fills a
:class:`VersionInfo` from a file's keys and metadata), applying adapters to a pipeline
(``adapters/compose.py``), talking to the Hub (``studio/app/hub.py``; the registry only records
:class:`Publication` rows). Weights bytes live in the blob store (``adapters/store.py``);
the database holds only records and hashes.

The model is MLflow's model registry: versions 1, 2, 3... per name, never renumbered and never reused
while the adapter exists; aliases (``prod``) point at versions and move; ``latest`` is an alias the
registry keeps on the highest number. References users type::

    mystyle            the newest version (what ``latest`` points at)
    mystyle@3          version 3
    mystyle@prod       what the alias ``prod`` points at
    sha256:0123abcd    the version whose weights file's sha256 starts with these (>= 8) hex digits

Storage: SQLite at ``$LORA_STUDIO_HOME/registry.db`` by default (WAL, so readers never wait for a
writer; a busy timeout, so writers queue instead of failing), or any SQLAlchemy URL in
``LORA_STUDIO_REGISTRY_URL``. The SQL is portable (PostgreSQL runs it unchanged); SQLite-only
statements are limited to the connection pragmas and ``BEGIN IMMEDIATE``.

Safety rules, each relied on by a test:

- A registration is: blob(s) into the store first, then ONE transaction that takes the next number
  and writes every row. A crash between the two leaves an unreferenced blob that :meth:`Registry.gc`
  removes, never half a version.
- Numbers come from a per-adapter counter bumped inside that transaction, with UNIQUE(adapter,
  number) behind it; SQLite writers take the write lock up front (``BEGIN IMMEDIATE``), PostgreSQL
  writers lock the adapter row (``SELECT ... FOR UPDATE``). Conflicts and lock timeouts are retried.
- Blob lifetime: a blob file may be unlinked only by a transaction that holds its ``blobs`` row and
  found no reference to it; a reference may be added only by a transaction that holds the row and
  checked that the file exists (re-storing it if a collection got there first). So a garbage
  collection running beside a registration can never leave a version without its weights.
"""

from __future__ import annotations

import difflib
import io
import json
import math
import random
import re
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from PIL import Image
from sqlalchemy import event, exc
from sqlalchemy.dialects import postgresql

from adapters.store import BlobStore
from studio.core.errors import (
    AdapterNotFoundError,
    AliasInUseError,
    AmbiguousReferenceError,
    InputFileNotFoundError,
    InvalidNameError,
    InvalidRequestError,
    ProtectedAliasError,
    RegistryBusyError,
    StudioError,
)
from studio.core.families import architectures
from studio.core.filesafety import check_safetensors
from studio.core.hashing import hash_weights
from studio.core.jsonutil import jsonable
from studio.core.settings import get_settings

# 2: the version_publications table (Hub publications). A version-1 database gains it when opened
# (_migrate); a version-1 client refuses a version-2 database, since its deletes would not remove those rows.
# 3: the audit_events table and aliases.protected. An older client would move protected aliases and
# write no history, so it refuses a version-3 database.
SCHEMA_VERSION = 3
LATEST = "latest"
ADAPTER_TYPES = ("lora", "dora", "loha", "lokr")
ORIGINS = ("trained", "imported", "merged", "pulled")
# Pipeline components an adapter can patch, in any family the studio can name.
COMPONENTS = architectures.COMPONENTS
SORTS = ("name", "created", "newest")
MIN_HASH_PREFIX = 8  # 8 hex = 32 bits: a chance collision needs ~65,000 versions (birthday bound, 2**16)
MAX_NAME = 64
MAX_TAG = 100
MAX_TRIGGER = 256
MAX_ACTOR = 256
AUDIT_ACTIONS = ("register", "tag", "untag", "protect", "unprotect", "label", "delete", "publish")
# Letters, digits, '-', '_', '.'. The first character is not a dot (no hidden files, no '..') and not a
# dash (``lora-studio adapters show -x`` would read it as an option).
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_FAMILY = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")
_HEX = re.compile(r"[0-9a-f]+")
_IN_CHUNK = 500  # ids per IN (...) list: far below SQLite's 32,766 bound-parameter limit


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


# --------------------------------------------------------------------------------------------
# names, aliases, references
# --------------------------------------------------------------------------------------------


def check_name(name: str, what: str = "adapter name") -> str:
    """Return ``name`` if it is a valid adapter name (or alias, with ``what``), else raise InvalidNameError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        shown = repr(name) if not isinstance(name, str) or len(name) <= 80 else repr(name[:77] + "...")
        raise InvalidNameError(
            f"{shown} is not a valid {what}: use 1-{MAX_NAME} letters, digits, '-', '_' or '.', "
            f"not starting with '.' or '-' (no '/', '\\', '@', ':' or spaces)"
        )
    return name


def check_alias(alias: str) -> str:
    """Aliases follow the name rules and are never all digits (``name@3`` always means version 3)."""
    check_name(alias, "alias")
    if alias.isdigit():
        raise InvalidNameError(f"{alias!r} is not a valid alias: an alias cannot be a number (name@{alias} means "
                               f"version {int(alias)})")
    return alias


@dataclass(frozen=True)
class Reference:
    """A parsed reference: ``kind`` is 'name', 'number', 'alias' or 'hash'."""

    kind: str
    name: str | None = None
    number: int | None = None
    alias: str | None = None
    hash_prefix: str | None = None


def parse_reference(ref: str) -> Reference:
    """Parse ``name``, ``name@3``, ``name@alias`` or ``sha256:<hex prefix>``; raise InvalidNameError otherwise."""
    if not isinstance(ref, str) or not ref:
        raise InvalidNameError(f"{ref!r} is not an adapter reference: use name, name@3, name@alias or sha256:<hex>")
    if ref.lower().startswith("sha256:"):
        prefix = ref[len("sha256:"):].lower()
        if not (MIN_HASH_PREFIX <= len(prefix) <= 64 and _HEX.fullmatch(prefix)):
            raise InvalidNameError(
                f"{ref!r}: a hash reference needs {MIN_HASH_PREFIX} to 64 hex digits after 'sha256:'")
        return Reference("hash", hash_prefix=prefix)
    name, at, selector = ref.partition("@")
    check_name(name)
    if not at:
        return Reference("name", name=name)
    if selector.isdigit() and selector.isascii():
        number = int(selector)
        if number < 1:
            raise InvalidNameError(f"{ref!r}: versions are numbered from 1")
        return Reference("number", name=name, number=number)
    return Reference("alias", name=name, alias=check_alias(selector))


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------


# A sample is a preview: 4096 x 4096 holds every family's native size (SDXL 1024, Flux 2048) with room to
# spare, and 16 MiB holds such a PNG. Decoding is bounded by both before a pixel is read, so a few bytes that
# claim 100000 x 100000 pixels (40 GB decoded) are refused instead of stalling every page that shows them.
MAX_SAMPLE_BYTES = 16 * 1024 * 1024
MAX_SAMPLE_PIXELS = 4096 * 4096
SAMPLE_FORMATS = ("PNG", "JPEG", "WEBP")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def decode_sample(image: str | Path | bytes, what: str = "sample image"):
    """Decode a sample image within the bounds above and return it (a loaded PIL image).

    Used at registration, so the store never takes an image the catalog cannot show, and when a page
    shows a stored sample, so one bad file costs its card the thumbnail and never the listing. Raises
    InvalidRequestError naming ``what`` and the problem.
    """
    if isinstance(image, bytes):
        data = image
    else:
        path = Path(image)
        if not path.is_file():
            raise InputFileNotFoundError(f"{what} {path} does not exist")
        if path.stat().st_size > MAX_SAMPLE_BYTES:
            raise InvalidRequestError(f"{what} is {path.stat().st_size:,} bytes, more than the {MAX_SAMPLE_BYTES:,} "
                                      f"a sample image may have: use a smaller image")
        data = path.read_bytes()
    if len(data) > MAX_SAMPLE_BYTES:
        raise InvalidRequestError(f"{what} is {len(data):,} bytes, more than the {MAX_SAMPLE_BYTES:,} a sample "
                                  f"image may have: use a smaller image")
    side = math.isqrt(MAX_SAMPLE_PIXELS)
    too_big = (f"more than the {MAX_SAMPLE_PIXELS:,} pixels ({side}x{side}) a sample image may have: use a smaller "
               f"image")
    if data.startswith(_PNG_MAGIC) and data[12:16] == b"IHDR":
        # Read from the header before PIL sees the file: PIL refuses sizes this large without naming them.
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        if width * height > MAX_SAMPLE_PIXELS:
            raise InvalidRequestError(f"{what} claims {width}x{height} pixels, {too_big}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=SAMPLE_FORMATS)
            if im.width * im.height > MAX_SAMPLE_PIXELS:
                raise InvalidRequestError(f"{what} claims {im.width}x{im.height} pixels, {too_big}")
            im.load()
    except InvalidRequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequestError(f"{what} claims {too_big}") from None
    except Exception as e:  # noqa: BLE001 - hostile bytes raise many kinds of errors inside PIL's decoders
        raise InvalidRequestError(f"{what} is not a PNG, JPEG or WebP image that decodes ({type(e).__name__}: "
                                  f"{str(e)[:200]}): use another image") from None
    return im


@dataclass(frozen=True)
class SampleImage:
    """A sample image to store with a new version (checked by :func:`decode_sample` when registered)."""

    image: str | Path | bytes = _help("the image: a file path, or its encoded bytes (PNG, JPEG, WebP)")
    recipe: dict = _help("how it was made (prompt, seed, steps, adapter weights...); JSON", default_factory=dict)


@dataclass(frozen=True)
class Sample:
    """A stored sample image: the blob holding it and the recipe that made it."""

    sha256: str
    path: Path
    recipe: dict


@dataclass(frozen=True)
class ParentRef:
    """One parent in a version's lineage. The name, number and hash are recorded at registration, so
    the lineage still says where a version came from after its parent is deleted (``present`` False)."""

    name: str
    number: int
    sha256: str
    present: bool

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.number}"


@dataclass
class VersionInfo:
    """What a new version records besides its weights (the registry computes hashes and metadata).

    Only ``family`` is required. Lists keep their order (trigger words are shown as given).
    ``adapters/formats.py`` fills one of these from a file's keys and kohya/ModelSpec metadata.
    """

    family: str = _help("base-model family the adapter was trained for: 'sd1', 'sdxl', 'flux'...")
    adapter_type: str = _help("adapter method: lora, dora, loha or lokr", default="lora")
    rank: int | None = _help("rank (network dim) of the adapter; None when unknown", default=None)
    alpha: float | None = _help("alpha (peft lora_alpha, kohya network_alpha); strength scale = alpha / rank",
                                default=None)
    target_modules: list[str] = _help("module names the adapter patches, e.g. to_q, to_k, to_v, to_out.0",
                                      default_factory=list)
    components: list[str] = _help(f"pipeline components it patches: {', '.join(COMPONENTS)}", default_factory=list)
    trigger_words: list[str] = _help("words or phrases that activate it in a prompt", default_factory=list)
    description: str = _help("free text shown in listings and searched by text search", default="")
    tags: list[str] = _help("labels to filter by (matched case-insensitively)", default_factory=list)
    license: str | None = _help("license identifier, e.g. 'openrail++' or 'cc-by-4.0'", default=None)
    author: str | None = _help("who made it", default=None)
    base_model: str | None = _help("the base model it was trained on: 'tiny', a Hub id, a file", default=None)
    base_model_sha256: str | None = _help("hash of the base model's weights (8 to 64 hex digits)", default=None)
    training_config: dict | None = _help("the training config it ran with (JSON), when trained here", default=None)
    dataset_fingerprint: str | None = _help("fingerprint of the training data, when trained here", default=None)
    origin: str = _help(f"how it entered the registry: {', '.join(ORIGINS)}", default="imported")
    source: dict | None = _help("where it came from (JSON): a path, a URL, a Hub repo and revision, a run dir",
                                default=None)
    parents: list[str] = _help("references of the versions it was trained from or merged from", default_factory=list)
    metrics: dict | None = _help("evaluation numbers (JSON), e.g. validation loss", default=None)
    samples: list[SampleImage] = _help("sample images with their recipes", default_factory=list)
    weights_format: str | None = _help("key layout of the weights file, e.g. 'peft' or 'kohya'", default=None)

    def __post_init__(self) -> None:
        def bad(option: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"VersionInfo.{option}: {why}")

        if not isinstance(self.family, str) or not _FAMILY.fullmatch(self.family):
            raise bad("family", f"{self.family!r} is not a family name like 'sd1' or 'sdxl' (lowercase, <= 32)")
        if self.adapter_type not in ADAPTER_TYPES:
            raise bad("adapter_type", f"{self.adapter_type!r} is not one of {', '.join(ADAPTER_TYPES)}")
        if self.origin not in ORIGINS:
            raise bad("origin", f"{self.origin!r} is not one of {', '.join(ORIGINS)}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise bad("rank", f"{self.rank!r} is not a whole number >= 1")
        if self.alpha is not None:
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
                    math.isfinite(self.alpha) and self.alpha > 0):
                raise bad("alpha", f"{self.alpha!r} is not a finite number > 0")
        for option, limit in (("target_modules", 256), ("components", 32), ("trigger_words", MAX_TRIGGER),
                              ("tags", MAX_TAG), ("parents", 200)):
            values = getattr(self, option)
            if isinstance(values, str) or not isinstance(values, (list, tuple)):
                raise bad(option, f"must be a list of strings, not {type(values).__name__}")
            for v in values:
                if not isinstance(v, str) or not v.strip() or v != v.strip() or len(v) > limit:
                    raise bad(option, f"{v!r} must be a non-empty string without surrounding spaces, <= {limit} chars")
            keys = [v.lower() for v in values] if option in ("tags", "trigger_words") else list(values)
            if len(set(keys)) != len(keys):
                raise bad(option, f"has duplicates: {values!r}")
        for c in self.components:
            if c not in COMPONENTS:
                raise bad("components", f"{c!r} is not one of {', '.join(COMPONENTS)}")
        for option in ("description",):
            if not isinstance(getattr(self, option), str):
                raise bad(option, "must be a string")
        for option, limit in (("license", 128), ("author", 256), ("base_model", 1024), ("dataset_fingerprint", 128)):
            v = getattr(self, option)
            if v is not None and (not isinstance(v, str) or len(v) > limit):
                raise bad(option, f"must be a string of at most {limit} characters or None")
        if self.base_model_sha256 is not None and not (
                isinstance(self.base_model_sha256, str) and 8 <= len(self.base_model_sha256) <= 64
                and _HEX.fullmatch(self.base_model_sha256)):
            raise bad("base_model_sha256", f"{self.base_model_sha256!r} is not 8 to 64 lowercase hex digits")
        if self.weights_format is not None and not (
                isinstance(self.weights_format, str) and _FAMILY.fullmatch(self.weights_format)):
            raise bad("weights_format", f"{self.weights_format!r} is not a short lowercase name like 'peft'")
        for option in ("training_config", "source", "metrics"):
            _check_json(getattr(self, option), f"VersionInfo.{option}", optional=True)
        for s in self.samples:
            if not isinstance(s, SampleImage):
                raise bad("samples", f"items must be SampleImage, not {type(s).__name__}")
            if not isinstance(s.image, (str, Path, bytes)):
                raise bad("samples", "SampleImage.image must be a path or bytes")
            _check_json(s.recipe, "SampleImage.recipe", optional=False)


def _check_json(value, what: str, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{what}: must be a dict (JSON object), not {type(value).__name__}")
    try:
        # allow_nan=False: NaN/Infinity are not JSON, and PostgreSQL's JSON type refuses them.
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidRequestError(f"{what}: must hold only JSON values (str, number, bool, None, list, dict): {e}") \
            from None


@dataclass(frozen=True)
class AdapterVersion:
    """One registered version: immutable except for the aliases pointing at it and its labels (``tags``)."""

    name: str
    number: int
    aliases: tuple[str, ...]  # sorted; includes 'latest' on the newest version
    family: str
    adapter_type: str
    rank: int | None
    alpha: float | None
    target_modules: tuple[str, ...]
    components: tuple[str, ...]
    trigger_words: tuple[str, ...]
    description: str
    tags: tuple[str, ...]
    license: str | None
    author: str | None
    base_model: str | None
    base_model_sha256: str | None
    training_config: dict | None
    dataset_fingerprint: str | None
    origin: str
    source: dict | None
    parents: tuple[ParentRef, ...]
    metrics: dict | None
    samples: tuple[Sample, ...]
    weights_format: str | None
    weights_sha256: str  # sha256 of the stored file; the blob's name
    tensor_sha256: str  # sha256 of the tensor bytes only (kohya sshs_model_hash)
    autov2: str  # Civitai AutoV2: first 10 hex of weights_sha256
    a1111_legacy: str  # A1111 legacy model hash (8 hex)
    size_bytes: int
    safetensors_metadata: dict  # the file's raw __metadata__ (str -> str), as stored
    created_at: datetime  # UTC
    path: Path  # the weights blob in the store; read-only, never modify it

    @property
    def ref(self) -> str:
        """``name@number``: the reference that always means exactly this version."""
        return f"{self.name}@{self.number}"

    def to_dict(self) -> dict:
        """JSON-ready: datetimes as ISO 8601, paths as strings, tuples as lists."""
        d = asdict(self)
        d["ref"] = self.ref
        d["created_at"] = self.created_at.isoformat()
        d["path"] = str(self.path)
        for s in d["samples"]:
            s["path"] = str(s["path"])
        for p, parent in zip(d["parents"], self.parents):
            p["ref"] = parent.ref
        return jsonable(d)


@dataclass(frozen=True)
class Publication:
    """One publication of a version to a Hub repo: the commit that holds its files and the tag on it."""

    repo_id: str  # owner/name on the Hub
    tag: str  # the revision users pull, e.g. 'v3'
    commit: str  # the commit sha the tag points at
    url: str  # the repo's page
    endpoint: str  # the Hub it went to (https://huggingface.co, or a mirror)
    private: bool
    files: tuple[str, ...]  # paths in the repo, as committed
    published_at: datetime  # UTC

    def to_dict(self) -> dict:
        d = asdict(self)
        d["files"] = list(self.files)
        d["published_at"] = self.published_at.isoformat()
        return d


@dataclass(frozen=True)
class VersionPage:
    """One page of a listing: ``items`` plus the ``total`` that matched the filters."""

    items: tuple[AdapterVersion, ...]
    total: int
    limit: int | None
    offset: int

    @property
    def has_more(self) -> bool:
        return self.offset + len(self.items) < self.total

    def to_dict(self) -> dict:
        return {"total": self.total, "limit": self.limit, "offset": self.offset,
                "items": [v.to_dict() for v in self.items]}


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter: its name, version numbers (ascending) and aliases (alias -> number)."""

    name: str
    versions: tuple[int, ...]
    aliases: dict[str, int]
    created_at: datetime
    protected: tuple[str, ...] = ()  # the aliases that move or go only with force


@dataclass(frozen=True)
class AuditEvent:
    """One recorded change: who (``actor``), when, what (``action``: one of :data:`AUDIT_ACTIONS`), on
    which adapter and version, and the change itself (``detail``: e.g. an alias's old and new version)."""

    id: int
    at: datetime
    actor: str
    action: str
    adapter: str
    version: int | None
    detail: dict

    def to_dict(self) -> dict:
        return {"id": self.id, "at": self.at.isoformat(), "actor": self.actor, "action": self.action,
                "adapter": self.adapter, "version": self.version, "detail": self.detail, "summary": self.summary}

    @property
    def summary(self) -> str:
        """The change in words (who and when are fields of their own)."""
        d, name = self.detail, self.adapter
        at = f"{name}@{self.version}" if self.version is not None else name
        forced = " (forced)" if d.get("forced") else ""
        if self.action == "register":
            parents = f" from {', '.join(d['parents'])}" if d.get("parents") else ""
            return f"registered {at} ({d.get('origin', '?')}{parents})"
        if self.action == "tag":
            moved = f"from @{d['from']} " if d.get("from") is not None else ""
            return f"moved {name}@{d['alias']} {moved}to @{d['to']}{forced}"
        if self.action in ("protect", "unprotect"):
            return f"{self.action}ed {name}@{d['alias']} (on @{d['to']}){forced}"
        if self.action == "label":
            changes = [*(f"+{t}" for t in d.get("added", [])), *(f"-{t}" for t in d.get("removed", []))]
            return f"relabelled {at}: {' '.join(changes)}"
        if self.action == "untag":
            return f"removed {name}@{d['alias']} (was @{d['was']}){forced}"
        if self.action == "delete":
            gone = d.get("aliases_removed") or []
            removed = f", removing {', '.join('@' + a for a in gone)}" if gone else ""
            return f"deleted {', '.join(f'{name}@{n}' for n in d.get('versions', []))}{removed}{forced}"
        if self.action == "publish":
            return f"published {at} to {d.get('repo_id')}@{d.get('tag')} (commit {str(d.get('commit'))[:12]})"
        return f"{self.action} {at}"


@dataclass(frozen=True)
class DeleteReport:
    """What a delete removed: version references, aliases (``name@alias``) and collected blobs."""

    deleted: tuple[str, ...]
    aliases_removed: tuple[str, ...]
    blobs_removed: tuple[str, ...]
    bytes_freed: int


@dataclass(frozen=True)
class GcReport:
    """What :meth:`Registry.gc` removed."""

    blobs_removed: tuple[str, ...]
    bytes_freed: int
    temp_files_removed: int


# --------------------------------------------------------------------------------------------
# schema
# --------------------------------------------------------------------------------------------

METADATA = sa.MetaData()
# JSON everywhere; JSONB on PostgreSQL. none_as_null: a Python None is SQL NULL, not the JSON 'null'.
_JSON = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")

registry_info = sa.Table(
    "registry_info", METADATA,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
)

blobs = sa.Table(
    "blobs", METADATA,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
)

adapters = sa.Table(
    "adapters", METADATA,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(MAX_NAME), nullable=False, unique=True),
    # The highest number ever given, so a deleted newest version's number is not handed out again.
    sa.Column("last_number", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
)

versions = sa.Table(
    "versions", METADATA,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("adapter_id", sa.Integer, sa.ForeignKey("adapters.id"), nullable=False),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("weights_sha256", sa.String(64), sa.ForeignKey("blobs.sha256"), nullable=False),
    sa.Column("tensor_sha256", sa.String(64), nullable=False),
    sa.Column("autov2", sa.String(10), nullable=False),
    sa.Column("a1111_legacy", sa.String(8), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("family", sa.String(32), nullable=False),
    sa.Column("base_model", sa.String(1024)),
    sa.Column("base_model_sha256", sa.String(64)),
    sa.Column("adapter_type", sa.String(16), nullable=False),
    sa.Column("rank", sa.Integer),
    sa.Column("alpha", sa.Float),
    sa.Column("target_modules", _JSON, nullable=False),
    sa.Column("components", _JSON, nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("license", sa.String(128)),
    sa.Column("author", sa.String(256)),
    sa.Column("training_config", _JSON),
    sa.Column("dataset_fingerprint", sa.String(128)),
    sa.Column("origin", sa.String(16), nullable=False),
    sa.Column("source", _JSON),
    sa.Column("metrics", _JSON),
    sa.Column("weights_format", sa.String(32)),
    sa.Column("safetensors_metadata", _JSON, nullable=False),
    # lower(name + "\n" + description): text search is one LIKE on one column, the same on every backend.
    sa.Column("search_text", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.UniqueConstraint("adapter_id", "number", name="uq_versions_adapter_number"),
    sa.Index("ix_versions_adapter_tensor", "adapter_id", "tensor_sha256"),
    sa.Index("ix_versions_weights_sha256", "weights_sha256"),
    sa.Index("ix_versions_family_created", "family", "created_at"),
    sa.Index("ix_versions_type_created", "adapter_type", "created_at"),
    sa.Index("ix_versions_created", "created_at", "id"),
)

# Tags and trigger words are rows, not JSON, so "tag = anime" is an index lookup; key = lower(value).
version_tags = sa.Table(
    "version_tags", METADATA,
    sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id"), primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("tag", sa.String(MAX_TAG), nullable=False),
    sa.Column("tag_key", sa.String(MAX_TAG), nullable=False),
    sa.Index("ix_version_tags_key", "tag_key", "version_id"),
)

version_triggers = sa.Table(
    "version_triggers", METADATA,
    sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id"), primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("word", sa.String(MAX_TRIGGER), nullable=False),
    sa.Column("word_key", sa.String(MAX_TRIGGER), nullable=False),
    sa.Index("ix_version_triggers_key", "word_key", "version_id"),
)

aliases = sa.Table(
    "aliases", METADATA,
    sa.Column("adapter_id", sa.Integer, sa.ForeignKey("adapters.id"), primary_key=True),
    sa.Column("alias", sa.String(MAX_NAME), primary_key=True),
    sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id"), nullable=False),
    # A protected alias (what production reads, e.g. prod) moves or goes only with force.
    sa.Column("protected", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("ix_aliases_version", "version_id", "alias"),
)

# Who changed what and when: one row per register, alias move, label change, delete and publish, in the same
# transaction as the change. Keyed by the adapter's name, not its row: the history outlives a delete.
audit_events = sa.Table(
    "audit_events", METADATA,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("at", sa.DateTime, nullable=False),
    sa.Column("actor", sa.String(MAX_ACTOR), nullable=False),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("adapter_name", sa.String(MAX_NAME), nullable=False),
    sa.Column("version_number", sa.Integer),
    sa.Column("detail", _JSON, nullable=False),
    sa.Index("ix_audit_events_adapter", "adapter_name", "id"),
)

version_parents = sa.Table(
    "version_parents", METADATA,
    sa.Column("child_id", sa.Integer, sa.ForeignKey("versions.id"), primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("parent_id", sa.Integer, sa.ForeignKey("versions.id")),  # NULL once the parent is deleted
    sa.Column("parent_name", sa.String(MAX_NAME), nullable=False),
    sa.Column("parent_number", sa.Integer, nullable=False),
    sa.Column("parent_sha256", sa.String(64), nullable=False),
    sa.Index("ix_version_parents_parent", "parent_id"),
)

version_samples = sa.Table(
    "version_samples", METADATA,
    sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id"), primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("blob_sha256", sa.String(64), sa.ForeignKey("blobs.sha256"), nullable=False),
    sa.Column("recipe", _JSON, nullable=False),
    sa.Index("ix_version_samples_blob", "blob_sha256"),
)

# Where a version was published (studio.app.hub). Rows, not a JSON column, so a migration only adds a table.
version_publications = sa.Table(
    "version_publications", METADATA,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("version_id", sa.Integer, sa.ForeignKey("versions.id"), nullable=False),
    sa.Column("endpoint", sa.String(256), nullable=False),
    sa.Column("repo_id", sa.String(200), nullable=False),
    sa.Column("tag", sa.String(128), nullable=False),
    sa.Column("commit_sha", sa.String(64), nullable=False),
    sa.Column("url", sa.String(512), nullable=False),
    sa.Column("private", sa.Boolean, nullable=False),
    sa.Column("files", _JSON, nullable=False),
    sa.Column("published_at", sa.DateTime, nullable=False),
    sa.UniqueConstraint("version_id", "endpoint", "repo_id", "tag", "commit_sha", name="uq_version_publications"),
    sa.Index("ix_version_publications_repo", "repo_id", "tag"),
)

_CHILD_TABLES = (version_tags, version_triggers, version_samples, version_publications)


def _utcnow() -> datetime:
    # Stored naive (UTC by convention): SQLite has no time zones, and one convention keeps both backends equal.
    return datetime.now(UTC).replace(tzinfo=None)


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _escape_like(term: str) -> str:
    return term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _chunks(ids: Sequence[int]) -> Iterable[Sequence[int]]:
    for i in range(0, len(ids), _IN_CHUNK):
        yield ids[i:i + _IN_CHUNK]


def _retryable(error: exc.DBAPIError) -> bool:
    text = str(error.orig).lower() if error.orig is not None else str(error).lower()
    # SQLite: "database is locked/busy" past the busy timeout; PostgreSQL: deadlock or serialization failure.
    return any(s in text for s in ("locked", "busy", "deadlock", "could not serialize"))


# --------------------------------------------------------------------------------------------
# the client
# --------------------------------------------------------------------------------------------


class Registry:
    """The adapter registry client.

    Args:
        url: a SQLAlchemy database URL; default ``LORA_STUDIO_REGISTRY_URL``, else SQLite at
            ``<home>/registry.db``.
        home: the studio home holding ``registry.db`` and ``blobs/``; default ``$LORA_STUDIO_HOME``.
        store: the blob store; default ``LORA_STUDIO_STORE`` (for the settings' home), else ``<home>/blobs``.
        busy_timeout_s: how long a writer waits for another writer's lock before retrying.
        retries: attempts for a transaction that hits a lock timeout or a uniqueness race.
        echo: log every SQL statement (debugging).
        actor: who the changes this client makes are recorded as (the audit trail); default the
            settings' user (``LORA_STUDIO_USER``, else the OS user).

    One client per process; it is cheap to create and holds a small connection pool. Close it (or use
    ``with Registry() as reg:``) to release the pool.
    """

    def __init__(self, url: str | None = None, *, home: str | Path | None = None, store: BlobStore | None = None,
                 busy_timeout_s: float = 30.0, retries: int = 8, echo: bool = False, actor: str | None = None) -> None:
        settings = get_settings()
        actor = settings.user if actor is None else actor
        if not isinstance(actor, str) or not actor.strip() or len(actor) > MAX_ACTOR:
            raise InvalidRequestError(f"the registry's user must be a name of 1 to {MAX_ACTOR} characters, got "
                                      f"{actor!r}: set LORA_STUDIO_USER")
        self.actor = actor.strip()
        home = Path(home) if home is not None else settings.home
        if url is None:
            url = settings.registry_url if home == settings.home and settings.registry_url else \
                f"sqlite:///{home / 'registry.db'}"
        self.url = sa.engine.make_url(url)
        if store is None:
            # The settings' store (LORA_STUDIO_STORE, a team's shared folder) belongs to the settings' home.
            store = BlobStore(settings.blobs_dir if home == settings.home else home / "blobs")
        self.store = store
        self._retries = max(1, retries)
        self._engine = self._make_engine(busy_timeout_s, echo)
        self._ensure_schema()

    def __repr__(self) -> str:
        return f"Registry({self.url.render_as_string(hide_password=True)!r}, store={self.store.root})"

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Release the connection pool (the client can still be used; it reconnects)."""
        self._engine.dispose()

    # ---- engine and transactions ----------------------------------------------------------

    def _make_engine(self, busy_timeout_s: float, echo: bool) -> sa.Engine:
        kwargs: dict[str, Any] = {"echo": echo}
        sqlite = self.url.get_backend_name() == "sqlite"
        if sqlite:
            database = self.url.database
            if database and database != ":memory:" and not database.startswith("file:"):
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": busy_timeout_s}
        engine = sa.create_engine(self.url, **kwargs)
        if sqlite:
            busy_ms = int(busy_timeout_s * 1000)

            @event.listens_for(engine, "connect")
            def _on_connect(dbapi_connection, _record) -> None:
                # We emit BEGIN ourselves (below): sqlite3's implicit transactions would start writes
                # as read transactions that fail to upgrade under contention.
                dbapi_connection.isolation_level = None
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
                cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
                cursor.execute("PRAGMA foreign_keys=ON")  # enforce the REFERENCES that PostgreSQL enforces
                cursor.close()

            @event.listens_for(engine, "begin")
            def _on_begin(conn) -> None:
                # Writers take the database write lock at BEGIN, so two registrations queue on the busy
                # timeout instead of both reading the counter and one failing at commit.
                write = conn.get_execution_options().get("registry_write", False)
                conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine

    @contextmanager
    def _read(self):
        with self._engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def _write(self):
        with self._engine.connect() as conn:
            conn.execution_options(registry_write=True)
            with conn.begin():
                yield conn

    def _transact(self, work: Callable[[sa.Connection], Any]) -> Any:
        """Run ``work(conn)`` in one write transaction, retrying lock timeouts and uniqueness races.

        ``work`` must be safe to run again from the start: it only touches the database, plus
        idempotent blob puts. Studio errors it raises (not found, alias in use) are not retried.
        """
        delay = 0.02
        last: Exception | None = None
        for _attempt in range(self._retries):
            try:
                with self._write() as conn:
                    return work(conn)
            except exc.IntegrityError as e:
                # Two writers created the same adapter name or blob row at once (PostgreSQL): the
                # second sees the first's row when it runs again.
                last = e
            except exc.OperationalError as e:
                if not _retryable(e):
                    raise
                last = e
            time.sleep(delay * (1 + random.random()))  # jitter: writers that collided do not collide again
            delay = min(delay * 2, 1.0)
        raise RegistryBusyError(f"the registry {self.url.render_as_string(hide_password=True)} stayed busy through "
                                f"{self._retries} attempts ({last}); try again") from last

    def _ensure_schema(self) -> None:
        create_tables = True
        try:
            with self._read() as conn:
                if sa.inspect(conn).has_table("registry_info"):
                    version = conn.execute(sa.select(registry_info.c.value)
                                           .where(registry_info.c.key == "schema_version")).scalar()
                    if version is not None:
                        self._check_schema_version(int(version))
                        if int(version) == SCHEMA_VERSION:
                            return
                        create_tables = False  # an older schema: _migrate adds what it lacks
        except exc.OperationalError as e:
            raise StudioError(f"cannot open the registry {self.url.render_as_string(hide_password=True)}: "
                              f"{e.orig}") from None

        def create(conn) -> None:
            METADATA.create_all(conn)  # checkfirst: a second process finds the tables and skips them
            if conn.execute(sa.select(registry_info.c.value).where(registry_info.c.key == "schema_version")).first():
                return
            conn.execute(sa.insert(registry_info).values(key="schema_version", value=str(SCHEMA_VERSION)))

        work = create if create_tables else self._migrate
        try:
            self._transact(work)
        except exc.ProgrammingError:
            self._transact(work)  # PostgreSQL: another process created a table between check and CREATE

    def _migrate(self, conn: sa.Connection) -> None:
        """Bring an older database up to SCHEMA_VERSION in one transaction (two processes opening it at once:
        the second finds the new version under the write lock and does nothing)."""
        version = int(conn.execute(sa.select(registry_info.c.value)
                                   .where(registry_info.c.key == "schema_version")).scalar_one())
        if version >= SCHEMA_VERSION:
            return
        if version < 2:
            version_publications.create(conn, checkfirst=True)
        if version < 3:
            audit_events.create(conn, checkfirst=True)
            false = "0" if conn.dialect.name == "sqlite" else "false"
            conn.execute(sa.text(f"ALTER TABLE aliases ADD COLUMN protected BOOLEAN NOT NULL DEFAULT {false}"))
        conn.execute(sa.update(registry_info).where(registry_info.c.key == "schema_version")
                     .values(value=str(SCHEMA_VERSION)))

    def _check_schema_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StudioError(f"the registry was written by a newer LoRA Studio (schema {version}, this one reads "
                              f"{SCHEMA_VERSION}): upgrade lora-studio")

    # ---- resolving references -------------------------------------------------------------

    def _resolve(self, conn: sa.Connection, ref: str) -> sa.Row:
        """The version row (id, adapter_id, name, number, weights_sha256) a reference names, or raise."""
        parsed = parse_reference(ref)
        cols = (versions.c.id, versions.c.adapter_id, adapters.c.name, versions.c.number, versions.c.weights_sha256)
        joined = versions.join(adapters, versions.c.adapter_id == adapters.c.id)
        if parsed.kind == "hash":
            prefix = parsed.hash_prefix
            # Hex digits all sort below 'g', so [prefix, prefix + 'g') is exactly the hashes starting with
            # prefix: a range scan on the index, where LIKE 'prefix%' would not use it on every backend.
            rows = conn.execute(sa.select(*cols).select_from(joined)
                                .where(versions.c.weights_sha256 >= prefix, versions.c.weights_sha256 < prefix + "g")
                                .order_by(adapters.c.name, versions.c.number).limit(21)).all()
            if not rows:
                raise AdapterNotFoundError(f"no adapter version has a weights sha256 starting with {prefix}")
            if len(rows) > 1:
                shown = [f"{r.name}@{r.number} (sha256:{r.weights_sha256[:16]})" for r in rows[:20]]
                raise AmbiguousReferenceError(
                    f"sha256:{prefix} matches {len(rows) if len(rows) <= 20 else 'more than 20'} versions: "
                    f"{', '.join(shown)}; use name@number or a longer hash", shown)
            return rows[0]
        adapter = conn.execute(sa.select(adapters.c.id).where(adapters.c.name == parsed.name)).first()
        if adapter is None:
            raise self._unknown_name(conn, parsed.name)
        if parsed.kind == "number":
            row = conn.execute(sa.select(*cols).select_from(joined)
                               .where(versions.c.adapter_id == adapter.id, versions.c.number == parsed.number)).first()
        else:
            alias = parsed.alias or LATEST
            row = conn.execute(sa.select(*cols).select_from(
                joined.join(aliases, aliases.c.version_id == versions.c.id))
                .where(aliases.c.adapter_id == adapter.id, aliases.c.alias == alias)).first()
        if row is not None:
            return row
        numbers = conn.execute(sa.select(versions.c.number).where(versions.c.adapter_id == adapter.id)
                               .order_by(versions.c.number)).scalars().all()
        names = conn.execute(sa.select(aliases.c.alias).where(aliases.c.adapter_id == adapter.id)
                             .order_by(aliases.c.alias)).scalars().all()
        candidates = [f"{parsed.name}@{n}" for n in numbers[-20:]] + [f"{parsed.name}@{a}" for a in names]
        what = f"version {parsed.number}" if parsed.kind == "number" else f"alias {parsed.alias or LATEST!r}"
        raise AdapterNotFoundError(f"{parsed.name} has no {what}; it has: {', '.join(candidates)}", candidates)

    def _unknown_name(self, conn: sa.Connection, name: str) -> AdapterNotFoundError:
        names = conn.execute(sa.select(adapters.c.name)).scalars().all()
        lowered = name.lower()
        close = [n for n in names if n.lower() == lowered]
        close += [n for n in difflib.get_close_matches(name, names, n=5, cutoff=0.6) if n not in close]
        close += [n for n in names if lowered in n.lower() and n not in close][: max(0, 8 - len(close))]
        hint = f"; did you mean: {', '.join(close)}?" if close else "; `lora-studio adapters list` shows what exists"
        return AdapterNotFoundError(f"no adapter named {name!r}{hint}", close)

    def _adapter_id(self, conn: sa.Connection, name: str, *, lock: bool = False) -> int:
        check_name(name)
        query = sa.select(adapters.c.id).where(adapters.c.name == name)
        row = conn.execute(query.with_for_update() if lock else query).first()
        if row is None:
            raise self._unknown_name(conn, name)
        return row.id

    def _resolve_locked(self, conn: sa.Connection, ref: str) -> sa.Row:
        """:meth:`_resolve` for a change: the adapter's row is locked until commit (PostgreSQL FOR UPDATE;
        SQLite's BEGIN IMMEDIATE already holds the whole database), and the reference is resolved again
        under the lock, so two changes to one adapter's aliases, labels or versions run one after the
        other and the second sees the first (else both could read @prod unprotected and the second
        overwrite the first's protection)."""
        conn.execute(sa.select(adapters.c.id).where(adapters.c.id == self._resolve(conn, ref).adapter_id)
                     .with_for_update())
        return self._resolve(conn, ref)

    # ---- reading ----------------------------------------------------------------------------

    def get(self, ref: str) -> AdapterVersion:
        """The version a reference names (``name``, ``name@3``, ``name@prod``, ``sha256:0123abcd``), its
        weights checked against their hash (once per process and file state: :meth:`BlobStore.verified`)."""
        with self._read() as conn:
            version = self._load(conn, [self._resolve(conn, ref).id])[0]
        self.store.verified(version.weights_sha256)
        return version

    def find_network(self, text: str, short_hash: str | None = None) -> AdapterVersion:
        """The version an A1111 or Civitai prompt means by ``<lora:TEXT:...>``.

        A1111 names a LoRA by its file's stem; Civitai images name it and give its short hash in
        ``Lora hashes``. Tried in order: a registry reference (``name``, ``name@3``, ``name@prod``);
        a hash of the stored file or of the file it was imported from (Civitai AutoV2: 10 hex of the
        file's sha256; A1111's legacy 8 hex; A1111's 12-hex short hash of the tensor bytes, or
        ``short_hash`` when the image's ``Lora hashes`` gave one for this name); the stem of the file
        it was imported from. Newest match first. Nothing found: :class:`AdapterNotFoundError` with
        close names (registry names and imported file stems).
        """
        text = text.strip()
        try:
            return self.get(text)
        except (AdapterNotFoundError, InvalidNameError):
            pass
        wanted = [h.lower() for h in (short_hash, text) if h and re.fullmatch(r"[0-9a-fA-F]{8,64}", h)]
        with self._read() as conn:
            rows = conn.execute(sa.select(versions.c.id, versions.c.weights_sha256, versions.c.tensor_sha256,
                                          versions.c.autov2, versions.c.a1111_legacy, versions.c.source)
                                .order_by(versions.c.created_at.desc(), versions.c.id.desc())).all()
            stems: dict[str, int] = {}
            for r in rows:
                source = r.source if isinstance(r.source, dict) else {}
                hashes = (r.weights_sha256, r.tensor_sha256, r.autov2, r.a1111_legacy,
                          *(str(source.get(k) or "") for k in ("sha256", "tensor_sha256", "autov2")))
                if any(h and len(w) >= 8 and h.startswith(w) for w in wanted for h in hashes):
                    return self._load(conn, [r.id])[0]
                stem = Path(str(source.get("file_name") or "")).stem
                if stem:
                    stems.setdefault(stem, r.id)
            if text in stems:
                return self._load(conn, [stems[text]])[0]
            names = conn.execute(sa.select(adapters.c.name)).scalars().all()
        known = list(dict.fromkeys([*names, *stems]))
        close = difflib.get_close_matches(text, known, n=5, cutoff=0.5)
        close += [n for n in known if text.lower() in n.lower() and n not in close][: max(0, 5 - len(close))]
        hint = f"; close matches: {', '.join(close)}" if close else "; `lora-studio adapters list` shows what exists"
        return_hint = f" or hash {short_hash}" if short_hash else ""
        raise AdapterNotFoundError(f"no adapter in the registry is {text!r}{return_hint} (by name, alias, hash or "
                                   f"imported file name){hint}", close)

    def find_by_tensors(self, tensor_sha256: str) -> AdapterVersion | None:
        """The oldest version whose stored tensors, or the file it was imported from, hash to
        ``tensor_sha256`` (a catalog import's duplicate check); None when none does."""
        with self._read() as conn:
            row = conn.execute(sa.select(versions.c.id).where(versions.c.tensor_sha256 == tensor_sha256)
                               .order_by(versions.c.id).limit(1)).first()
            if row is None:
                for r in conn.execute(sa.select(versions.c.id, versions.c.source).where(versions.c.source.is_not(None))
                                      .order_by(versions.c.id)):
                    if isinstance(r.source, dict) and r.source.get("tensor_sha256") == tensor_sha256:
                        row = r
                        break
            return self._load(conn, [row.id])[0] if row is not None else None

    def adapter(self, name: str) -> AdapterInfo:
        """An adapter's version numbers and aliases."""
        with self._read() as conn:
            adapter_id = self._adapter_id(conn, name)
            row = conn.execute(sa.select(adapters.c.created_at).where(adapters.c.id == adapter_id)).one()
            numbers = conn.execute(sa.select(versions.c.number).where(versions.c.adapter_id == adapter_id)
                                   .order_by(versions.c.number)).scalars().all()
            alias_rows = conn.execute(sa.select(aliases.c.alias, versions.c.number, aliases.c.protected)
                                      .join(versions, aliases.c.version_id == versions.c.id)
                                      .where(aliases.c.adapter_id == adapter_id).order_by(aliases.c.alias)).all()
        return AdapterInfo(name=name, versions=tuple(numbers), aliases={r.alias: r.number for r in alias_rows},
                           created_at=_aware(row.created_at),
                           protected=tuple(r.alias for r in alias_rows if r.protected))

    def versions(self, name: str) -> list[AdapterVersion]:
        """Every version of one adapter, oldest first."""
        with self._read() as conn:
            adapter_id = self._adapter_id(conn, name)
            ids = conn.execute(sa.select(versions.c.id).where(versions.c.adapter_id == adapter_id)
                               .order_by(versions.c.number)).scalars().all()
            return self._load(conn, ids)

    def children(self, ref: str) -> list[AdapterVersion]:
        """Versions that list ``ref`` among their parents (trained from it, merged from it)."""
        with self._read() as conn:
            parent = self._resolve(conn, ref)
            ids = conn.execute(sa.select(version_parents.c.child_id).where(version_parents.c.parent_id == parent.id)
                               .order_by(version_parents.c.child_id)).scalars().all()
            return self._load(conn, list(dict.fromkeys(ids)))

    def list_versions(self, *, search: str | None = None, tag: str | None = None, family: str | None = None,
                      trigger: str | None = None, adapter_type: str | None = None, name: str | None = None,
                      latest_only: bool = False, sort: str = "name", limit: int | None = 50,
                      offset: int = 0) -> VersionPage:
        """Filter, sort and page versions; every filter is an indexed lookup or one LIKE on one column.

        Args:
            search: words that must all appear in the name or description (case-insensitive substrings).
            tag: versions carrying this tag (case-insensitive).
            family: base-model family, e.g. 'sd1'.
            trigger: versions with this trigger word or phrase (case-insensitive, whole phrase).
            adapter_type: lora, dora, loha or lokr.
            name: versions of this adapter only.
            latest_only: only the newest version of each adapter.
            sort: 'name' (then number), 'created' (oldest first) or 'newest' (newest first).
            limit: page size (None: everything); offset: rows to skip.
        """
        if sort not in SORTS:
            raise InvalidRequestError(f"sort must be one of {', '.join(SORTS)}, not {sort!r}")
        if adapter_type is not None and adapter_type not in ADAPTER_TYPES:
            raise InvalidRequestError(f"adapter type must be one of {', '.join(ADAPTER_TYPES)}, not {adapter_type!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise InvalidRequestError(f"limit must be a whole number >= 0, not {limit!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidRequestError(f"offset must be a whole number >= 0, not {offset!r}")
        conds = []
        for term in (search or "").lower().split():
            conds.append(versions.c.search_text.like(f"%{_escape_like(term)}%", escape="\\"))
        if tag:
            conds.append(versions.c.id.in_(sa.select(version_tags.c.version_id)
                                           .where(version_tags.c.tag_key == tag.strip().lower())))
        if trigger:
            conds.append(versions.c.id.in_(sa.select(version_triggers.c.version_id)
                                           .where(version_triggers.c.word_key == trigger.strip().lower())))
        if family:
            conds.append(versions.c.family == family)
        if adapter_type:
            conds.append(versions.c.adapter_type == adapter_type)
        if name is not None:
            conds.append(adapters.c.name == check_name(name))
        if latest_only:
            conds.append(versions.c.id.in_(sa.select(aliases.c.version_id).where(aliases.c.alias == LATEST)))
        joined = versions.join(adapters, versions.c.adapter_id == adapters.c.id)
        order = {
            "name": (adapters.c.name, versions.c.number),
            "created": (versions.c.created_at, versions.c.id),
            "newest": (versions.c.created_at.desc(), versions.c.id.desc()),
        }[sort]
        query = sa.select(versions.c.id).select_from(joined).where(*conds).order_by(*order).offset(offset)
        if limit is not None:
            query = query.limit(limit)
        with self._read() as conn:
            total = conn.execute(sa.select(sa.func.count()).select_from(joined).where(*conds)).scalar_one()
            ids = conn.execute(query).scalars().all() if limit != 0 else []
            items = self._load(conn, ids)
        return VersionPage(items=tuple(items), total=total, limit=limit, offset=offset)

    def _load(self, conn: sa.Connection, ids: Sequence[int]) -> list[AdapterVersion]:
        """Full records for ``ids``, in that order: one query per table, never one per version."""
        if not ids:
            return []
        rows, tags, triggers, alias_map, parents, samples = {}, {}, {}, {}, {}, {}
        for chunk in _chunks(list(ids)):
            for r in conn.execute(sa.select(versions, adapters.c.name.label("adapter_name"))
                                  .join(adapters, versions.c.adapter_id == adapters.c.id)
                                  .where(versions.c.id.in_(chunk))):
                rows[r.id] = r
            for vid, tag in conn.execute(sa.select(version_tags.c.version_id, version_tags.c.tag)
                                         .where(version_tags.c.version_id.in_(chunk))
                                         .order_by(version_tags.c.version_id, version_tags.c.position)):
                tags.setdefault(vid, []).append(tag)
            for vid, word in conn.execute(sa.select(version_triggers.c.version_id, version_triggers.c.word)
                                          .where(version_triggers.c.version_id.in_(chunk))
                                          .order_by(version_triggers.c.version_id, version_triggers.c.position)):
                triggers.setdefault(vid, []).append(word)
            for vid, alias in conn.execute(sa.select(aliases.c.version_id, aliases.c.alias)
                                           .where(aliases.c.version_id.in_(chunk))
                                           .order_by(aliases.c.version_id, aliases.c.alias)):
                alias_map.setdefault(vid, []).append(alias)
            for p in conn.execute(sa.select(version_parents).where(version_parents.c.child_id.in_(chunk))
                                  .order_by(version_parents.c.child_id, version_parents.c.position)):
                parents.setdefault(p.child_id, []).append(
                    ParentRef(name=p.parent_name, number=p.parent_number, sha256=p.parent_sha256,
                              present=p.parent_id is not None))
            for s in conn.execute(sa.select(version_samples).where(version_samples.c.version_id.in_(chunk))
                                  .order_by(version_samples.c.version_id, version_samples.c.position)):
                samples.setdefault(s.version_id, []).append(
                    Sample(sha256=s.blob_sha256, path=self.store.path(s.blob_sha256), recipe=s.recipe))
        out = []
        for vid in ids:
            r = rows[vid]
            out.append(AdapterVersion(
                name=r.adapter_name, number=r.number, aliases=tuple(alias_map.get(vid, ())), family=r.family,
                adapter_type=r.adapter_type, rank=r.rank, alpha=r.alpha, target_modules=tuple(r.target_modules),
                components=tuple(r.components), trigger_words=tuple(triggers.get(vid, ())),
                description=r.description, tags=tuple(tags.get(vid, ())), license=r.license, author=r.author,
                base_model=r.base_model, base_model_sha256=r.base_model_sha256, training_config=r.training_config,
                dataset_fingerprint=r.dataset_fingerprint, origin=r.origin, source=r.source,
                parents=tuple(parents.get(vid, ())), metrics=r.metrics, samples=tuple(samples.get(vid, ())),
                weights_format=r.weights_format, weights_sha256=r.weights_sha256, tensor_sha256=r.tensor_sha256,
                autov2=r.autov2, a1111_legacy=r.a1111_legacy, size_bytes=r.size_bytes,
                safetensors_metadata=r.safetensors_metadata, created_at=_aware(r.created_at),
                path=self.store.path(r.weights_sha256),
            ))
        return out

    # ---- registering ------------------------------------------------------------------------

    def register(self, name: str, weights: str | Path, info: VersionInfo) -> AdapterVersion:
        """Store a ``.safetensors`` adapter file as the next version of ``name``.

        The file is validated, hashed and copied into the blob store, then one transaction takes the
        next number and writes the record. If ``name`` already has a version with the same tensors
        (same tensor-only sha256, whatever the metadata), that version is returned and nothing new is
        recorded.
        """
        check_name(name)
        if not isinstance(info, VersionInfo):
            raise InvalidRequestError(f"info must be a VersionInfo, not {type(info).__name__}")
        weights = Path(weights)
        # Pickles (by suffix or bytes) and headers the safetensors library would choke on end here, in one
        # clear line, before a byte is hashed or stored: the studio's one check of a user's weights file.
        check_safetensors(weights)
        for i, s in enumerate(info.samples):
            # Before anything is stored: a refused sample leaves no blob behind.
            decode_sample(s.image, f"sample image {i + 1} of {name}")
        header, hashes = hash_weights(weights)
        # Blobs first. Killed after this line, the store holds bytes no row references: gc() removes them.
        self.store.put_file(weights, sha256=hashes.sha256)
        sample_blobs = [self._put_sample(s.image) for s in info.samples]
        now = _utcnow()

        def work(conn: sa.Connection) -> tuple[int, bool]:
            adapter_id = self._lock_adapter(conn, name, now)
            existing = conn.execute(sa.select(versions.c.id)
                                    .where(versions.c.adapter_id == adapter_id,
                                           versions.c.tensor_sha256 == hashes.tensor_sha256)
                                    .order_by(versions.c.number).limit(1)).scalar()
            if existing is not None:
                return existing, False
            parent_rows = [self._resolve(conn, ref) for ref in info.parents]
            if len({p.id for p in parent_rows}) != len(parent_rows):
                raise InvalidRequestError(f"parents {info.parents!r} name the same version twice")
            self._hold_blob(conn, hashes.sha256, hashes.size_bytes,
                            lambda: self.store.put_file(weights, sha256=hashes.sha256), now)
            for (sha, size, image) in sample_blobs:
                self._hold_blob(conn, sha, size, lambda image=image: self._put_sample(image), now)
            conn.execute(sa.update(adapters).where(adapters.c.id == adapter_id)
                         .values(last_number=adapters.c.last_number + 1))
            number = conn.execute(sa.select(adapters.c.last_number).where(adapters.c.id == adapter_id)).scalar_one()
            version_id = self._insert_version(conn, adapter_id, name, number, info, header.metadata, hashes,
                                              parent_rows, sample_blobs, now)
            self._point_latest(conn, adapter_id)
            self._audit(conn, "register", name, number, {
                "origin": info.origin, "tensor_sha256": hashes.tensor_sha256,
                "parents": [f"{p.name}@{p.number}" for p in parent_rows]}, now)
            return version_id, True

        version_id, created = self._transact(work)
        if not created:
            # Same tensors as an existing version: the bytes just stored may differ (other metadata)
            # and would be unreferenced; collect them now rather than at the next gc().
            self._collect([hashes.sha256, *(sha for sha, _, _ in sample_blobs)])
        with self._read() as conn:
            return self._load(conn, [version_id])[0]

    def _put_sample(self, image: str | Path | bytes) -> tuple[str, int, str | Path | bytes]:
        if isinstance(image, bytes):
            return self.store.put_bytes(image), len(image), image
        path = Path(image)
        if not path.is_file():
            raise InputFileNotFoundError(f"sample image {path} does not exist")
        return self.store.put_file(path), path.stat().st_size, image

    def _lock_adapter(self, conn: sa.Connection, name: str, now: datetime) -> int:
        """The adapter's id, created if new, with its row locked until commit (PostgreSQL FOR UPDATE;
        SQLite's BEGIN IMMEDIATE already holds the whole database)."""
        query = sa.select(adapters.c.id).where(adapters.c.name == name).with_for_update()
        row = conn.execute(query).first()
        if row is not None:
            return row.id
        try:
            with conn.begin_nested():
                return conn.execute(sa.insert(adapters).values(name=name, last_number=0, created_at=now)) \
                    .inserted_primary_key[0]
        except exc.IntegrityError:
            return conn.execute(query).scalar_one()  # created by another writer since our SELECT

    def _hold_blob(self, conn: sa.Connection, sha256: str, size: int, restore: Callable[[], Any],
                   now: datetime) -> None:
        """Lock (creating if needed) the blob's row, then make sure its file exists: a collection that ran
        between our put and this transaction may have removed it, and ``restore`` puts it back."""
        query = sa.select(blobs.c.sha256).where(blobs.c.sha256 == sha256).with_for_update()
        if conn.execute(query).first() is None:
            try:
                with conn.begin_nested():
                    conn.execute(sa.insert(blobs).values(sha256=sha256, size_bytes=size, created_at=now))
            except exc.IntegrityError:
                conn.execute(query).first()
        if not self.store.exists(sha256):
            restore()

    def _insert_version(self, conn: sa.Connection, adapter_id: int, name: str, number: int, info: VersionInfo,
                        metadata: dict, hashes, parent_rows: list, sample_blobs: list, now: datetime) -> int:
        version_id = conn.execute(sa.insert(versions).values(
            adapter_id=adapter_id, number=number, weights_sha256=hashes.sha256, tensor_sha256=hashes.tensor_sha256,
            autov2=hashes.autov2, a1111_legacy=hashes.a1111_legacy, size_bytes=hashes.size_bytes,
            family=info.family, base_model=info.base_model, base_model_sha256=info.base_model_sha256,
            adapter_type=info.adapter_type, rank=info.rank,
            alpha=float(info.alpha) if info.alpha is not None else None,
            target_modules=list(info.target_modules), components=list(info.components),
            description=info.description, license=info.license, author=info.author,
            training_config=info.training_config, dataset_fingerprint=info.dataset_fingerprint,
            origin=info.origin, source=info.source, metrics=info.metrics, weights_format=info.weights_format,
            safetensors_metadata=dict(metadata), search_text=f"{name}\n{info.description}".lower(), created_at=now,
        )).inserted_primary_key[0]
        if info.tags:
            conn.execute(sa.insert(version_tags), [
                {"version_id": version_id, "position": i, "tag": t, "tag_key": t.lower()}
                for i, t in enumerate(info.tags)])
        if info.trigger_words:
            conn.execute(sa.insert(version_triggers), [
                {"version_id": version_id, "position": i, "word": w, "word_key": w.lower()}
                for i, w in enumerate(info.trigger_words)])
        if parent_rows:
            conn.execute(sa.insert(version_parents), [
                {"child_id": version_id, "position": i, "parent_id": p.id, "parent_name": p.name,
                 "parent_number": p.number, "parent_sha256": p.weights_sha256}
                for i, p in enumerate(parent_rows)])
        if sample_blobs:
            conn.execute(sa.insert(version_samples), [
                {"version_id": version_id, "position": i, "blob_sha256": sha, "recipe": s.recipe}
                for i, ((sha, _, _), s) in enumerate(zip(sample_blobs, info.samples))])
        return version_id

    def _point_latest(self, conn: sa.Connection, adapter_id: int) -> None:
        """Move ``latest`` to the highest remaining number (or drop it when no version is left)."""
        top = conn.execute(sa.select(versions.c.id).where(versions.c.adapter_id == adapter_id)
                           .order_by(versions.c.number.desc()).limit(1)).scalar()
        where = (aliases.c.adapter_id == adapter_id, aliases.c.alias == LATEST)
        if top is None:
            conn.execute(sa.delete(aliases).where(*where))
        elif conn.execute(sa.update(aliases).where(*where).values(version_id=top)).rowcount == 0:
            conn.execute(sa.insert(aliases).values(adapter_id=adapter_id, alias=LATEST, version_id=top))

    # ---- aliases ----------------------------------------------------------------------------

    def set_alias(self, ref: str, alias: str, *, protect: bool | None = None, force: bool = False) -> AdapterVersion:
        """Point ``alias`` (e.g. 'prod') of the referenced version's adapter at that version; moves it if set.

        ``protect=True`` marks the alias protected, ``False`` lifts that, ``None`` leaves it as it is. A
        protected alias is not moved (nor unprotected) without ``force``: :class:`ProtectedAliasError`.
        Each change is recorded in the audit trail with its old and new version.
        """
        check_alias(alias)
        if alias == LATEST:
            raise InvalidNameError(f"{LATEST!r} is kept on the newest version automatically and cannot be set")
        now = _utcnow()

        def work(conn: sa.Connection) -> int:
            target = self._resolve_locked(conn, ref)
            where = (aliases.c.adapter_id == target.adapter_id, aliases.c.alias == alias)
            current = conn.execute(sa.select(aliases.c.protected, versions.c.number)
                                   .join(versions, aliases.c.version_id == versions.c.id).where(*where)).first()
            was_protected = bool(current is not None and current.protected)
            moves = current is None or current.number != target.number
            unprotects = protect is False and was_protected
            if was_protected and (moves or unprotects) and not force:
                what = f"move it from {target.name}@{current.number} to @{target.number}" if moves else "unprotect it"
                raise ProtectedAliasError(f"{target.name}@{alias} is protected: pass --force to {what} (the change "
                                          f"is recorded)", f"{target.name}@{alias}")
            protected = was_protected if protect is None else bool(protect)
            if current is None:
                conn.execute(sa.insert(aliases).values(adapter_id=target.adapter_id, alias=alias, version_id=target.id,
                                                       protected=protected))
            else:
                conn.execute(sa.update(aliases).where(*where).values(version_id=target.id, protected=protected))
            detail = {"alias": alias, "from": None if current is None else current.number, "to": target.number,
                      "protected": protected, "forced": bool(force and was_protected and (moves or unprotects))}
            if moves:
                self._audit(conn, "tag", target.name, target.number, detail, now)
            if protected != was_protected:
                self._audit(conn, "protect" if protected else "unprotect", target.name, target.number, detail, now)
            return target.id

        version_id = self._transact(work)
        with self._read() as conn:
            return self._load(conn, [version_id])[0]

    def remove_alias(self, name: str, alias: str, *, force: bool = False) -> int:
        """Remove ``alias`` from adapter ``name``; returns the version number it pointed at. A protected
        alias goes only with ``force`` (:class:`ProtectedAliasError`); the removal is recorded."""
        check_alias(alias)
        if alias == LATEST:
            raise InvalidNameError(f"{LATEST!r} is kept on the newest version automatically and cannot be removed")
        now = _utcnow()

        def work(conn: sa.Connection) -> int:
            row = self._resolve_locked(conn, f"{name}@{alias}")
            where = (aliases.c.adapter_id == row.adapter_id, aliases.c.alias == alias)
            protected = bool(conn.execute(sa.select(aliases.c.protected).where(*where)).scalar())
            if protected and not force:
                raise ProtectedAliasError(f"{name}@{alias} is protected: pass --force to remove it (the removal is "
                                          f"recorded)", f"{name}@{alias}")
            conn.execute(sa.delete(aliases).where(*where))
            self._audit(conn, "untag", name, row.number, {"alias": alias, "was": row.number, "protected": protected,
                                                          "forced": protected}, now)
            return row.number

        return self._transact(work)

    # ---- labels -------------------------------------------------------------------------------

    def set_labels(self, ref: str, *, add: Sequence[str] = (), remove: Sequence[str] = ()) -> AdapterVersion:
        """Add and remove labels (the tags ``adapters list --tag`` filters by) of a version. Labels describe
        a version for finding it and may change; its weights and recorded facts do not. Matching is
        case-insensitive, as the filter's; the change is recorded in the audit trail."""
        for label in (*add, *remove):
            if not isinstance(label, str) or not label.strip() or len(label.strip()) > MAX_TAG:
                raise InvalidRequestError(f"a label must be text of 1 to {MAX_TAG} characters, got {label!r}")
        add = [label.strip() for label in add]
        remove_keys = {label.strip().lower() for label in remove}
        now = _utcnow()

        def work(conn: sa.Connection) -> int:
            target = self._resolve_locked(conn, ref)
            current = conn.execute(sa.select(version_tags.c.tag).where(version_tags.c.version_id == target.id)
                                   .order_by(version_tags.c.position)).scalars().all()
            missing = sorted(remove_keys - {t.lower() for t in current})
            if missing:
                raise InvalidRequestError(f"{target.name}@{target.number} has no label {', '.join(missing)}; it has: "
                                          f"{', '.join(current) or 'none'}")
            labels = [t for t in current if t.lower() not in remove_keys]
            for label in add:
                if label.lower() not in {t.lower() for t in labels}:
                    labels.append(label)
            if labels == list(current):
                return target.id
            conn.execute(sa.delete(version_tags).where(version_tags.c.version_id == target.id))
            if labels:
                conn.execute(sa.insert(version_tags), [
                    {"version_id": target.id, "position": i, "tag": t, "tag_key": t.lower()}
                    for i, t in enumerate(labels)])
            self._audit(conn, "label", target.name, target.number, {
                "added": [t for t in labels if t not in current],
                "removed": [t for t in current if t not in labels], "labels": labels}, now)
            return target.id

        version_id = self._transact(work)
        with self._read() as conn:
            return self._load(conn, [version_id])[0]

    # ---- the audit trail --------------------------------------------------------------------

    def _audit(self, conn: sa.Connection, action: str, name: str, number: int | None, detail: dict,
               now: datetime) -> None:
        """Record a change in the caller's transaction: it commits (or rolls back) with the change."""
        conn.execute(sa.insert(audit_events).values(at=now, actor=self.actor, action=action, adapter_name=name,
                                                    version_number=number, detail=jsonable(detail)))

    def history(self, name: str | None = None, *, limit: int | None = None, actor: str | None = None,
                action: str | None = None) -> list[AuditEvent]:
        """The recorded changes to adapter ``name`` (None: to every adapter of the catalog), oldest first;
        only the newest ``limit`` when given, only those by ``actor`` or of kind ``action`` when given. It
        outlives the adapter: a deleted adapter's history stays readable."""
        if action is not None and action not in AUDIT_ACTIONS:
            raise InvalidRequestError(f"no kind of change {action!r}: choose one of {', '.join(AUDIT_ACTIONS)}")
        query = sa.select(audit_events).order_by(audit_events.c.id.desc())
        if name is not None:
            check_name(name)
            query = query.where(audit_events.c.adapter_name == name)
        if actor is not None:
            query = query.where(audit_events.c.actor == actor)
        if action is not None:
            query = query.where(audit_events.c.action == action)
        if limit is not None:
            query = query.limit(limit)
        with self._read() as conn:
            rows = conn.execute(query).all()
            if name is not None and not rows and conn.execute(
                    sa.select(audit_events.c.id).where(audit_events.c.adapter_name == name).limit(1)).first() is None \
                    and conn.execute(sa.select(adapters.c.id).where(adapters.c.name == name)).first() is None:
                raise self._unknown_name(conn, name)
        return [AuditEvent(id=r.id, at=_aware(r.at), actor=r.actor, action=r.action, adapter=r.adapter_name,
                           version=r.version_number, detail=dict(r.detail)) for r in reversed(rows)]

    # ---- Hub publications -------------------------------------------------------------------

    def record_publication(self, ref: str, *, repo_id: str, tag: str, commit: str, url: str,
                           endpoint: str = "https://huggingface.co", private: bool = False,
                           files: Sequence[str] = ()) -> Publication:
        """Record that the version ``ref`` was published to ``repo_id`` as ``commit``, tagged ``tag``.

        Recording the same (repo, tag, commit) again changes nothing. The version itself stays immutable:
        publications are rows beside it, like aliases. Tokens are never passed here, so none is stored.
        """
        values = {"endpoint": endpoint, "repo_id": repo_id, "tag": tag, "commit_sha": commit, "url": url}
        for key, limit in (("endpoint", 256), ("repo_id", 200), ("tag", 128), ("commit_sha", 64), ("url", 512)):
            if not isinstance(values[key], str) or not values[key] or len(values[key]) > limit:
                raise InvalidRequestError(f"publication {key}: {values[key]!r} must be a non-empty string of at most "
                                          f"{limit} characters")
        files = [str(f) for f in files]
        now = _utcnow()

        def work(conn: sa.Connection) -> int:
            target = self._resolve_locked(conn, ref)
            found = conn.execute(sa.select(version_publications.c.id).where(
                version_publications.c.version_id == target.id,
                *(version_publications.c[k] == v for k, v in values.items()))).scalar()
            if found is not None:
                return found
            row_id = conn.execute(sa.insert(version_publications).values(
                version_id=target.id, private=bool(private), files=files, published_at=now, **values,
            )).inserted_primary_key[0]
            self._audit(conn, "publish", target.name, target.number, {
                "repo_id": repo_id, "tag": tag, "commit": commit, "url": url, "private": bool(private),
                "endpoint": endpoint}, now)
            return row_id

        row_id = self._transact(work)
        with self._read() as conn:
            row = conn.execute(sa.select(version_publications).where(version_publications.c.id == row_id)).one()
        return _publication(row)

    def publications(self, ref: str) -> list[Publication]:
        """Where the version ``ref`` was published, oldest first."""
        with self._read() as conn:
            target = self._resolve(conn, ref)
            rows = conn.execute(sa.select(version_publications)
                                .where(version_publications.c.version_id == target.id)
                                .order_by(version_publications.c.published_at, version_publications.c.id)).all()
        return [_publication(r) for r in rows]

    # ---- deleting and collecting ------------------------------------------------------------

    def delete(self, ref: str, *, force: bool = False) -> DeleteReport:
        """Delete what ``ref`` names: a bare ``name`` is the whole adapter; ``name@3``, ``name@prod`` and
        ``sha256:...`` are one version. See :meth:`delete_adapter` and :meth:`delete_version`."""
        if parse_reference(ref).kind == "name":
            return self.delete_adapter(ref, force=force)
        return self.delete_version(ref, force=force)

    def delete_version(self, ref: str, *, force: bool = False) -> DeleteReport:
        """Delete one version. Refused (:class:`AliasInUseError`) when a user alias points at it, unless
        ``force`` (which removes those aliases too). ``latest`` moves to the next-highest number; the
        last version's delete removes the adapter. Blobs no other version uses are removed."""

        def work(conn: sa.Connection):
            target = self._resolve_locked(conn, ref)
            held = conn.execute(sa.select(aliases.c.alias).where(aliases.c.version_id == target.id,
                                                                 aliases.c.alias != LATEST)
                                .order_by(aliases.c.alias)).scalars().all()
            if held and not force:
                shown = [f"{target.name}@{a}" for a in held]
                raise AliasInUseError(
                    f"{target.name}@{target.number} is what {', '.join(shown)} points at: move the alias "
                    f"(lora-studio adapters tag), remove it (adapters untag), or pass --force", shown)
            freed = self._delete_versions(conn, [target.id])
            self._finish_adapter(conn, target.adapter_id)
            self._audit(conn, "delete", target.name, target.number, {
                "versions": [target.number], "aliases_removed": list(held), "forced": bool(force and held)},
                _utcnow())
            return ([f"{target.name}@{target.number}"], [f"{target.name}@{a}" for a in held], freed)

        deleted, removed_aliases, freed = self._transact(work)
        removed, size = self._collect(freed)
        return DeleteReport(tuple(deleted), tuple(removed_aliases), tuple(removed), size)

    def delete_adapter(self, name: str, *, force: bool = False) -> DeleteReport:
        """Delete an adapter and every version of it; refused while it has user aliases unless ``force``."""

        def work(conn: sa.Connection):
            adapter_id = self._adapter_id(conn, name, lock=True)
            held = conn.execute(sa.select(aliases.c.alias).where(aliases.c.adapter_id == adapter_id,
                                                                 aliases.c.alias != LATEST)
                                .order_by(aliases.c.alias)).scalars().all()
            if held and not force:
                shown = [f"{name}@{a}" for a in held]
                raise AliasInUseError(f"{name} has aliases {', '.join(shown)}: remove them (lora-studio adapters "
                                      f"untag) or pass --force to delete every version anyway", shown)
            rows = conn.execute(sa.select(versions.c.id, versions.c.number).where(versions.c.adapter_id == adapter_id)
                                .order_by(versions.c.number)).all()
            freed = self._delete_versions(conn, [r.id for r in rows])
            self._finish_adapter(conn, adapter_id)
            self._audit(conn, "delete", name, None, {
                "versions": [r.number for r in rows], "aliases_removed": list(held), "forced": bool(force and held)},
                _utcnow())
            return [f"{name}@{r.number}" for r in rows], [f"{name}@{a}" for a in held], freed

        deleted, removed_aliases, freed = self._transact(work)
        removed, size = self._collect(freed)
        return DeleteReport(tuple(deleted), tuple(removed_aliases), tuple(removed), size)

    def _delete_versions(self, conn: sa.Connection, ids: list[int]) -> list[str]:
        """Delete version rows and everything hanging off them; return the blob hashes they referenced."""
        freed: list[str] = []
        for chunk in _chunks(ids):
            freed += conn.execute(sa.select(versions.c.weights_sha256).where(versions.c.id.in_(chunk))).scalars()
            freed += conn.execute(sa.select(version_samples.c.blob_sha256)
                                  .where(version_samples.c.version_id.in_(chunk))).scalars()
            for table in _CHILD_TABLES:
                conn.execute(sa.delete(table).where(table.c.version_id.in_(chunk)))
            conn.execute(sa.delete(aliases).where(aliases.c.version_id.in_(chunk)))
            conn.execute(sa.delete(version_parents).where(version_parents.c.child_id.in_(chunk)))
            # Children keep the parent's name, number and hash; only the live link goes.
            conn.execute(sa.update(version_parents).where(version_parents.c.parent_id.in_(chunk))
                         .values(parent_id=None))
            conn.execute(sa.delete(versions).where(versions.c.id.in_(chunk)))
        return list(dict.fromkeys(freed))

    def _finish_adapter(self, conn: sa.Connection, adapter_id: int) -> None:
        """After deleting versions: move ``latest``, or remove the adapter when none is left."""
        if conn.execute(sa.select(versions.c.id).where(versions.c.adapter_id == adapter_id).limit(1)).first():
            self._point_latest(conn, adapter_id)
        else:
            conn.execute(sa.delete(aliases).where(aliases.c.adapter_id == adapter_id))
            conn.execute(sa.delete(adapters).where(adapters.c.id == adapter_id))

    def _referenced(self, conn: sa.Connection, sha256: str) -> bool:
        return (conn.execute(sa.select(versions.c.id).where(versions.c.weights_sha256 == sha256).limit(1)).first()
                is not None
                or conn.execute(sa.select(version_samples.c.version_id)
                                .where(version_samples.c.blob_sha256 == sha256).limit(1)).first() is not None)

    def _collect(self, shas: Iterable[str]) -> tuple[list[str], int]:
        """Remove the blobs among ``shas`` that nothing references (see the blob-lifetime rule above):
        rows whose versions were deleted, and files stored by a registration that never recorded them."""
        shas = sorted(set(shas))  # a fixed lock order: two collectors never wait on each other in a cycle
        if not shas:
            return [], 0
        now = _utcnow()

        def work(conn: sa.Connection) -> tuple[list[str], int]:
            removed, freed = [], 0
            for sha in shas:
                row = conn.execute(sa.select(blobs.c.size_bytes).where(blobs.c.sha256 == sha).with_for_update()).first()
                if row is not None:
                    if self._referenced(conn, sha):
                        continue
                    size = row.size_bytes
                else:
                    try:
                        size = self.store.size(sha)
                    except FileNotFoundError:
                        continue
                    try:
                        # A file without a row: take the row ourselves, so a registration of these bytes
                        # waits for us, then finds the file gone and stores it again (see _hold_blob).
                        with conn.begin_nested():
                            conn.execute(sa.insert(blobs).values(sha256=sha, size_bytes=size, created_at=now))
                    except exc.IntegrityError:
                        continue  # a registration recorded it meanwhile
                # Unlinked under the row lock, before commit. Should the commit fail, the row outlives its
                # file; nothing references it, and a later registration of these bytes puts them back.
                self.store.delete(sha)
                conn.execute(sa.delete(blobs).where(blobs.c.sha256 == sha))
                removed.append(sha)
                freed += size
            return removed, freed

        return self._transact(work)

    def gc(self, *, temp_older_than_s: float = 3600.0) -> GcReport:
        """Remove blobs no version references: rows left by deletes, files left by an interrupted
        registration (stored, never recorded), and temporary files of interrupted copies older than
        ``temp_older_than_s`` (younger ones may belong to a copy still running)."""
        with self._read() as conn:
            unreferenced = conn.execute(sa.select(blobs.c.sha256).where(
                ~sa.exists().where(versions.c.weights_sha256 == blobs.c.sha256),
                ~sa.exists().where(version_samples.c.blob_sha256 == blobs.c.sha256),
            )).scalars().all()
            known = set(conn.execute(sa.select(blobs.c.sha256)).scalars())
        # One folder walk for the files; every decision is re-checked under the lock in _collect.
        orphans = [sha for sha in self.store if sha not in known]
        removed, freed = self._collect([*unreferenced, *orphans])
        temps = self.store.stale_temp_files(temp_older_than_s)
        for path in temps:
            path.unlink(missing_ok=True)
        return GcReport(blobs_removed=tuple(removed), bytes_freed=freed, temp_files_removed=len(temps))

    def check(self) -> list[str]:
        """Consistency problems, one line each (empty when sound): versions whose blobs are missing,
        a wrong or missing ``latest``, numbers above an adapter's counter, adapters with no versions.
        Unreferenced blobs are not problems (``gc()`` removes them)."""
        problems = []
        with self._read() as conn:
            for name, number, sha in conn.execute(
                    sa.select(adapters.c.name, versions.c.number, versions.c.weights_sha256)
                    .join(adapters, versions.c.adapter_id == adapters.c.id).order_by(adapters.c.name)):
                if not self.store.exists(sha):
                    problems.append(f"{name}@{number}: weights blob {sha} is missing")
            for name, number, sha in conn.execute(
                    sa.select(adapters.c.name, versions.c.number, version_samples.c.blob_sha256)
                    .join(versions, version_samples.c.version_id == versions.c.id)
                    .join(adapters, versions.c.adapter_id == adapters.c.id)):
                if not self.store.exists(sha):
                    problems.append(f"{name}@{number}: sample blob {sha} is missing")
            top = (sa.select(versions.c.adapter_id, sa.func.max(versions.c.number).label("top"),
                             sa.func.count().label("n"))
                   .group_by(versions.c.adapter_id).subquery())
            latest = (sa.select(aliases.c.adapter_id, versions.c.number.label("number"))
                      .join(versions, aliases.c.version_id == versions.c.id)
                      .where(aliases.c.alias == LATEST).subquery())
            for r in conn.execute(sa.select(adapters.c.name, adapters.c.last_number, top.c.top, top.c.n,
                                            latest.c.number)
                                  .outerjoin(top, top.c.adapter_id == adapters.c.id)
                                  .outerjoin(latest, latest.c.adapter_id == adapters.c.id)):
                if r.n is None:
                    problems.append(f"{r.name}: has no versions")
                    continue
                if r.number != r.top:
                    problems.append(f"{r.name}: latest points at {r.number}, the newest version is {r.top}")
                if r.top > r.last_number:
                    problems.append(f"{r.name}: version {r.top} is above the counter {r.last_number}")
        return problems


def _publication(row) -> Publication:
    return Publication(repo_id=row.repo_id, tag=row.tag, commit=row.commit_sha, url=row.url, endpoint=row.endpoint,
                       private=bool(row.private), files=tuple(row.files), published_at=_aware(row.published_at))


def version_info_fields() -> dict[str, str]:
    """Field name -> help text of :class:`VersionInfo` (for CLI help, TOML docs and UI tooltips)."""
    return {f.name: f.metadata.get("help", "") for f in fields(VersionInfo)}
