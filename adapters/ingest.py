"""Bring adapter files into the registry, and take versions back out as diffusers or kohya files.

Holds :func:`import_adapter` (detect, validate against a base model, normalise to the canonical
diffusers/peft file with full metadata, register) and :func:`export_adapter` (a registry version
to a diffusers or kohya file with ``ss_*`` and ``modelspec.*`` metadata), plus :func:`default_name`.

Does not hold: key layouts, validation and writers (``adapters/formats.py``), storage rules and
deduplication (``adapters/registry.py``).

The registry stores one format: a diffusers/peft file (``unet.<module>.lora_A.weight``) whose
metadata keeps every key of the imported file and adds the peft config (``lora_adapter_metadata``)
and the kohya/ModelSpec keys. Everything that can refuse a file runs before the registry is
touched, so a refused import leaves it exactly as it was.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from adapters import formats
from adapters.formats import FormatInfo
from adapters.registry import AdapterVersion, Registry, VersionInfo, check_name
from studio.core.errors import IncompatibleAdapterError, InvalidNameError, InvalidRequestError

_NAME_JUNK = re.compile(r"[^A-Za-z0-9_.-]+")


def _clean(values, limit: int) -> list[str]:
    """Strip, drop empty and over-long values, drop case-insensitive duplicates; keep order."""
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


def import_adapter(registry: Registry, path: str | Path, *, name: str | None = None, base: str = "tiny",
                   trigger_words: list[str] | None = None, tags: list[str] | None = None,
                   description: str | None = None) -> AdapterVersion:
    """Import an adapter file (diffusers/peft or kohya safetensors) as a new version of ``name``.

    Steps: refuse pickles and damaged files; detect the layout; validate every key against the
    base model ``base`` (shapes included); convert to the canonical diffusers/peft file with full
    metadata; register it with origin "imported". The same tensors imported again under the same
    name return the existing version (the registry deduplicates by tensor hash) - unless this file
    gives them another alpha, which would be a different adapter and is refused.

    ``trigger_words``, ``tags`` and ``description`` replace what the file's metadata says; without
    them the file's declared trigger words (``modelspec.trigger_phrase``, ``ssmd_keywords``) are used.
    Words only suggested from training tags are not recorded (see :func:`adapters.formats.detect`).
    """
    from studio.core.base_models import load_pipeline, resolve
    from studio.core.families import get_family

    if name is not None:
        check_name(name)
    info = formats.detect(path)
    name = name if name is not None else default_name(info)
    resolved = resolve(base)
    family = get_family(resolved.family)
    if info.architecture in formats._OTHER_TREES and info.architecture != family.name:
        # Refused before loading the base: the keys alone say it cannot fit.
        arch = formats.ARCHITECTURES[info.architecture]
        raise IncompatibleAdapterError(
            f"{info.path}: this adapter was made for {arch} ({info.architecture_evidence}); the base {base!r} is "
            f"{family.display_name}: import it with --base set to a base model of that architecture, or pick an "
            f"adapter made for {family.display_name}", info.architecture)
    pipe = load_pipeline(base)
    adapter = formats.read_adapter(info.path, base_pipeline=pipe, family=family, base_name=base, info=info)

    # Values the user typed are only stripped (VersionInfo refuses empty, duplicate or over-long ones
    # with a clear message); values from the file are cleaned, since a quirk there is nobody's typo.
    if trigger_words is not None:
        words = [str(w).strip() for w in trigger_words]
    else:
        words = _clean([] if info.trigger_words_suggested else info.trigger_words, 256)
    if tags is not None:
        labels = [str(t).strip() for t in tags]
    else:
        labels = _clean((_meta(info, "modelspec.tags", "ssmd_tags") or "").split(","), 100)
    text = description if description is not None else (_meta(info, "modelspec.description", "ssmd_description")
                                                         or "")
    author = _meta(info, "modelspec.author", "ssmd_author", limit=256)
    license_ = _meta(info, "modelspec.license", limit=128)
    version_info = VersionInfo(
        family=family.name, adapter_type=adapter.adapter_type, rank=adapter.rank, alpha=adapter.alpha,
        target_modules=adapter.target_modules, components=adapter.components, trigger_words=words,
        description=text, tags=labels, license=license_, author=author, base_model=base, origin="imported",
        source={"path": str(Path(info.path).resolve()), "format": info.format, "key_style": info.key_style,
                "file_name": Path(info.path).name},
        weights_format="peft",
    )
    metadata = formats.build_metadata(
        adapter_type=adapter.adapter_type, rank=adapter.rank, alpha=adapter.alpha, family=family, name=name,
        trigger_words=words, tags=labels, description=text or None, author=author, license=license_,
        base=info.metadata)
    with tempfile.TemporaryDirectory(prefix="lora-studio-import-") as tmp:
        canonical = formats.to_diffusers(adapter, Path(tmp) / formats.DIFFUSERS_WEIGHT_NAME, metadata=metadata)
        _refuse_other_alpha(registry, name, canonical, adapter, pipe)
        return registry.register(name, canonical, version_info)


def _scales(adapter: formats.AdapterWeights) -> dict:
    # CLIP module names with or without transformers 4's 'text_model.' root are the same module
    return {(c, n.removeprefix("text_model.")): s for (c, n), s in adapter.scales().items()}


def _refuse_other_alpha(registry: Registry, name: str, canonical: Path, adapter: formats.AdapterWeights,
                        pipe) -> None:
    """The registry deduplicates by tensor hash, and alpha is metadata, not a tensor: the same tensors
    with another alpha would come back as the existing version at the wrong strength."""
    from studio.core.hashing import tensor_sha256

    digest = tensor_sha256(canonical)
    for v in registry.list_versions(name=name, limit=None).items:
        if v.tensor_sha256 != digest:
            continue
        stored = formats.detect(v.path)
        theirs = formats.read_adapter(v.path, base_pipeline=pipe if stored.format == "kohya" else None,
                                      family=v.family, info=stored)
        if _scales(theirs) != _scales(adapter):
            raise InvalidRequestError(
                f"{v.ref} already holds these tensors with alpha {v.alpha:g} (rank {v.rank}); this file gives them "
                f"alpha {adapter.alpha:g}, so it is a different adapter at another strength: import it under "
                f"another --name")
        return


def export_adapter(registry: Registry, ref: str, *, format: str, out: str | Path, force: bool = False) -> Path:
    """Write the version ``ref`` as a ``diffusers`` or ``kohya`` file at ``out`` (atomically).

    Metadata: the stored file's keys, then ``ss_*`` and ``modelspec.*`` from the version's record
    (name, rank, alpha, family, trigger words, tags, description, date) and fresh hashes. ``out``
    may be a folder (the file is named ``<name>_v<number>.safetensors``). An existing file is
    replaced only with ``force``. DoRA, LoHa and LoKr export to diffusers only.
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
        formats.check_kohya_exportable(version.adapter_type)  # before reading any weights
    info = formats.detect(version.path)
    pipe = None
    if info.format == "kohya":  # stored by something other than this importer: needs module names
        from studio.core.base_models import load_pipeline

        pipe = load_pipeline(version.base_model or "tiny")
    adapter = formats.read_adapter(version.path, base_pipeline=pipe, family=version.family, info=info)
    metadata = formats.build_metadata(
        adapter_type=version.adapter_type, rank=adapter.rank, alpha=adapter.alpha, family=version.family,
        name=version.name, trigger_words=version.trigger_words, tags=version.tags,
        description=version.description or None, author=version.author, license=version.license,
        date=version.created_at, base=version.safetensors_metadata)
    writer = formats.to_kohya if format == "kohya" else formats.to_diffusers
    return writer(adapter, out, metadata=metadata)
