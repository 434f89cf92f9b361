"""The one way a registry version is born, and the way back out to a diffusers or kohya file.

Holds :func:`ingest` (a file or in-memory weights -> detection, the architecture pre-check against the
base's family, validation against the base pipeline, the canonical diffusers/peft file with full
metadata, registration) and its :class:`IngestResult`; :func:`import_adapter` (a user's file, with the
file's own name, trigger words and tags as defaults), :func:`export_adapter` (a registry version to a
diffusers or kohya file with ``ss_*`` and ``modelspec.*`` metadata), :func:`default_name` and
:func:`clean_values`.

Every origin calls :func:`ingest`: ``adapters import`` (:func:`import_adapter`), a Hub pull
(``studio.app.hub.pull_adapter``), a merge (``adapters.merge.merge_adapters``) and the end of a
training run (``trainer.loop.Trainer``). So a pulled file is refused by the same pre-check as an
imported one, and every version's file carries the same kohya/ModelSpec keys.

Does not hold: key layouts, validation and writers (``adapters/formats.py``), storage rules and
deduplication (``adapters/registry.py``, whose ``register`` is the only writer of the registry).

The registry stores one format: a diffusers/peft file (``unet.<module>.lora_A.weight``) whose
metadata keeps every key of the source file and adds the peft config (``lora_adapter_metadata``)
and the kohya/ModelSpec keys. Everything that can refuse a file runs before the registry is
touched, so a refused ingest leaves it exactly as it was.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters import formats
from adapters.formats import AdapterWeights, FormatInfo
from adapters.registry import AdapterVersion, Registry, SampleImage, VersionInfo, check_name
from studio.core import base_models
from studio.core.errors import IncompatibleAdapterError, InvalidNameError, InvalidRequestError
from studio.core.families import Family, architectures, get_family
from studio.core.hashing import hash_weights, tensor_sha256

_NAME_JUNK = re.compile(r"[^A-Za-z0-9_.-]+")


def clean_values(values: Iterable[Any] | None, limit: int) -> list[str]:
    """Strip, drop empty and over-long values, drop case-insensitive duplicates; keep order.

    For values read from a file or a remote record, where a quirk is nobody's typo; what a user typed
    is only stripped, so :class:`~adapters.registry.VersionInfo` can refuse it with a clear message.
    """
    out, seen = [], set()
    for v in values or ():
        v = str(v).strip()
        if v and len(v) <= limit and v.lower() not in seen:
            seen.add(v.lower())
            out.append(v)
    return out


def _meta(info: FormatInfo, *keys: str, limit: int | None = None) -> str | None:
    for key in keys:
        value = (info.metadata.get(key) or "").strip()
        if value and (limit is None or len(value) <= limit):
            return value
    return None


def default_name(info: FormatInfo) -> str:
    """The name an import gets without ``--name``: the first valid of ``ss_output_name``,
    ``modelspec.title`` and the file's stem (the folder's name for ``pytorch_lora_weights``)."""
    path = Path(info.path)
    stem = path.parent.name if path.name == formats.DIFFUSERS_WEIGHT_NAME else path.stem
    candidates = [(info.metadata.get("ss_output_name"), "ss_output_name"),
                  (info.metadata.get("modelspec.title"), "modelspec.title"), (stem, "the file name")]
    tried = []
    for text, source in candidates:
        if not text or not text.strip():
            continue
        try:
            return check_name(text.strip())
        except InvalidNameError:
            tried.append((text, source))
    text, source = tried[0] if tried else (stem, "the file name")
    suggestion = _NAME_JUNK.sub("_", text).strip("._-")[:64] or "my_adapter"
    raise InvalidNameError(f"{text!r} (from {source}) is not a valid adapter name: pass --name, "
                           f"e.g. --name {suggestion}")


@dataclass(frozen=True)
class IngestResult:
    """What :func:`ingest` did: the version it registered, and what it learned from the source."""

    version: AdapterVersion  # the new version, or the existing one that already held these tensors
    created: bool  # False: a version of this name already held the same tensors and alpha, and is returned
    detected: FormatInfo | None  # formats.detect() of the source file; None for in-memory weights
    warnings: tuple[str, ...]  # what detection noticed (alphas missing, trigger words only suggested...)

    @property
    def ref(self) -> str:
        return self.version.ref


def _check_architecture(arch: str | None, evidence: str, family: Family, base: str, where: str) -> None:
    """Refuse weights whose keys alone show another model tree than the base's family, before any base
    pipeline is loaded: a pull or import of an SDXL LoRA against an SD-1 base ends here, in one line."""
    if architectures.other_tree(arch, family.name):
        raise IncompatibleAdapterError(
            f"{where}: this adapter was made for {architectures.display_name(arch)} ({evidence}); the base {base!r} is "
            f"{family.display_name}: use --base with a base model of that architecture, or pick an adapter made "
            f"for {family.display_name}", arch)


def _strip(values: Iterable[Any] | None) -> list[str]:
    return [str(v).strip() for v in values or ()]


def ingest(registry: Registry, source: str | Path | AdapterWeights, *, name: str, origin: str, base: str,
           family: str | Family | None = None, detected: FormatInfo | None = None, validate: bool = True,
           pipeline: Any = None, trigger_words: Iterable[str] | None = None, tags: Iterable[str] | None = None,
           description: str | None = None, author: str | None = None, license: str | None = None,
           source_info: Mapping[str, Any] | None = None, parents: Iterable[str] = (),
           samples: Iterable[SampleImage] = (), training_config: dict | None = None,
           dataset_fingerprint: str | None = None, base_model_sha256: str | None = None,
           metrics: dict | None = None, metadata: Mapping[str, str] | None = None,
           target_modules: Iterable[str] | None = None, out: str | Path | None = None) -> IngestResult:
    """Register ``source`` as the next version of ``name``: the one path import, pull, merge and training take.

    ``source`` is an adapter file (diffusers/peft or kohya safetensors; pickles and damaged files are
    refused by detection) or in-memory :class:`~adapters.formats.AdapterWeights` (a merge, a training
    run). Steps, each able to refuse before the registry is touched: detect the file (``detected``
    skips it when the caller already ran :func:`adapters.formats.detect`); refuse keys made for another
    model tree than ``family``; with ``validate``, check every module and shape against the base
    pipeline (``pipeline``, else the cached pipeline of ``base``); read into canonical form; build the
    kohya/ModelSpec metadata from the record's values over the source's metadata and ``metadata``; refuse
    the same tensors under ``name`` with another alpha; write the canonical diffusers/peft file (at
    ``out``, else a temporary file); and call :meth:`Registry.register`, the registry's only writer.

    Args:
        name: the adapter name (callers choose defaults, e.g. :func:`default_name`).
        origin: how the version was born: imported, pulled, merged or trained.
        base: the base model the version is recorded against and validated with.
        family: its family (name or ``Family``); default the family ``base`` resolves to.
        validate: check against the base pipeline; False where the weights were made from that base's
            own modules (training). A kohya file is read against the pipeline either way, since only
            the base's module list turns its flat names back into modules.
        pipeline: an already loaded base pipeline to validate with (a merge's private copy), and to count
            the modules the adapter patches of those it could (``metrics["applies_to"]``; a training run's own).
        trigger_words, tags, description, author, license: the record's values (stripped), also written
            into the file's ModelSpec keys; None records none.
        source_info: where it came from (the record's ``source``): a path, a Hub repo, a merge, a run.
        parents, samples, training_config, dataset_fingerprint, base_model_sha256, metrics: recorded as given.
        metadata: extra file metadata over the source's (training settings, merge settings).
        target_modules: the module names to record; default the leaf names the weights patch.
        out: where the canonical file is written and kept (a training run's adapter file).

    The registry deduplicates by tensor hash: the same tensors under the same name return the existing
    version (``IngestResult.created`` is False) unless they come with another alpha, which would be a
    different adapter at another strength and is refused.
    """
    check_name(name)
    if family is None:
        family = base_models.resolve(base).family
    family = get_family(family) if isinstance(family, str) else family
    in_memory = isinstance(source, AdapterWeights)
    if in_memory:
        info = None
        shapes = {k: tuple(t.shape) for k, t in source.tensors.items()}
        arch, evidence = formats.guess_architecture(shapes)
        _check_architecture(arch, evidence, family, base, f"the {origin} adapter {name!r}")
    else:
        info = detected if detected is not None else formats.detect(source)
        _check_architecture(info.architecture, info.architecture_evidence, family, base, info.path)

    pipe = pipeline
    if pipe is None and (validate or (info is not None and info.format == "kohya")):
        pipe = base_models.load_pipeline(base)
    if in_memory:
        adapter = source
        if validate:
            formats.validate_against(pipe, adapter.tensors, family, base_name=base)
    else:
        adapter = formats.read_adapter(info.path, base_pipeline=pipe if validate or info.format == "kohya" else None,
                                       family=family, base_name=base, info=info)

    if pipe is not None:  # the adapter page's "applies to N modules of M in the base"
        metrics = {**(metrics or {}), "applies_to": formats.coverage(pipe, family, adapter)}
    words, labels = _strip(trigger_words), _strip(tags)
    text = description or ""
    version_info = VersionInfo(
        family=family.name, adapter_type=adapter.adapter_type, rank=adapter.rank, alpha=adapter.alpha,
        target_modules=list(target_modules) if target_modules is not None else adapter.target_modules,
        components=adapter.components, trigger_words=words, description=text, tags=labels, license=license,
        author=author, base_model=base, base_model_sha256=base_model_sha256, training_config=training_config,
        dataset_fingerprint=dataset_fingerprint, origin=origin,
        source=dict(source_info) if source_info is not None else None, parents=list(parents),
        metrics=metrics, samples=list(samples), weights_format="peft")
    underlying = adapter.metadata if in_memory else info.metadata
    file_metadata = formats.build_metadata(
        adapter_type=adapter.adapter_type, rank=adapter.rank, alpha=adapter.alpha, family=family, name=name,
        trigger_words=words, tags=labels, description=text or None, author=author, license=license,
        base={**underlying, **(metadata or {})})
    with tempfile.TemporaryDirectory(prefix=f"lora-studio-{origin}-") as tmp:
        target = Path(out) if out is not None else Path(tmp) / formats.DIFFUSERS_WEIGHT_NAME
        canonical = formats.to_diffusers(adapter, target, metadata=file_metadata)
        existing = _same_tensors(registry, name, canonical, adapter, base)
        version = registry.register(name, canonical, version_info)
    return IngestResult(version=version, created=existing is None, detected=info,
                        warnings=tuple(info.warnings) if info is not None else ())


def import_adapter(registry: Registry, path: str | Path, *, name: str | None = None, base: str = "tiny",
                   trigger_words: list[str] | None = None, tags: list[str] | None = None,
                   description: str | None = None) -> AdapterVersion:
    """Import an adapter file (diffusers/peft or kohya safetensors) as a new version of ``name``.

    The file's own metadata gives the defaults, then :func:`ingest` does the rest with origin
    "imported": refuse pickles and damaged files; detect the layout; validate every key against the
    base model ``base`` (shapes included); convert to the canonical diffusers/peft file with full
    metadata; register. The same tensors imported again under the same name return the existing
    version - unless this file gives them another alpha, which would be a different adapter and is refused.

    ``trigger_words``, ``tags`` and ``description`` replace what the file's metadata says; without
    them the file's declared trigger words (``modelspec.trigger_phrase``, ``ssmd_keywords``) are used.
    Words only suggested from training tags are not recorded (see :func:`adapters.formats.detect`).
    """
    if name is not None:
        check_name(name)
    info = formats.detect(path)
    name = name if name is not None else default_name(info)
    # Values the user typed are only stripped (VersionInfo refuses empty, duplicate or over-long ones
    # with a clear message); values from the file are cleaned, since a quirk there is nobody's typo.
    if trigger_words is None:
        trigger_words = clean_values([] if info.trigger_words_suggested else info.trigger_words, 256)
    if tags is None:
        tags = clean_values((_meta(info, "modelspec.tags", "ssmd_tags") or "").split(","), 100)
    if description is None:
        description = _meta(info, "modelspec.description", "ssmd_description") or ""
    return ingest(
        registry, info.path, name=name, origin="imported", base=base, detected=info, trigger_words=trigger_words,
        tags=tags, description=description, author=_meta(info, "modelspec.author", "ssmd_author", limit=256),
        license=_meta(info, "modelspec.license", limit=128),
        source_info={"path": str(Path(info.path).resolve()), "format": info.format, "key_style": info.key_style,
                     "file_name": Path(info.path).name, **_file_hashes(info.path)}).version


@dataclass(frozen=True)
class FolderImportRow:
    """One file of a catalog import: ``status`` is imported, existing (these tensors were registered
    already), duplicate (another file of the folder has the same tensors) or refused (``reason``)."""

    path: Path
    status: str
    ref: str | None = None
    reason: str = ""

    def to_dict(self) -> dict:
        return {"path": str(self.path), "status": self.status, "ref": self.ref, "reason": self.reason}


def import_folder(registry: Registry, folder: str | Path, *, base: str = "tiny") -> list[FolderImportRow]:
    """Import every ``.safetensors`` file under ``folder`` (a catalog, as A1111's ``models/Lora``), one
    row per file, in path order: nothing stops at a bad file; each refusal keeps its reason.

    Each file is named as :func:`import_adapter` names it (a name that is not valid is cleaned instead
    of refused: a catalog's file names were chosen by many people). Files whose tensors are already in
    the registry (stored, or as the file a version was imported from) are reported as such, and a file
    whose tensors another file of the folder carries is a duplicate of it. Pickles are listed as refused
    without being read.
    """
    from studio.core.errors import StudioError

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InvalidRequestError(f"{folder} is not a folder: pass a folder of .safetensors files")
    rows: list[FolderImportRow] = []
    seen: dict[str, str] = {}  # tensor sha256 -> ref of the first file that had it
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    for path in files:
        suffix = path.suffix.lower()
        if suffix in formats.PICKLE_SUFFIXES:
            rows.append(FolderImportRow(path, "refused", reason="a pickle file: the studio loads .safetensors only "
                                                                 "(convert it with the tool that made it)"))
            continue
        if suffix != ".safetensors":
            continue
        try:
            digest = hash_weights(path)[1].tensor_sha256
            if digest in seen:
                rows.append(FolderImportRow(path, "duplicate", seen[digest], f"the same tensors as {seen[digest]}"))
                continue
            known = registry.find_by_tensors(digest)
            if known is not None:
                seen[digest] = known.ref
                rows.append(FolderImportRow(path, "existing", known.ref, "these tensors are registered already"))
                continue
            info = formats.detect(path)
            try:
                name = default_name(info)
            except InvalidNameError:
                name = _NAME_JUNK.sub("_", path.stem).strip("._-")[:64] or "adapter"
            version = import_adapter(registry, path, name=name, base=base)
            seen[digest] = version.ref
            rows.append(FolderImportRow(path, "imported", version.ref))
        except StudioError as e:
            rows.append(FolderImportRow(path, "refused", reason=" ".join(str(e).split())))
    return rows


def _file_hashes(path: str | Path) -> dict[str, str]:
    """The imported file's own hashes (the stored file is its canonical conversion, with others): how
    A1111 and Civitai images name it (``Lora hashes``: the tensor bytes' short hash; AutoV2)."""
    hashes = hash_weights(path)[1]
    return {"sha256": hashes.sha256, "tensor_sha256": hashes.tensor_sha256, "autov2": hashes.autov2,
            "a1111_legacy": hashes.a1111_legacy}


def _scales(adapter: AdapterWeights) -> dict:
    # CLIP module names with or without transformers 4's 'text_model.' root are the same module
    return {(c, n.removeprefix("text_model.")): s for (c, n), s in adapter.scales().items()}


def _same_tensors(registry: Registry, name: str, canonical: Path, adapter: AdapterWeights,
                  base: str) -> AdapterVersion | None:
    """The version of ``name`` that already holds these tensors at the same alpha (None when there is none).

    The registry deduplicates by tensor hash, and alpha is metadata, not a tensor: the same tensors
    with another alpha would come back as the existing version at the wrong strength, so they are refused.
    """
    digest = tensor_sha256(canonical)
    for v in registry.list_versions(name=name, limit=None).items:
        if v.tensor_sha256 != digest:
            continue
        stored = formats.detect(v.path)
        stored_pipe = None
        if stored.format == "kohya":  # registered by a direct register() call: flat names need the base
            stored_pipe = base_models.load_pipeline(v.base_model or base)
        theirs = formats.read_adapter(v.path, base_pipeline=stored_pipe, family=v.family, info=stored)
        if _scales(theirs) != _scales(adapter):
            raise InvalidRequestError(
                f"{v.ref} already holds these tensors with alpha {v.alpha:g} (rank {v.rank}); this adapter gives them "
                f"alpha {adapter.alpha:g}, so it is a different adapter at another strength: register it under "
                f"another --name")
        return v
    return None


def export_adapter(registry: Registry, ref: str, *, format: str, out: str | Path, force: bool = False) -> Path:
    """Write the version ``ref`` as a ``diffusers`` or ``kohya`` file at ``out`` (atomically).

    Metadata: the stored file's keys, then ``ss_*`` and ``modelspec.*`` from the version's record
    (name, rank, alpha, family, trigger words, tags, description, date) and fresh hashes. ``out``
    may be a folder (the file is named ``<name>_v<number>.safetensors``). An existing file is
    replaced only with ``force``. DoRA exports to diffusers only; LoHa and LoKr to kohya in LyCORIS keys.
    """
    if format not in formats.FORMATS:
        raise InvalidRequestError(f"format must be one of {', '.join(formats.FORMATS)}, not {format!r}")
    version = registry.get(ref)
    out = Path(out).expanduser()
    if out.is_dir():
        out = out / f"{version.name}_v{version.number}.safetensors"
    if out.exists() and not force:
        raise InvalidRequestError(f"{out} already exists: pass --force to replace it")
    if format == "kohya":
        formats.check_kohya_exportable(version.adapter_type, version.family)  # before reading any weights
    info = formats.detect(version.path)
    pipe = None
    if info.format == "kohya":  # stored by something other than this importer: needs module names
        pipe = base_models.load_pipeline(version.base_model or "tiny")
    adapter = formats.read_adapter(version.path, base_pipeline=pipe, family=version.family, info=info)
    metadata = formats.build_metadata(
        adapter_type=version.adapter_type, rank=adapter.rank, alpha=adapter.alpha, family=version.family,
        name=version.name, trigger_words=version.trigger_words, tags=version.tags,
        description=version.description or None, author=version.author, license=version.license,
        date=version.created_at, base=version.safetensors_metadata)
    if format == "kohya":
        return formats.to_kohya(adapter, out, family=version.family, metadata=metadata,
                                denoiser_config=base_models.denoiser_config(version.base_model))
    return formats.to_diffusers(adapter, out, metadata=metadata)
