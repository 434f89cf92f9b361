"""Publish adapter versions to the Hugging Face Hub, and pull adapters from it into the registry.

Holds :func:`publish_version` (a registry version -> one commit on a Hub model repo, tagged
``v<number>``), :func:`pull_adapter` (a Hub repo at a revision -> a registry version with origin
"pulled"), :func:`model_card` (the README.md a publication carries), :func:`public_value` (the cleaning
every published byte goes through), their result :class:`PublishResult`, and the translation of
``huggingface_hub`` failures into studio errors.

Does not hold: key layouts and conversions (``adapters/formats.py``), the registry's storage rules
(``adapters/registry.py``, which records each publication as a row beside the version), the Streamlit
Publish action (``studio/app/ui``), which calls :func:`publish_version` and shows ``PublishResult.url``.

A publication is one commit holding exactly the files :func:`stage_files` writes::

    pytorch_lora_weights.safetensors   diffusers/peft weights + lora_adapter_metadata (what load_lora_weights reads)
    <name>.safetensors                 the kohya/A1111/ComfyUI copy (with --kohya)
    images/sample_<i>.png              the version's sample images, re-encoded as PNG with their recipe chunks
    lora_studio.json                   the record: trigger words, lineage, training settings, sample recipes
    README.md                          the model card (front matter as diffusers' training scripts write it)

then the tag ``v<number>`` on that commit. The commit deletes only the files the previous publication's
``lora_studio.json`` listed and this one does not re-upload (an older version's kohya copy or extra
samples); other files in the repo are left alone. No local path goes public: every published byte goes
through :func:`public_value`, which reduces each path to its last component. ``name@3`` here is
``owner/name@v3`` there, and pulling ``owner/name@v3`` reads the same files back.

Credentials are whatever ``huggingface_hub`` uses (``HF_TOKEN``, the ``hf auth login`` cache) or an
explicit ``token``. The token goes to ``huggingface_hub`` only: it is never written to the registry,
to a file's metadata, to a log line or into an error message (messages are scrubbed of it anyway).
``HF_HUB_OFFLINE=1`` makes both operations fail fast; a dry run needs neither network nor token.
The endpoint is ``HF_ENDPOINT`` (a mirror, or the local test server), read at each call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCardData, constants, get_token

from adapters import formats
from adapters import registry as registry_module
from adapters.ingest import clean_values, export_adapter, ingest
from adapters.registry import AdapterVersion, Registry, SampleImage, check_name, decode_sample
from studio.core.atomic import write_atomic, write_bytes_atomic, write_folder_atomic
from studio.core.embedded import EMBEDDED_MODELS
from studio.core.errors import (
    AdapterNotFoundError,
    AmbiguousReferenceError,
    HubAuthError,
    HubConflictError,
    HubError,
    HubNotFoundError,
    InvalidNameError,
    InvalidRequestError,
    OfflineError,
    StudioError,
)
from studio.core.families import FAMILIES, architectures
from studio.core.settings import get_settings

DEFAULT_ENDPOINT = "https://huggingface.co"
WEIGHTS_FILE = formats.DIFFUSERS_WEIGHT_NAME
RECORD_FILE = "lora_studio.json"
RECORD_FORMAT = "lora-studio.publication/1"
CARD_FILE = "README.md"
IMAGES_DIR = "images"
# Pull limits, checked against the sizes the Hub lists for a revision's files before anything is downloaded
# (and again on the bytes that arrive). A record is a few kB and a card a few; 4 GiB holds the largest LoRA
# files in use (Flux at high rank is about 1.5 GB), a full model does not belong in an adapter registry.
MAX_RECORD_BYTES = 4 * 1024 * 1024
MAX_CARD_BYTES = 1024 * 1024
MAX_WEIGHTS_BYTES = 4 * 1024**3
MAX_SAMPLE_BYTES = registry_module.MAX_SAMPLE_BYTES
# Owner and name as the Hub spells them: letters, digits, '-', '_', '.'; at most 96 characters each.
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
_REVISION = re.compile(r"[^\s@:~^?*\[\\]{1,255}")
_SAMPLE_FILE = re.compile(r"images/sample_(\d{1,4})\.(png|jpg|jpeg|webp)")
# The shapes of the files a publication writes. A new publication deletes the files the previous one listed in
# its lora_studio.json (and only those, and only of these shapes) when it does not re-upload them, so the
# tagged commit never carries a previous version's kohya copy or extra samples; everything else stays.
_MANAGED = re.compile(r"[^/]+\.safetensors|images/sample_\d{1,4}\.(png|jpg|jpeg|webp)")
# Tags the Hub and diffusers' training scripts put on a LoRA repo; the family adds its own.
BASE_TAGS = ("text-to-image", "diffusers", "lora", "template:sd-lora")


def _family_tags(name: str) -> tuple[str, ...]:
    """The Hub tags of the version's family (its name alone for a family the studio does not serve)."""
    family = FAMILIES.get(name)
    return family.hub_tags if family is not None else (name,)


def _help(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class PublishResult:
    """What :func:`publish_version` did: the repo, the commit and tag holding the version, the files."""

    repo_id: str = _help("the Hub repo, owner/name")
    url: str = _help("the repo's page on the Hub (for a dry run: where it would be)")
    commit: str | None = _help("sha of the commit holding the files; None for a dry run")
    tag: str = _help("the tag on that commit: 'v' + the version number")
    files: tuple[str, ...] = _help("paths in the repo, as uploaded (or as a dry run wrote them)")
    ref: str = _help("the registry version published, name@number")
    commit_url: str | None = _help("the commit's page on the Hub; None for a dry run", default=None)
    private: bool | None = _help("whether the repo is private (None for a dry run)", default=None)
    dry_run: bool = _help("True when nothing was uploaded and the files went to out_dir", default=False)
    out_dir: Path | None = _help("the folder a dry run wrote", default=None)
    already_published: bool = _help("the tag already held this version: nothing was uploaded", default=False)
    warnings: tuple[str, ...] = _help("things the user should know (e.g. no Hub base model)", default=())

    @property
    def tag_url(self) -> str:
        """The page of the tagged revision: what users pull."""
        return f"{self.url}/tree/{self.tag}"

    def to_dict(self) -> dict:
        return {"repo_id": self.repo_id, "url": self.url, "tag_url": self.tag_url, "commit": self.commit,
                "tag": self.tag, "files": list(self.files), "ref": self.ref, "commit_url": self.commit_url,
                "private": self.private, "dry_run": self.dry_run,
                "out_dir": str(self.out_dir) if self.out_dir else None, "already_published": self.already_published,
                "warnings": list(self.warnings)}


# --------------------------------------------------------------------------------------------
# names, endpoint, credentials
# --------------------------------------------------------------------------------------------


def check_repo_id(repo_id: str) -> str:
    """Return ``repo_id`` if it is ``owner/name`` as the Hub accepts it, else raise InvalidNameError."""
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    if len(parts) != 2 or not all(_REPO_PART.fullmatch(p) and not p.endswith((".", "-")) and "--" not in p
                                  and ".." not in p for p in parts):
        raise InvalidNameError(f"{repo_id!r} is not a Hub repo id: use OWNER/NAME (letters, digits, '-', '_', '.'; "
                               f"at most 96 characters each; no '--' or '..'), e.g. alice/watercolor-lora")
    return repo_id


def parse_repo_reference(text: str) -> tuple[str, str | None]:
    """``owner/name`` or ``owner/name@revision`` (a tag such as v3, a branch, a commit sha) -> (repo_id, revision)."""
    if not isinstance(text, str):
        raise InvalidNameError(f"{text!r} is not a Hub repo reference: use OWNER/NAME or OWNER/NAME@REVISION")
    repo_id, at, revision = text.partition("@")
    check_repo_id(repo_id)
    if at and not _REVISION.fullmatch(revision):
        raise InvalidNameError(f"{text!r}: the revision after '@' must be a tag, branch or commit sha "
                               f"(e.g. {repo_id}@v3)")
    return repo_id, (revision if at else None)


def hub_endpoint() -> str:
    """The Hub's base URL: ``HF_ENDPOINT`` (a mirror, a test server) or https://huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).strip().rstrip("/")


def _require_online(action: str, hint: str = "") -> None:
    if get_settings().offline or constants.is_offline_mode():
        raise OfflineError(f"cannot {action}: the studio is offline (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE to "
                           f"reach the Hub{hint}")


def _token(token: str | None, *, required: bool, action: str) -> str | None:
    """The explicit token, else what huggingface_hub finds (HF_TOKEN, the login cache)."""
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise HubAuthError("the token given is empty: pass a Hugging Face access token, or none to use HF_TOKEN or "
                           "the `hf auth login` cache")
    if token is None:
        token = get_token()
    if token is None and required:
        raise HubAuthError(f"cannot {action}: no Hugging Face token. Run `hf auth login`, or set HF_TOKEN to a token "
                           f"with write access (https://huggingface.co/settings/tokens); --dry-run DIR needs none")
    return token


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


@contextlib.contextmanager
def _hub_errors(action: str, *, repo_id: str, endpoint: str, token: str | None, revision: str | None = None):
    """Turn huggingface_hub and network failures into studio errors with one clear line each.

    The messages are built here (never the library's own, which can carry request details) and scrubbed of
    the token; ``from None`` keeps the original exception, and whatever it holds, out of tracebacks.
    """
    # Local, like every part of huggingface_hub's HTTP client here (~0.2 s): `publish --dry-run` never needs it.
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RevisionNotFoundError,
    )

    try:
        yield
    except StudioError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure below a Hub call gets a studio message
        where = f"{repo_id} on {endpoint}"
        http = next((x for x in _chain(e) if isinstance(x, HfHubHTTPError) and x.response is not None), None)
        if any(isinstance(x, OfflineModeIsEnabled) for x in _chain(e)):
            raise OfflineError(f"cannot {action}: huggingface_hub is in offline mode (HF_HUB_OFFLINE=1)") from None
        if http is not None:
            status = http.response.status_code
            said = (getattr(http, "server_message", None) or "").strip().splitlines()
            said = f" (the Hub said: {_scrub(said[0][:200], token)})" if said else ""
            if isinstance(http, RevisionNotFoundError):
                raise HubNotFoundError(f"cannot {action}: {repo_id} has no revision {revision!r} on {endpoint} (404); "
                                       f"list its tags on the repo page", status) from None
            if status == 401:
                raise HubAuthError(f"cannot {action}: {where} needs valid credentials (401){said}. The token is "
                                   f"missing, expired or revoked, or the repo is private: log in with `hf auth "
                                   f"login` or set HF_TOKEN", status) from None
            if status == 403:
                raise HubAuthError(f"cannot {action}: the token may not do this on {where} (403 forbidden){said}. Use "
                                   f"a token with write access to {repo_id.split('/')[0]} "
                                   f"(https://huggingface.co/settings/tokens)", status) from None
            if status == 404:
                raise HubNotFoundError(f"cannot {action}: {where} was not found (404){said}; check the repo id. A "
                                       f"private repo looks missing without a token", status) from None
            if status == 409:
                raise HubConflictError(f"cannot {action}: {where} refused a conflicting change (409){said}",
                                       status) from None
            raise HubError(f"cannot {action}: the Hub failed ({status}){said} at {where}; nothing was recorded in the "
                           f"registry: try again later", status) from None
        if isinstance(e, ValueError) and "Invalid metadata in README.md" in str(e):
            raise HubError(f"cannot {action}: the Hub refused the model card's metadata: "
                           f"{_scrub(' '.join(str(e).split())[:300], token)}") from None
        import httpx2  # local: huggingface_hub's HTTP library, loaded with the errors above

        if any(isinstance(x, (httpx2.TransportError, ConnectionError, TimeoutError)) for x in _chain(e)):
            raise HubError(f"cannot {action}: the connection to {endpoint} failed or dropped while talking to "
                           f"{repo_id}; nothing was recorded in the registry: check the network and run the same "
                           f"command again", None) from None
        raise HubError(f"cannot {action}: unexpected answer from {where}: {type(e).__name__}: "
                       f"{_scrub(str(e), token)[:300]}") from None


# --------------------------------------------------------------------------------------------
# the files of a publication
# --------------------------------------------------------------------------------------------


# A local path: absolute, in the home folder, on a drive, a file: URL, or climbing out of the current folder.
_LOCAL_PATH = re.compile(r"(?:~?[\\/]|~$|[A-Za-z]:[\\/]|\.\.?[\\/]|file:/)|.*[\\/]\.\.[\\/]", re.S | re.I)
# The same inside free text (a comment, A1111's parameters, the card): it starts the text or follows a space,
# quote, bracket or separator, so URLs ("https://host/a") and fractions ("1/2") are not paths.
_PATH_IN_TEXT = re.compile(r"""(?<![^\s"'`(\[{=,;<>])(?:file:(?=/))?(?:~|[A-Za-z]:)?[\\/]+(?=[^\s\\/"'`)\]}<>,;|])"""
                           r"""[^\s"'`)\]}<>,;|]+""")
# Keys whose values name local places even when relative (``dataset.path = "data/cats"``).
_PATH_KEYS = ("path", "paths", "dir", "dirs", "folder", "root")


def _last_component(path: str) -> str:
    parts = [p for p in re.split(r"[\\/]+", path.strip()) if p not in ("", ".", "..", "~")]
    return parts[-1] if parts else ""


def _local_path(key: str, value: str) -> bool:
    return bool(_LOCAL_PATH.match(value.strip())) or (
        key.lower().endswith(_PATH_KEYS) and bool(re.search(r"[\\/]", value)))


def public_value(value: Any, key: str = "", *, known: tuple[str, ...] | list[str] = ()) -> Any:
    """``value`` as it may go public: every local path becomes its last component (``/home/alice/cats`` ->
    ``cats``), so nothing published shows someone's folders. The one cleaning step of every published byte:
    the weights' metadata, ``lora_studio.json``, the sample recipes and PNG text chunks, the model card.

    Dicts and lists are cleaned item by item (keys too; ``key`` is the name a value sits under, which marks
    relative paths in ``dataset.path`` and the like as local). A string holding JSON (safetensors metadata
    such as ``lora_studio.training``) is cleaned inside and written back only if something changed. Any
    other string is free text: each of ``known`` (local paths found elsewhere in the same publication,
    which may hold spaces) is replaced wherever it appears, then every absolute path left in the text.
    Hub ids (``owner/name``) and URLs are not paths and stay.
    """
    if isinstance(value, dict):
        return {public_value(k, known=known) if isinstance(k, str) else k: public_value(v, str(k), known=known)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public_value(v, key, known=known) for v in value]
    if not isinstance(value, str) or not value or value.startswith("data:"):
        return value  # a data: URI (modelspec.thumbnail) is an image, and base64 may hold "/"
    if _local_path(key, value):
        return _last_component(value)
    if value.lstrip()[:1] in ("{", "["):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, (dict, list)):
            cleaned = public_value(parsed, key, known=known)
            return value if cleaned == parsed else json.dumps(cleaned, ensure_ascii=False, allow_nan=False)
    text = value
    for path in sorted(known, key=len, reverse=True):
        if path in text:
            text = text.replace(path, _last_component(path))
    return _PATH_IN_TEXT.sub(lambda m: _last_component(m.group()), text)


def _local_paths(value: Any, key: str = "") -> set[str]:
    """Every local path in ``value`` (as :func:`public_value` finds them), JSON strings included: the
    ``known`` of a publication, so free text that repeats one (spaces and all) loses it too."""
    if isinstance(value, dict):
        return set().union(*(_local_paths(v, str(k)) for k, v in value.items())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(_local_paths(v, key) for v in value)) if value else set()
    if not isinstance(value, str) or not value:
        return set()
    if _local_path(key, value):
        return {value.strip()} if len(value.strip()) > 1 else set()
    if value.lstrip()[:1] in ("{", "["):
        with contextlib.suppress(ValueError):
            return _local_paths(json.loads(value), key)
    return set()


def _version_paths(version: AdapterVersion) -> tuple[str, ...]:
    return tuple(_local_paths({"base_model": version.base_model, "source": version.source,
                               "training_config": version.training_config,
                               "metadata": version.safetensors_metadata,
                               "recipes": [s.recipe for s in version.samples]}))


def public_version(version: AdapterVersion, known: tuple[str, ...] = ()) -> AdapterVersion:
    """The version with every field a publication shows cleaned by :func:`public_value` (the record and
    the card are built from it; the weights and samples are read through the original)."""
    return dataclasses.replace(
        version, base_model=public_value(version.base_model, "base_model", known=known),
        description=public_value(version.description, known=known),
        training_config=public_value(version.training_config, known=known),
        source=public_value(version.source, known=known), metrics=public_value(version.metrics, known=known),
        safetensors_metadata=public_value(version.safetensors_metadata, known=known),
        trigger_words=tuple(public_value(list(version.trigger_words), known=known)),
        tags=tuple(public_value(list(version.tags), known=known)),
        author=public_value(version.author, known=known))


def _public_safetensors(path: Path, known: tuple[str, ...]) -> None:
    """Rewrite the ``__metadata__`` of a safetensors file through :func:`public_value`; the tensors' bytes
    (and so every tensor hash) are copied unchanged."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        return
    cleaned = {k: public_value(v, k, known=known) for k, v in metadata.items()}
    if cleaned == metadata:
        return
    text = json.dumps({"__metadata__": cleaned, **{k: v for k, v in header.items() if k != "__metadata__"}},
                      separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors keeps the tensor data 8-byte aligned

    def write(out) -> None:
        out.write(len(text).to_bytes(8, "little") + text)
        with open(path, "rb") as f:
            f.seek(8 + size)
            shutil.copyfileobj(f, out, 1024 * 1024)

    write_atomic(path, write)


def _public_image(image: Path, known: tuple[str, ...], what: str) -> bytes:
    """A sample as published: decoded within the registry's bounds and re-encoded as PNG holding only its
    text chunks, cleaned (the recipe chunk and A1111's ``parameters`` included); other metadata (EXIF,
    ICC profiles, comments) is not carried over."""
    from PIL.PngImagePlugin import PngInfo  # local: Pillow only when a version has samples to publish

    im = decode_sample(image, what)
    info = PngInfo()
    for key, text in (getattr(im, "text", None) or {}).items():
        info.add_text(public_value(key, known=known), public_value(str(text), key, known=known))
    if im.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
        im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _hub_base_model(version: AdapterVersion, base_model: str | None) -> str | None:
    if base_model is not None:
        return check_repo_id(base_model.partition("@")[0])
    ref = version.base_model or ""
    repo_id = ref.partition("@")[0]
    if repo_id.count("/") == 1 and not Path(ref).expanduser().exists():
        try:
            return check_repo_id(repo_id)
        except InvalidNameError:
            return None
    return None


def kohya_file_name(version: AdapterVersion) -> str:
    """The kohya copy's file name: ``<name>.safetensors``, the name A1111 and ComfyUI show in ``<lora:name:1>``."""
    stem = version.name if version.name + ".safetensors" != WEIGHTS_FILE else version.name + "_kohya"
    return stem + ".safetensors"


def publication_record(version: AdapterVersion, *, files: dict[str, str | None], samples: list[dict],
                       known: tuple[str, ...] = ()) -> dict:
    """The ``lora_studio.json`` of a publication: the version's record minus anything local or private
    (through :func:`public_value`; ``known`` as there)."""
    return public_value({
        "format": RECORD_FORMAT,
        "name": version.name, "version": version.number, "ref": version.ref,
        "family": version.family, "adapter_type": version.adapter_type, "rank": version.rank, "alpha": version.alpha,
        "target_modules": list(version.target_modules), "components": list(version.components),
        "trigger_words": list(version.trigger_words), "description": version.description, "tags": list(version.tags),
        "license": version.license, "author": version.author,
        "base_model": version.base_model or None,
        "base_model_sha256": version.base_model_sha256,
        "training_config": version.training_config or None,
        "dataset_fingerprint": version.dataset_fingerprint, "metrics": version.metrics,
        "origin": version.origin,
        # The Hub part of a pulled version's source is public already; local paths are not published.
        "hub_source": (version.source or {}).get("hub") if version.origin == "pulled" else None,
        "parents": [{"name": p.name, "number": p.number, "sha256": p.sha256} for p in version.parents],
        "tensor_sha256": version.tensor_sha256,
        "files": files,
        "samples": samples,
    }, known=known)


def _yaml_text(text: str) -> str:
    return " ".join(str(text).split())


def model_card(version: AdapterVersion, repo_id: str, *, files: dict[str, str | None], samples: list[dict],
               base_model: str | None = None, license: str | None = None,
               known: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """The README.md of a publication and the warnings it raised.

    Front matter as diffusers' training scripts write it (``base_model``, ``library_name: diffusers``,
    ``license``, ``instance_prompt``, ``tags`` with ``lora`` and ``template:sd-lora``, ``widget`` entries
    for the samples); the body: description, trigger words, diffusers and LoRA Studio usage, downloads,
    training settings and dataset size, lineage. ``base_model`` must be a Hub id for the Hub to list the
    repo as an adapter of it: without one (the embedded ``tiny`` model, a local file) it is left out and a
    warning says so. The text goes through :func:`public_value` (``known`` as there) like every published byte.
    """
    warnings: list[str] = []
    hub_base = _hub_base_model(version, base_model)
    if hub_base is None:
        warnings.append(f"the base model {version.base_model or 'unknown'!r} is not a Hub repo id, so the card has no "
                        f"base_model and the Hub will not list this repo as an adapter of a base model; pass "
                        f"--base-model OWNER/NAME when the weights fit a model on the Hub")
    tags = list(BASE_TAGS) + list(_family_tags(version.family))
    tags += ["lora-studio"] + [t for t in version.tags if t.lower() not in {x.lower() for x in tags}]
    tags = list(dict.fromkeys(tags))
    widget = [{"text": _yaml_text(s["recipe"].get("prompt") or ", ".join(version.trigger_words) or version.name),
               "output": {"url": s["file"]}} for s in samples]
    meta: dict[str, Any] = {"license": license or version.license or "unknown", "library_name": "diffusers",
                            "tags": tags}
    family = FAMILIES.get(version.family or "")
    inherited = family.base_model_licenses.get(hub_base or "") if family else None
    if inherited and not (license or version.license):
        meta.update(inherited)  # e.g. FLUX.1-dev's non-commercial license, by name and link
    if hub_base:
        meta["base_model"] = hub_base
    if version.trigger_words:
        meta["instance_prompt"] = _yaml_text(", ".join(version.trigger_words))
    if widget:
        meta["widget"] = widget
    data = ModelCardData(**meta)
    method = formats.METHOD_NAMES[version.adapter_type]
    base_text = f"[{hub_base}](https://huggingface.co/{hub_base})" if hub_base else f"`{version.base_model or '?'}`"
    embedded = version.base_model in EMBEDDED_MODELS
    if embedded:
        base_text += f" (the tiny {architectures.display_name(version.family)} model embedded in LoRA Studio)"
    tag = f"v{version.number}"
    lines = [f"# {version.name} ({tag})", ""]
    if samples:
        lines += ["<Gallery />", ""]
    lines += ["## Model description", ""]
    lines += [version.description or f"A {method} adapter for {base_text}.", ""]
    lines += [f"- Adapter: {method}, rank {version.rank or '?'}, alpha {_num(version.alpha)} "
              f"(strength scale alpha / rank = {_scale(version)})",
              f"- Base model: {base_text} ({architectures.display_name(version.family)})",
              f"- Patches: {', '.join(version.components) or '?'} ({', '.join(version.target_modules) or '?'})",
              f"- Registry version: `{version.ref}`, tensor sha256 `{version.tensor_sha256}`", ""]
    lines += ["## Trigger words", ""]
    if version.trigger_words:
        words = ", ".join(f"`{w}`" for w in version.trigger_words)
        lines += [f"You should use {words} to trigger the image generation.", ""]
    else:
        lines += ["No trigger words: the adapter applies to every prompt.", ""]
    prompt = (samples[0]["recipe"].get("prompt") if samples else None) or ", ".join(version.trigger_words) or \
        "a red circle on a blue background"
    lines += ["## Use it with diffusers", "", "```py"]
    if hub_base:
        lines += ["import torch", "from diffusers import AutoPipelineForText2Image", "",
                  f"pipeline = AutoPipelineForText2Image.from_pretrained({hub_base!r}, torch_dtype=torch.float16)",
                  "pipeline = pipeline.to(\"cuda\")"]
    elif embedded:
        pipeline_class = family.pipelines["text2img"] if family else "DiffusionPipeline"
        lines += ["from studio.core.base_models import load_fresh_pipeline  # pip install lora-studio", "",
                  f'pipeline = load_fresh_pipeline("{version.base_model}")  # a diffusers {pipeline_class}']
    else:
        lines += ["from diffusers import AutoPipelineForText2Image", "",
                  f"pipeline = AutoPipelineForText2Image.from_pretrained({version.base_model or 'BASE_MODEL'!r})"]
    lines += [f"pipeline.load_lora_weights({repo_id!r}, weight_name={WEIGHTS_FILE!r}, revision={tag!r})",
              f"image = pipeline({prompt!r}).images[0]", "```", ""]
    lines += ["## Use it with LoRA Studio", "", "```bash", f"lora-studio adapters pull {repo_id}@{tag}",
              f"lora-studio generate {prompt!r} --adapter {version.name}:0.8 --out out/", "```", ""]
    lines += ["## Download model", "",
              f"- diffusers/peft: [`{WEIGHTS_FILE}`](./{WEIGHTS_FILE}) (`pipeline.load_lora_weights`)"]
    if files.get("kohya"):
        lines += [f"- kohya / AUTOMATIC1111 / ComfyUI: [`{files['kohya']}`](./{files['kohya']}); in A1111 write "
                  f"`<lora:{Path(files['kohya']).stem}:0.8>`"]
    lines += [f"- the full record (lineage, training settings, sample recipes): [`{RECORD_FILE}`](./{RECORD_FILE})",
              "", "## Training settings", ""]
    lines += _training_lines(version)
    lines += ["## Lineage", ""]
    lines += _lineage_lines(version)
    body = "\n".join(lines).rstrip() + "\n"
    return public_value(f"---\n{data.to_yaml()}\n---\n\n{body}", known=known), warnings


def _num(x) -> str:
    return "?" if x is None else f"{x:g}"


def _scale(version: AdapterVersion) -> str:
    if version.rank and version.alpha:
        return f"{version.alpha / version.rank:g}"
    return "?"


def _flatten(config: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _flatten(value, name + ".")
        elif isinstance(value, (str, int, float, bool)) and value != "":
            out.append((name, value))
    return out


def _training_lines(version: AdapterVersion) -> list[str]:
    md = version.safetensors_metadata or {}
    images = md.get("ss_num_train_images") or None
    lines = []
    if images:
        lines.append(f"- Dataset size: {images} images" + (f" (fingerprint `{version.dataset_fingerprint}`)"
                                                            if version.dataset_fingerprint else ""))
    elif version.dataset_fingerprint:
        lines.append(f"- Dataset fingerprint: `{version.dataset_fingerprint}`")
    for key, label in (("ss_steps", "Steps"), ("ss_learning_rate", "Learning rate"), ("ss_optimizer", "Optimizer"),
                       ("ss_lr_scheduler", "LR scheduler"), ("ss_resolution", "Resolution"),
                       ("ss_total_batch_size", "Total batch size"), ("ss_seed", "Seed")):
        if md.get(key):
            lines.append(f"- {label}: {md[key]}")
    for key, value in sorted((version.metrics or {}).items()):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lines.append(f"- {key}: {value:g}")
    if version.training_config:
        rows = _flatten(public_value(version.training_config))
        if rows:
            lines += ["", "| setting | value |", "| --- | --- |"]
            lines += [f"| `{k}` | {str(v).replace('|', '/')} |" for k, v in rows]
    if not lines:
        lines.append(f"Not trained in LoRA Studio (origin: {version.origin}); no training settings were recorded.")
    return lines + [""]


def _lineage_lines(version: AdapterVersion) -> list[str]:
    lines = [f"- Origin: {version.origin}"]
    hub = (version.source or {}).get("hub") if version.origin == "pulled" else None
    if isinstance(hub, dict) and hub.get("repo_id"):
        lines.append(f"- Pulled from [{hub['repo_id']}](https://huggingface.co/{hub['repo_id']}) at "
                     f"`{hub.get('revision')}` (commit `{hub.get('commit')}`)")
    for p in version.parents:
        lines.append(f"- Parent: `{p.ref}` (weights sha256 `{p.sha256}`)")
    if not version.parents:
        lines.append("- Parents: none recorded")
    return lines + [""]


def stage_files(registry: Registry, version: AdapterVersion, repo_id: str, out_dir: Path, *, kohya: bool = False,
                base_model: str | None = None, license: str | None = None) -> tuple[list[str], list[str]]:
    """Write the files of a publication into ``out_dir`` (which must exist and be empty); return the paths
    in the repo (weights first) and the warnings (the model card's, samples left out).

    Every byte written goes through :func:`public_value`, with the local paths the version records as its
    ``known``: the weights' metadata (kohya copy too), the samples' PNG text chunks (each sample is
    re-encoded as a PNG that holds nothing else), their recipes in ``lora_studio.json``, the record, the card.
    """
    out_dir = Path(out_dir)
    known = _version_paths(version)
    public = public_version(version, known)
    files = {"diffusers": WEIGHTS_FILE, "kohya": kohya_file_name(version) if kohya else None}
    paths = [WEIGHTS_FILE] + ([files["kohya"]] if kohya else [])
    for fmt, rel in (("diffusers", WEIGHTS_FILE), ("kohya", files["kohya"])):
        if rel is not None:
            export_adapter(registry, version.ref, format=fmt, out=out_dir / rel, force=True)
            _public_safetensors(out_dir / rel, known)
    samples, warnings = [], []
    for sample in version.samples:
        try:
            data = _public_image(Path(sample.path), known, f"sample {len(samples) + 1} of {version.ref}")
        except StudioError as e:  # stored before samples were checked: published without it
            warnings.append(f"{e}; it is left out of the publication")
            continue
        rel = f"{IMAGES_DIR}/sample_{len(samples)}.png"
        write_bytes_atomic(out_dir / rel, data)
        samples.append({"file": rel, "recipe": public_value(sample.recipe, known=known),
                        "sha256": hashlib.sha256(data).hexdigest()})
        paths.append(rel)
    record = publication_record(public, files=files, samples=samples, known=known)
    write_bytes_atomic(out_dir / RECORD_FILE, (json.dumps(record, indent=2, ensure_ascii=False, allow_nan=False)
                                               + "\n").encode())
    paths.append(RECORD_FILE)
    card, card_warnings = model_card(public, repo_id, files=files, samples=samples, base_model=base_model,
                                     license=license, known=known)
    write_bytes_atomic(out_dir / CARD_FILE, card.encode())
    paths.append(CARD_FILE)
    return paths, card_warnings + warnings


def _dry_run(registry: Registry, version: AdapterVersion, repo_id: str, out: Path, **kw) -> tuple[list[str], list]:
    """Stage beside ``out`` and rename into place (:func:`~studio.core.atomic.write_folder_atomic`): a dry run
    leaves a complete folder or none, and a full disk is a DiskFullError naming the folder."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidRequestError(f"{out} exists and is not an empty folder: give --dry-run a new or empty folder, "
                                  f"so it holds exactly the files a publication uploads")
    staged: list[tuple[list[str], list]] = []
    write_folder_atomic(out, lambda tmp: staged.append(stage_files(registry, version, repo_id, tmp, **kw)))
    return staged[0]


# --------------------------------------------------------------------------------------------
# publish
# --------------------------------------------------------------------------------------------


def publish_version(registry: Registry, ref: str, repo_id: str, *, private: bool = False, kohya: bool = False,
                    token: str | None = None, dry_run_dir: str | Path | None = None, base_model: str | None = None,
                    license: str | None = None) -> PublishResult:
    """Publish the registry version ``ref`` to the Hub model repo ``repo_id`` and tag it ``v<number>``.

    Creates the repo when missing (``private`` applies only then), uploads every file in ONE commit (see
    the module docstring; files the previous publication listed and this one does not carry, such as its
    kohya copy or extra samples, are deleted in it, nothing else), tags
    that commit, and records the publication on the version. If the tag already holds this version (same
    tensors), nothing is uploaded and the existing publication is returned; if it holds other weights,
    :class:`HubConflictError` (tags never move). On any failure the registry is unchanged.

    Args:
        registry: the registry holding ``ref``.
        ref: the version, e.g. ``mystyle@3`` (a bare name is its newest version).
        repo_id: ``owner/name`` on the Hub.
        private: create the repo private (an existing repo keeps its visibility).
        kohya: also upload ``<name>.safetensors`` in kohya layout for A1111/ComfyUI (LoRA only).
        token: a Hub token; default what huggingface_hub finds (HF_TOKEN, the login cache). Never stored.
        dry_run_dir: write the files to this new or empty folder instead; no network, no token.
        base_model: Hub id for the card's ``base_model`` when the version's base is not a Hub id.
        license: the card's license (default the version's, else ``unknown``).
    """
    repo_id = check_repo_id(repo_id)
    version = registry.get(ref)
    if kohya:
        formats.check_kohya_exportable(version.adapter_type, version.family)  # before any file is written or sent
    if base_model is not None:
        check_repo_id(base_model.partition("@")[0])
    tag = f"v{version.number}"
    endpoint = hub_endpoint()
    options = {"kohya": kohya, "base_model": base_model, "license": license}
    if dry_run_dir is not None:
        out = Path(dry_run_dir).expanduser()
        paths, warnings = _dry_run(registry, version, repo_id, out, **options)
        return PublishResult(repo_id=repo_id, url=f"{endpoint}/{repo_id}", commit=None, tag=tag, files=tuple(paths),
                             ref=version.ref, dry_run=True, out_dir=out, warnings=tuple(warnings))
    _require_online("publish to the Hub", ", or use --dry-run DIR to write the files without uploading")
    token = _token(token, required=True, action="publish to the Hub")
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi  # local: the HTTP client

    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="lora-studio-publish-") as tmp:
        paths, warnings = stage_files(registry, version, repo_id, Path(tmp), **options)
        with _hub_errors("publish to the Hub", repo_id=repo_id, endpoint=endpoint, token=token):
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
            url = str(repo_url).rstrip("/")
            existing = next((t for t in api.list_repo_refs(repo_id).tags if t.name == tag), None)
            if existing is not None:
                commit = _check_existing_tag(api, version, repo_id, tag, existing.target_commit, endpoint, token)
                info = api.model_info(repo_id, revision=commit)
                published = [s.rfilename for s in info.siblings or () if s.rfilename != ".gitattributes"]
                result = PublishResult(repo_id=repo_id, url=url, commit=commit, tag=tag, files=tuple(published),
                                       ref=version.ref, commit_url=f"{url}/commit/{commit}",
                                       private=bool(info.private), already_published=True, warnings=tuple(warnings))
            else:
                head = api.model_info(repo_id, revision="main", files_metadata=True)
                with tempfile.TemporaryDirectory(prefix="lora-studio-head-") as head_tmp:
                    previous = _fetch_record(repo_id, "main", head.sha, _sizes(head), Path(head_tmp), endpoint,
                                             token, strict=False)
                stale = sorted(set(_published_paths(previous)) & set(_sizes(head)) - set(paths))
                operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(Path(tmp) / p)) for p in paths]
                operations += [CommitOperationDelete(path_in_repo=p) for p in stale]
                info = api.create_commit(
                    repo_id, operations, commit_message=f"Publish {version.ref} as {tag}",
                    commit_description=f"LoRA Studio version {version.ref} (tensor sha256 {version.tensor_sha256}).",
                    parent_commit=head.sha)
                # The tag is the version: made only on the commit just created, never moved afterwards.
                api.create_tag(repo_id, tag=tag, revision=info.oid, tag_message=f"LoRA Studio {version.ref}")
                result = PublishResult(repo_id=repo_id, url=url, commit=info.oid, tag=tag, files=tuple(paths),
                                       ref=version.ref, commit_url=info.commit_url, private=bool(head.private),
                                       warnings=tuple(warnings))
    # Recorded last: a failure anywhere above leaves the registry exactly as it was.
    registry.record_publication(version.ref, repo_id=repo_id, tag=tag, commit=result.commit, url=url,
                                endpoint=endpoint, private=bool(result.private), files=result.files)
    return result


def _published_paths(record: dict | None) -> list[str]:
    """The weights and sample files an earlier publication's record lists: what a new publication may delete."""
    if record is None:
        return []
    listed = [v for v in (record.get("files") or {}).values()] if isinstance(record.get("files"), dict) else []
    listed += [s.get("file") for s in record.get("samples") or [] if isinstance(s, dict)] \
        if isinstance(record.get("samples"), list) else []
    return [p for p in listed if isinstance(p, str) and _MANAGED.fullmatch(p)]


def _check_existing_tag(api, version: AdapterVersion, repo_id: str, tag: str, commit: str, endpoint: str,
                        token: str | None) -> str:
    """The tag exists: fine when its record names these tensors (a publish re-run), else a conflict."""
    sizes = _sizes(api.model_info(repo_id, revision=commit, files_metadata=True))
    with tempfile.TemporaryDirectory(prefix="lora-studio-tag-") as tmp:
        # Unreadable: not ours to overwrite either.
        record = _fetch_record(repo_id, tag, commit, sizes, Path(tmp), endpoint, token, strict=False)
    if record is not None and record.get("tensor_sha256") == version.tensor_sha256:
        return commit
    theirs = f"{record.get('ref')} (tensor sha256 {str(record.get('tensor_sha256'))[:16]}...)" if record else \
        "files not published by LoRA Studio"
    raise HubConflictError(f"{repo_id} already has a tag {tag} (commit {commit[:12]}) holding {theirs}, not "
                           f"{version.ref}: tags are never moved. Publish to another repo, or delete the tag on the "
                           f"Hub first")


# --------------------------------------------------------------------------------------------
# pull
# --------------------------------------------------------------------------------------------


def _download(repo_id: str, filename: str, commit: str, local_dir: Path, endpoint: str, token: str | None) -> Path:
    from huggingface_hub import hf_hub_download  # local: the HTTP client

    return Path(hf_hub_download(repo_id, filename, revision=commit, local_dir=local_dir, endpoint=endpoint,
                                token=token if token is not None else False))


def _sizes(info) -> dict[str, int | None]:
    """Path -> size in bytes of a revision's files, from ``model_info(files_metadata=True)`` (None: not listed)."""
    return {s.rfilename: (s.lfs.size if s.lfs is not None else s.size) for s in info.siblings or ()}


def _check_size(repo_id: str, revision: str, rel: str, size: int | None, limit: int, what: str) -> None:
    """Refuse a file from the repo's listing, before it is downloaded."""
    if size is None:
        raise HubError(f"{repo_id}@{revision} lists {rel} without its size, so the studio cannot bound its download "
                       f"and does not start it: try again later")
    if size > limit:
        raise InvalidRequestError(f"{rel} in {repo_id}@{revision} is {size:,} bytes, larger than the {limit:,} bytes "
                                  f"{what} may have: the studio does not download it")


def _fetch(repo_id: str, revision: str, commit: str, rel: str, sizes: dict, limit: int, what: str, tmp: Path,
           endpoint: str, token: str | None) -> Path:
    """Download ``rel`` at ``commit`` after checking its listed size, and check the bytes that arrived too."""
    _check_size(repo_id, revision, rel, sizes.get(rel), limit, what)
    path = _download(repo_id, rel, commit, tmp, endpoint, token)
    _check_size(repo_id, revision, rel, path.stat().st_size, limit, what)
    return path


def _fetch_record(repo_id: str, revision: str, commit: str, sizes: dict, tmp: Path, endpoint: str,
                  token: str | None, *, strict: bool = True) -> dict | None:
    """The repo's ``lora_studio.json`` at ``commit`` (None when there is none or it is not a studio record).
    Not ``strict``: a record too large or damaged also reads as None instead of raising."""
    if RECORD_FILE not in sizes:
        return None
    try:
        return _read_record(_fetch(repo_id, revision, commit, RECORD_FILE, sizes, MAX_RECORD_BYTES,
                                   "a LoRA Studio record", tmp, endpoint, token))
    except InvalidRequestError:
        if strict:
            raise
        return None


def _read_record(path: Path) -> dict | None:
    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    try:
        record = json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidRequestError(f"{RECORD_FILE} is not valid JSON ({e}): the repo's record is damaged") from None
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None


def _get(record: dict, key: str, kind: type, default=None):
    """``record[key]`` when it has the expected JSON type, else ``default`` (a record comes from the internet)."""
    value = record.get(key)
    return value if isinstance(value, kind) else default


def _str_list(value) -> list[str] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def _choose_weights(files: list[str], record: dict | None, repo_id: str, revision: str) -> str:
    """The adapter file to import: the record's, else diffusers' name, else the repo's one .safetensors."""
    named = ((record or {}).get("files") or {}).get("diffusers") if isinstance((record or {}).get("files"),
                                                                                dict) else None
    if isinstance(named, str) and named in files:
        return named
    if WEIGHTS_FILE in files:
        return WEIGHTS_FILE
    candidates = [f for f in files if f.endswith(".safetensors") and "/" not in f]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        pickles = [f for f in files if f.lower().endswith(formats.PICKLE_SUFFIXES)]
        hint = (f"; it has {', '.join(pickles[:5])}, pickle files the studio never loads" if pickles else "")
        raise HubNotFoundError(f"{repo_id}@{revision} has no .safetensors adapter file at its top level{hint}")
    raise InvalidRequestError(f"{repo_id}@{revision} has several .safetensors files ({', '.join(candidates[:8])}) and "
                              f"no {WEIGHTS_FILE}: the studio cannot tell which is the adapter")


def _local_parents(registry: Registry, lineage: list[dict]) -> list[str]:
    """The lineage entries this registry holds (same name, number and weights hash), as references."""
    refs = []
    for p in lineage:
        if not (isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("number"), int)
                and isinstance(p.get("sha256"), str)):
            continue
        try:
            v = registry.get(f"{p['name']}@{p['number']}")
        except (AdapterNotFoundError, AmbiguousReferenceError, InvalidNameError):
            continue
        if v.weights_sha256 == p["sha256"] and v.ref not in refs:
            refs.append(v.ref)
    return refs


def _default_name(record: dict | None, repo_id: str) -> str:
    for text in ((record or {}).get("name"), repo_id.split("/")[1]):
        if isinstance(text, str):
            try:
                return check_name(text)
            except InvalidNameError:
                continue
    raise InvalidNameError(f"{repo_id.split('/')[1]!r} is not a valid adapter name: pass --name")


def pull_adapter(registry: Registry, repo: str, *, revision: str | None = None, name: str | None = None,
                 token: str | None = None, base: str | None = None) -> AdapterVersion:
    """Download the adapter of a Hub repo at a revision and register it as a version with origin "pulled".

    ``repo`` is ``owner/name`` or ``owner/name@revision`` (a tag such as ``v3``, a branch, a commit sha;
    default ``main``). The weights go through the same detection and validation against a base model as
    ``adapters import`` (kohya or diffusers layouts; pickles refused). The version records the source
    (repo, revision, commit) and, from a LoRA Studio publication's ``lora_studio.json``, the trigger words,
    tags, training settings, sample images with their recipes and the lineage (parents this registry
    holds become real parents; all of them stay in ``source['lineage']``). Pulling a revision already
    pulled under that name returns the existing version without downloading again.

    Args:
        name: adapter name (default: the publication's name, else the repo's name).
        token: a Hub token for private repos; default what huggingface_hub finds. Never stored.
        base: base model to validate against (default: the studio's default base model,
            ``LORA_STUDIO_BASE_MODEL``, ``tiny`` unless set). The publication's own base model is recorded in
            ``source['published_base_model']`` but never loaded: it can be any Hub id or a path.

    Sizes come from the repo's file list and are checked before each download (:data:`MAX_RECORD_BYTES`,
    :data:`MAX_WEIGHTS_BYTES`, :data:`MAX_SAMPLE_BYTES`, :data:`MAX_CARD_BYTES`). A sample image over its
    limit or one that does not decode within the registry's bounds is left out and listed, with the
    reason, in ``source['refused_samples']``; the rest of the pull is kept.
    """
    repo_id, at = parse_repo_reference(repo)
    if revision is not None and at is not None and revision != at:
        raise InvalidRequestError(f"{repo} names revision {at!r} and --revision says {revision!r}: give one")
    if revision is not None and not _REVISION.fullmatch(revision):
        raise InvalidNameError(f"{revision!r} is not a revision: use a tag, branch or commit sha")
    revision = revision or at or "main"
    if name is not None:
        check_name(name)
    _require_online("pull from the Hub")
    token = _token(token, required=False, action="pull from the Hub")
    endpoint = hub_endpoint()
    from huggingface_hub import HfApi  # local: the HTTP client

    api = HfApi(endpoint=endpoint, token=token if token is not None else False)
    with tempfile.TemporaryDirectory(prefix="lora-studio-pull-") as tmp_text:
        tmp = Path(tmp_text)
        with _hub_errors("pull from the Hub", repo_id=repo_id, endpoint=endpoint, token=token, revision=revision):
            info = api.model_info(repo_id, revision=revision, files_metadata=True)
            commit = info.sha
            sizes = _sizes(info)
            files = list(sizes)
            record = _fetch_record(repo_id, revision, commit, sizes, tmp, endpoint, token)
            target = name or _default_name(record, repo_id)
            for v in registry.list_versions(name=target, limit=None).items:
                hub = (v.source or {}).get("hub") if v.origin == "pulled" else None
                if isinstance(hub, dict) and hub.get("repo_id") == repo_id and hub.get("commit") == commit:
                    return v  # this revision was pulled already: nothing to download or record
            weights_file = _choose_weights(files, record, repo_id, revision)
            _check_size(repo_id, revision, weights_file, sizes.get(weights_file), MAX_WEIGHTS_BYTES,
                        "an adapter file")
            card = None
            if CARD_FILE in files and (sizes.get(CARD_FILE) or 0) <= MAX_CARD_BYTES:  # a card only adds hints
                card = _fetch(repo_id, revision, commit, CARD_FILE, sizes, MAX_CARD_BYTES, "a model card", tmp,
                              endpoint, token)
            samples, refused = [], []
            for rel, recipe in _sample_files(record, card, files):
                try:
                    path = _fetch(repo_id, revision, commit, rel, sizes, MAX_SAMPLE_BYTES, "a sample image", tmp,
                                  endpoint, token)
                    decode_sample(path, f"sample image {rel}")
                except InvalidRequestError as e:  # a sample is a preview: the adapter is pulled without it
                    refused.append({"file": rel, "reason": str(e)})
                    continue
                samples.append(SampleImage(image=path, recipe=recipe))
            weights = _fetch(repo_id, revision, commit, weights_file, sizes, MAX_WEIGHTS_BYTES, "an adapter file",
                             tmp, endpoint, token)
        source = {"hub": {"repo_id": repo_id, "revision": revision, "commit": commit, "endpoint": endpoint,
                          "url": f"{endpoint}/{repo_id}", "file": weights_file}}
        if refused:
            source["refused_samples"] = refused
        return _register_pulled(registry, target, weights, record, _card_data(card), source, samples, base)


def _card_data(card: Path | None) -> dict:
    if card is None:
        return {}
    from huggingface_hub import ModelCard  # local: the card loader comes with the HTTP client

    try:
        return ModelCard.load(card, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # noqa: BLE001 - a card that does not parse only loses its hints (base model, prompt)
        return {}


def _sample_files(record: dict | None, card: Path | None, files: list[str]) -> list[tuple[str, dict]]:
    """(path in repo, recipe) of the sample images: the record's, else the card's widget outputs."""
    out: list[tuple[str, dict]] = []
    entries = (record or {}).get("samples")
    if isinstance(entries, list):
        for s in entries[:64]:
            if isinstance(s, dict) and isinstance(s.get("file"), str) and _SAMPLE_FILE.fullmatch(s["file"]) \
                    and s["file"] in files:
                recipe = s.get("recipe") if isinstance(s.get("recipe"), dict) else {}
                out.append((s["file"], recipe))
        return out
    for w in (_card_data(card).get("widget") or [])[:64]:
        url = ((w.get("output") or {}).get("url") if isinstance(w, dict) else None)
        if isinstance(url, str) and url in files and url.lower().endswith((".png", ".jpg", ".jpeg", ".webp")) \
                and ".." not in url:
            out.append((url, {"prompt": str(w.get("text") or "")}))
    return out


def _register_pulled(registry: Registry, name: str, weights: Path, record: dict | None, card: dict, source: dict,
                     samples: list[SampleImage], base: str | None) -> AdapterVersion:
    """Register the downloaded weights through :func:`adapters.ingest.ingest` (origin "pulled"), with the values
    a publication's record and card give: the same detection, architecture pre-check and validation as an import."""
    record = record or {}
    info = formats.detect(weights)
    card_base = card.get("base_model") if isinstance(card.get("base_model"), str) else None
    published_base = _get(record, "base_model", str) or card_base
    if published_base:
        source["published_base_model"] = published_base[:256]  # what the publisher used: shown, never loaded
    # The user's choice, never the remote record's: a record can name a Hub model of many GB, or a path on
    # this machine; a publication from a local file names only that file, which no other machine has.
    base = base or get_settings().default_base_model
    words = _str_list(record.get("trigger_words"))
    if words is None:
        words = [] if info.trigger_words_suggested else list(info.trigger_words)
        if not words and isinstance(card.get("instance_prompt"), str) and card["instance_prompt"].strip():
            words = [card["instance_prompt"].strip()]
    license_ = _get(record, "license", str) or (card.get("license") if isinstance(card.get("license"), str)
                                                 and card.get("license") != "unknown" else None)
    author = _get(record, "author", str)
    lineage = [p for p in (record.get("parents") or []) if isinstance(p, dict)] if isinstance(
        record.get("parents"), list) else []
    if lineage:
        source["lineage"] = [{"name": p.get("name"), "number": p.get("number"), "sha256": p.get("sha256")}
                             for p in lineage]
    if record.get("ref"):
        source["published_from"] = str(record["ref"])
        source["published_origin"] = str(record.get("origin"))
    return ingest(
        registry, weights, name=name, origin="pulled", base=base, detected=info, trigger_words=clean_values(words, 256),
        tags=clean_values(_str_list(record.get("tags")) or [], 100),
        description=_get(record, "description", str, "") or "", author=author[:256] if author else None,
        license=license_[:128] if license_ else None, source_info=source,
        parents=_local_parents(registry, lineage), samples=samples,
        base_model_sha256=_get(record, "base_model_sha256", str),
        training_config=_get(record, "training_config", dict),
        dataset_fingerprint=_get(record, "dataset_fingerprint", str), metrics=_get(record, "metrics", dict)).version
