"""Resolve a base-model reference to a loaded diffusers pipeline, offline-aware and cached.

References users type (``--base``, the UI's base-model box, recipes):

- ``tiny`` - the embedded tiny SD-1 model (the default; ships inside the package); ``tiny-sdxl`` - the
  embedded tiny SDXL model (:data:`studio.core.embedded.EMBEDDED_MODELS` lists them).
- a local diffusers folder (has ``model_index.json``).
- a single-file checkpoint ending in ``.safetensors`` (A1111/ComfyUI style); the component configs
  ship with its family's single-file layout (``studio/core/families/configs/``) so this needs no
  network. Files written by ``export_single_file`` carry their own configs in
  their metadata and use those.
- a Hugging Face Hub id ``owner/name`` (optionally ``owner/name@revision``). Offline
  (``HF_HUB_OFFLINE=1``) a Hub id fails fast, unless the Hub cache already holds it.

Every reference knows its family, recognised from the files rather than assumed: a folder's (and a
Hub repo's) ``model_index.json`` names its pipeline class; a single file's tensor names give away its
architecture. A model of an architecture the studio knows but does not run yet (SDXL, say) is refused
with one line naming it. A Hub id's family is looked up only when first asked, so resolving stays
cheap and works offline.

Only safetensors weights are ever loaded: ``.ckpt``/``.pt``/``.bin``/``.pth`` files are pickles that can
run code when loaded, and are refused. Pipelines are kept in a small cache keyed by reference, so a
grid of prompts or a Streamlit session costs one model load.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from studio.core.embedded import EMBEDDED_DIR, EMBEDDED_MODELS
from studio.core.errors import (
    BaseModelNotFoundError,
    CorruptWeightsError,
    InvalidRequestError,
    OfflineError,
    StudioError,
    UnsafeWeightsError,
)
from studio.core.families import (
    FAMILIES,
    Family,
    architecture_of,
    architectures,
    family_for_pipeline_class,
    family_of_pipeline,
    get_family,
)
from studio.core.families.base import SingleFileLayout
from studio.core.filesafety import PICKLE_SUFFIXES, check_safetensors, refuse_pickle
from studio.core.hashing import file_sha256
from studio.core.settings import check_data_path, get_settings
from studio.core.single_file import (
    check_export_target,
    layout_of,
    single_file_config_dir,
    tokenizer_options,
    write_single_file,
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(@[A-Za-z0-9_./-]{1,200})?$")
PIPELINE_CACHE_SIZE = 2  # a real SD-1 pipeline is ~4 GB in float32: keep the cache small
MODEL_INDEX = "model_index.json"


@dataclass(frozen=True)
class BaseModelRef:
    """A resolved reference: what kind of source it is and where, plus its family.

    ``family`` is the family's name. :func:`resolve` recognises it from local files at once; a Hub
    id's is looked up the first time it is asked for (the cached ``model_index.json``, else that one
    file from the Hub), and an :class:`~studio.core.errors.OfflineError` says so when that cannot be
    done offline. ``known_family`` is the name once known, ``None`` before.
    """

    ref: str
    kind: str  # "tiny" (an embedded model) | "diffusers" | "single_file" | "hub"
    location: str
    revision: str | None = None
    known_family: str | None = field(default=None, compare=False)

    @property
    def family(self) -> str:
        if self.known_family is None:
            # Memoised on the (frozen) instance: one lookup per resolved reference, never a guess.
            object.__setattr__(self, "known_family", _hub_family(self).name)
        return self.known_family

    def to_dict(self) -> dict:
        """The reference as JSON values; ``family`` is None for a Hub id whose family is not looked up yet."""
        return {"ref": self.ref, "kind": self.kind, "location": self.location, "revision": self.revision,
                "family": self.known_family}


def _supported_family(arch_name: str, evidence: str, what: str) -> Family:
    """The family that runs architecture ``arch_name``, or one line naming the architecture."""
    family = next((f for f in FAMILIES.values() if architecture_of(f).name == arch_name), None)
    if family is None:
        runs = ", ".join(f.display_name for f in FAMILIES.values())
        raise InvalidRequestError(f"{what} is a model of the {architectures.display_name(arch_name)} family "
                                  f"({evidence}): the studio does not run that family yet (it runs {runs})")
    return family


def _index_family(index: Path, what: str) -> Family:
    """The family of the pipeline whose ``model_index.json`` is ``index`` (its ``_class_name``)."""
    try:
        class_name = json.loads(index.read_text())["_class_name"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptWeightsError(f"{index} is not a valid diffusers model_index.json ({e})") from None
    if not isinstance(class_name, str):
        raise CorruptWeightsError(f"{index} is not a valid diffusers model_index.json (_class_name {class_name!r})")
    try:
        return family_for_pipeline_class(class_name)
    except InvalidRequestError:
        arch = architectures.recognise_pipeline_class(class_name)
        if arch is None:
            raise
        return _supported_family(arch.name, f"model_index.json names {class_name}", what)


def _diffusers_family(folder: Path) -> Family:
    return _index_family(folder / MODEL_INDEX, str(folder))


def _single_file_family(path: Path) -> Family:
    """The family of a single-file checkpoint, from its tensor names (only the header is read)."""
    header = check_safetensors(path)
    arch_name, evidence = architectures.recognise_single_file(header.tensors)
    if arch_name is None:
        expected = "; ".join(f"{a.display_name}: {' or '.join(p + '*' for p in a.single_file_prefixes)}"
                             for a in architectures.ARCHITECTURES.values() if a.single_file_prefixes)
        raise InvalidRequestError(
            f"{path} is not a base-model checkpoint the studio recognises: none of its {len(header.tensors)} "
            f"tensor names is a known model's (expected, e.g. {expected}); an adapter (LoRA) file is imported "
            f"with 'lora-studio adapters import', not used as a base model"
        )
    return _supported_family(arch_name, evidence, str(path))


def _hub_family(resolved: BaseModelRef) -> Family:
    """A Hub id's family from its ``model_index.json``: the Hub cache's copy, else that one file downloaded."""
    # Imported here, not at the top: resolve() and the CLI's start-up never need huggingface_hub.
    from huggingface_hub import _CACHED_NO_EXIST, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    repo_id, revision, what = resolved.location, resolved.revision, f"the Hub model {resolved.ref!r}"
    not_a_pipeline = BaseModelNotFoundError(
        f"{what} has no {MODEL_INDEX}, so it is not a diffusers pipeline: pass a diffusers model's id, or a "
        f"local folder or .safetensors checkpoint")
    try:
        cached = try_to_load_from_cache(repo_id, MODEL_INDEX, revision=revision)
    except HFValidationError as e:  # the Hub's own rules are stricter than the shape resolve() checks
        raise InvalidRequestError(f"{what} is not a valid Hub id: {e}") from None
    if isinstance(cached, str):
        return _index_family(Path(cached), what)
    if cached is _CACHED_NO_EXIST:
        raise not_a_pipeline
    if get_settings().offline:
        raise OfflineError(
            f"the family of {what} cannot be known offline (HF_HUB_OFFLINE=1): its {MODEL_INDEX} is not in the "
            f"Hub cache. Download it on a connected machine (huggingface-cli download {repo_id}) and pass the "
            f"local folder: --base /path/to/folder"
        )
    try:
        index = hf_hub_download(repo_id, MODEL_INDEX, revision=revision)
    except LocalEntryNotFoundError as e:  # the Hub could not be reached
        raise BaseModelNotFoundError(f"could not reach the Hub to read {what}'s {MODEL_INDEX} ({e})") from None
    except EntryNotFoundError:
        raise not_a_pipeline from None
    except OSError as e:  # huggingface_hub's not-found and HTTP errors are OSErrors
        raise BaseModelNotFoundError(
            f"could not read {what} from the Hub ({type(e).__name__}: {e}); check the id and revision, or pass a "
            f"local folder"
        ) from None
    return _index_family(Path(index), what)


def _check_folder_weights(folder: Path) -> None:
    """Refuse folders whose weights are pickles only; check every safetensors header."""
    for component in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = [p for p in component.iterdir() if p.is_file()]
        safetensors = [p for p in files if p.suffix == ".safetensors"]
        pickles = [p for p in files if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles and not safetensors:
            raise UnsafeWeightsError(
                f"{component} has only pickle weights ({pickles[0].name}); the studio loads safetensors only. "
                f"Re-save the model with save_pretrained(..., safe_serialization=True)."
            )
        for f in safetensors:
            check_safetensors(f)


def resolve(ref: str | None = None) -> BaseModelRef:
    """Turn what a user typed into a :class:`BaseModelRef`, without loading any weights.

    Local references are recognised here (a folder's ``model_index.json``, a single file's safetensors
    header: cheap reads); a Hub id touches neither the network nor the cache until its family is asked for.
    """
    ref = (ref or get_settings().default_base_model).strip()
    if not ref:
        raise InvalidRequestError("empty base-model reference: use 'tiny', a local folder or file, or a Hub id")
    if ref in EMBEDDED_MODELS:
        folder = EMBEDDED_MODELS[ref]
        if not (folder / MODEL_INDEX).exists():
            raise BaseModelNotFoundError(f"{folder} has no {MODEL_INDEX}: rebuild it with: "
                                         f"python -m studio.app.tiny.build --model {ref}")
        return BaseModelRef(ref=ref, kind="tiny", location=str(folder), known_family=_diffusers_family(folder).name)
    path = Path(ref).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir():
            if not (path / MODEL_INDEX).exists():
                raise BaseModelNotFoundError(
                    f"{path} is a folder but not a diffusers pipeline (no {MODEL_INDEX}): pass the folder "
                    f"that pipe.save_pretrained() wrote, or a single .safetensors checkpoint"
                )
            return BaseModelRef(ref=ref, kind="diffusers", location=str(path),
                                known_family=_diffusers_family(path).name)
        refuse_pickle(path)
        if path.suffix.lower() != ".safetensors":
            raise InvalidRequestError(
                f"{path} is not a .safetensors checkpoint or a diffusers folder: pass one of those"
            )
        return BaseModelRef(ref=ref, kind="single_file", location=str(path),
                            known_family=_single_file_family(path).name)
    refuse_pickle(path)
    if _HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        repo_id, _, revision = ref.partition("@")
        return BaseModelRef(ref=ref, kind="hub", location=repo_id, revision=revision or None)
    raise BaseModelNotFoundError(
        f"base model {ref!r} not found: use 'tiny', a local diffusers folder, a .safetensors checkpoint, "
        f"or a Hub id like owner/name"
    )


class _PipelineCache:
    """A small LRU of loaded pipelines, keyed by reference; loading is serialised by a lock."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, load):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            pipe = load()
            self._items[key] = pipe
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return pipe

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_CACHE = _PipelineCache(PIPELINE_CACHE_SIZE)


# What a request may ask the weights to run in: "auto" is the device's choice (below).
PRECISIONS = ("auto", "float32", "float16", "bfloat16")


def device_and_dtype(precision: str = "auto"):
    """(device, torch dtype) a pipeline runs in. ``auto``: CPU in float32 (float16 on a CPU is slow
    and lossy); a GPU in bfloat16 where it supports it (float32's range, so nothing overflows), else
    float16. SDXL's original VAE overflows in float16: its config says ``force_upcast`` and diffusers'
    SDXL pipelines then decode (and encode) in float32, see :func:`pipeline_dtypes`."""
    import torch

    if precision not in PRECISIONS:
        raise InvalidRequestError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if precision == "auto":
        if device == "cpu":
            precision = "float32"
        else:
            precision = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return device, getattr(torch, precision)


def pipeline_dtypes(pipe) -> dict[str, str]:
    """Each weighted component's dtype as it runs (``{"unet": "bfloat16", ...}``), for the recipe.

    A float16 VAE whose config asks for ``force_upcast`` (SDXL's original) is run in float32 by the
    SDXL pipelines, and recorded so: ``"float32 (upcast from float16)"``.
    """
    import torch

    out = {}
    for name, component in sorted(pipe.components.items()):
        if not isinstance(component, torch.nn.Module):
            continue
        dtype = str(component.dtype).removeprefix("torch.")
        if (name == "vae" and dtype == "float16" and getattr(component.config, "force_upcast", False)
                and hasattr(pipe, "upcast_vae")):
            dtype = "float32 (upcast from float16)"
        out[name] = dtype
    return out


def _load(resolved: BaseModelRef, precision: str = "auto"):
    import torch  # imported here to keep CLI start-up light

    if resolved.kind == "hub" and get_settings().offline:
        raise OfflineError(
            f"{resolved.ref!r} is a Hugging Face Hub id and the studio is offline (HF_HUB_OFFLINE=1). "
            f"Download it on a connected machine (huggingface-cli download {resolved.location}) and pass the "
            f"local folder: --base /path/to/folder"
        )
    family = get_family(resolved.family)
    cls = family.pipeline_class("text2img")
    device, dtype = device_and_dtype(precision)
    common = dict(dtype=dtype, **family.pipeline_options)
    if resolved.kind in ("tiny", "diffusers"):
        folder = Path(resolved.location)
        if not (folder / MODEL_INDEX).exists():
            hint = (f"rebuild it with: python -m studio.app.tiny.build --model {resolved.ref}"
                    if resolved.kind == "tiny" else "check the folder")
            raise BaseModelNotFoundError(f"{folder} has no {MODEL_INDEX}: {hint}")
        _check_folder_weights(folder)
        shared = _shared_components(folder)
        try:
            pipe = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True, **shared, **common)
        except (OSError, ValueError) as e:
            raise CorruptWeightsError(f"{folder} is not a complete {family.display_name} pipeline: {e}") from None
    elif resolved.kind == "single_file":
        path = Path(resolved.location)
        check_safetensors(path)
        from diffusers.loaders.single_file_utils import SingleFileComponentError

        layout = layout_of(family)
        # Single files hold no tokenizer: the layout names a folder with the family's own (no download).
        tokenizers = _layout_tokenizers(layout, tokenizer_options(path, layout))
        # Files the studio exported carry their own component configs (any shape of the family, the
        # tiny model's included); other files are read with the layout's reference configs.
        with single_file_config_dir(path, layout) as config_dir:
            try:
                built = {part.component: _open_clip_component(path, part, config_dir, dtype)
                         for part in layout.components if part.converter == "open_clip_text"}
                pipe = cls.from_single_file(
                    str(path), config=str(config_dir), local_files_only=True, **tokenizers, **built, **common,
                )
            except (KeyError, ValueError, RuntimeError, SingleFileComponentError) as e:
                raise CorruptWeightsError(
                    f"{path} is not a {family.display_name} checkpoint the studio can read ({type(e).__name__}: {e})"
                ) from None
    else:
        if get_settings().offline:
            raise OfflineError(
                f"{resolved.ref!r} is a Hugging Face Hub id and the studio is offline (HF_HUB_OFFLINE=1). "
                f"Download it on a connected machine (huggingface-cli download {resolved.location}) and pass the "
                f"local folder: --base /path/to/folder"
            )
        try:
            pipe = cls.from_pretrained(resolved.location, revision=resolved.revision, use_safetensors=True, **common)
        except OSError as e:  # huggingface_hub's not-found and network errors are OSErrors
            raise BaseModelNotFoundError(
                f"could not load {resolved.ref!r} from the Hub ({type(e).__name__}: {e}); check the id and revision, "
                f"or pass a local folder"
            ) from None
    if resolved.kind in ("tiny", "diffusers"):
        _apply_native_resolution(pipe, Path(resolved.location))
    pipe.set_progress_bar_config(disable=True)
    if device == "cuda" and wants_offload(get_settings().offload, _weight_bytes(pipe), torch.cuda.mem_get_info()[1]):
        # Each component moves to the GPU when the pipeline calls it and back after: FLUX.1's T5 (9.5 GB)
        # and transformer (23.8 GB) then never sit on a 24 GB card together. Slower, but it runs.
        pipe.enable_model_cpu_offload()
        return pipe
    return pipe.to(device)


# The share of the GPU a pipeline's weights may take before "auto" offloads idle components: the rest
# is for activations, attention and the VAE's decode at 1024 px (a few GB on a real model).
OFFLOAD_FRACTION = 0.75


def wants_offload(mode: str, weight_bytes: int, device_bytes: int) -> bool:
    """Whether a pipeline of ``weight_bytes`` should run with model CPU offload on a GPU of ``device_bytes``
    (``mode``: ``model`` always, ``none`` never, ``auto`` when the weights exceed :data:`OFFLOAD_FRACTION`)."""
    if mode == "model":
        return True
    return mode == "auto" and weight_bytes > OFFLOAD_FRACTION * device_bytes


def _weight_bytes(pipe) -> int:
    import torch

    return sum(p.numel() * p.element_size() for c in pipe.components.values() if isinstance(c, torch.nn.Module)
               for p in c.parameters())


def _apply_native_resolution(pipe, folder: Path) -> None:
    """A model whose ``lora_studio.json`` names its ``native_resolution`` gets it as the pipeline's default
    size (FluxPipeline's class default is 128 x 8 = 1024 px, the real model's)."""
    side = model_native_resolution(folder)
    if side is not None and hasattr(pipe, "default_sample_size"):
        if side % pipe.vae_scale_factor:
            raise CorruptWeightsError(f"{folder}/{RECOMMENDED_SETTINGS_FILE}: native_resolution {side} is not a "
                                      f"multiple of the VAE factor {pipe.vae_scale_factor}")
        pipe.default_sample_size = side // pipe.vae_scale_factor


def _shared_components(folder: Path) -> dict:
    """The components a model folder reads from an embedded model instead of shipping a copy.

    ``lora_studio.json``'s ``shared_components`` maps a component to a folder of the embedded models
    (``tiny-sdxl``'s tokenizers are ``tiny/tokenizer``: SD's vocabulary, 1.5 MB a copy), so the model
    loads wherever it is copied to. Only tokenizers are shared, and only from the embedded models.
    """
    import transformers  # only loading needs it

    if not (folder / RECOMMENDED_SETTINGS_FILE).is_file():
        return {}
    try:
        record = json.loads((folder / RECOMMENDED_SETTINGS_FILE).read_text())
        index = json.loads((folder / MODEL_INDEX).read_text())
        shared = dict(record.get("shared_components") or {})
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise CorruptWeightsError(f"{folder}: cannot read {RECOMMENDED_SETTINGS_FILE}/{MODEL_INDEX} ({e})") from None
    out = {}
    for name, relative in shared.items():
        source = (EMBEDDED_DIR / str(relative)).resolve()
        library, class_name = index.get(name, (None, None))
        if (library != "transformers" or not str(class_name).endswith("Tokenizer")
                or not source.is_relative_to(EMBEDDED_DIR) or not source.is_dir()):
            raise CorruptWeightsError(f"{folder}: shared component {name} -> {relative} is not a tokenizer folder "
                                      f"of the embedded models; rebuild the model")
        out[name] = getattr(transformers, class_name).from_pretrained(source)
    return out


def _open_clip_component(path: Path, part, config_dir: Path, dtype):
    """A text encoder stored in OpenCLIP's layout (SDXL's second one), built from the file with
    diffusers' own conversion and loaded strictly.

    diffusers picks a text encoder's conversion by which encoder's position embedding has the model's
    width: when both encoders are equally wide (the embedded tiny-sdxl) it would load the first one's
    weights into the second and leave its projection unset, silently. Building it here names the
    prefix, and a missing or extra tensor is an error.
    """
    import transformers
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors import safe_open

    cls = getattr(transformers, part.class_name)
    model = cls(cls.config_class.from_json_file(Path(config_dir) / part.component / "config.json"))
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(part.prefix)}
    state_dict = convert_open_clip_checkpoint(model, tensors, prefix=part.prefix)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # a buffer transformers builds itself
    if missing or unexpected:
        raise CorruptWeightsError(f"{path}: the {part.component} under {part.prefix} does not match its config "
                                  f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. "
                                  f"{unexpected[:2]}): the file is damaged or of another model")
    return model.to(dtype).eval()


def _layout_tokenizers(layout: SingleFileLayout, options: dict[str, dict[str, str]]) -> dict:
    """The tokenizers a single file of ``layout`` needs, by component, as its ``model_index.json``
    classes them, with ``options`` (special tokens) set per tokenizer."""
    import transformers  # only loading a single file needs it

    index = json.loads((Path(layout.config_dir) / MODEL_INDEX).read_text())
    out = {}
    for name, folder in layout.tokenizers.items():
        library, class_name = index[name]
        if library != "transformers":
            raise ValueError(f"{layout.config_dir}/{MODEL_INDEX}: tokenizer {name} is from {library!r}")
        out[name] = getattr(transformers, class_name).from_pretrained(folder, **options.get(name, {}))
    return out


def load_pipeline(ref: str | None = None, precision: str = "auto"):
    """The text-to-image pipeline for ``ref`` in ``precision`` (see :func:`device_and_dtype`), loaded
    once and then served from the cache."""
    resolved = resolve(ref)
    device_and_dtype(precision)  # checked before the cache is asked
    key = f"{resolved.kind}:{resolved.location}@{resolved.revision or ''}#{precision}"
    return _CACHE.get(key, lambda: _load(resolved, precision))


def load_fresh_pipeline(ref: str | None = None, precision: str = "auto"):
    """A private, uncached copy of the pipeline for ``ref`` (training, adapter experiments, tests).

    The embedded tiny model is stored in float16 to stay small; plain ``from_pretrained(folder)``
    without ``dtype`` would keep some modules in float16 and fail on CPU with a dtype mismatch.
    This loads it (and every other model) the studio's way: ``precision`` as :func:`device_and_dtype` says.
    """
    return _load(resolve(ref), precision)


def clear_pipeline_cache() -> None:
    _CACHE.clear()


RECOMMENDED_SETTINGS_FILE = "lora_studio.json"


def model_record(folder: str | Path) -> dict:
    """A model folder's ``lora_studio.json`` (sampling defaults, shared components, native size) as a
    dict; ``{}`` when the folder has none or it is not a JSON object (its readers then use defaults)."""
    try:
        record = json.loads((Path(folder) / RECOMMENDED_SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def model_native_resolution(folder: str | Path) -> int | None:
    """The side a model's record names as its native resolution (a transformer's config has no
    ``sample_size`` to tell it); None when it names none."""
    side = model_record(folder).get("native_resolution")
    return side if isinstance(side, int) and not isinstance(side, bool) and side > 0 else None


def recommended_settings(resolved: BaseModelRef) -> dict:
    """Sampling defaults the model's maker measured to work best (``lora_studio.json`` in its folder).

    The embedded tiny models ship one (their shapes are sharpest at a low CFG); other models fall back to
    their family's defaults. Unknown keys are ignored, so the file can grow.
    """
    settings = {"guidance_scale": get_family(resolved.family).default_guidance_scale}
    if resolved.kind in ("tiny", "diffusers"):
        data = model_record(resolved.location).get("recommended")
        data = data if isinstance(data, dict) else {}
        if isinstance(data.get("guidance_scale"), (int, float)):
            settings["guidance_scale"] = float(data["guidance_scale"])
        if data.get("true_cfg") is True:  # a flow model sampled with true CFG (families.flux)
            settings["true_cfg"] = True
    return settings


def native_resolution(pipe) -> int:
    """The side the pipeline's denoiser was trained at: ``sample_size * vae_scale_factor`` for a UNet;
    a transformer pipeline's ``default_sample_size`` (which the loader sets from the model's
    ``lora_studio.json`` where the pipeline class's default is not the model's)."""
    denoiser = getattr(pipe, family_of_pipeline(pipe).denoiser)
    sample_size = getattr(denoiser.config, "sample_size", None) or pipe.default_sample_size
    return int(sample_size * pipe.vae_scale_factor)


def denoiser_config(ref: str | None):
    """The denoiser's config (an attribute namespace) of a base model held in a local folder, read from
    its ``config.json`` alone (no weights); None when the base is not a local folder or is gone."""
    import types

    try:
        resolved = resolve(ref)
    except StudioError:
        return None
    if resolved.kind not in ("tiny", "diffusers"):
        return None
    family = get_family(resolved.family)
    try:
        config = json.loads((Path(resolved.location) / family.denoiser / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return types.SimpleNamespace(**config) if isinstance(config, dict) else None


def model_hash(resolved: BaseModelRef) -> str:
    """A short hash (10 hex, A1111's "Model hash" length) identifying the base weights.

    Single files hash the whole file (Civitai's AutoV2); folders hash the denoiser's weights file.
    Hub ids that are not downloaded have no local bytes to hash and return "".
    """
    if resolved.kind == "hub":
        return ""
    return component_sha256(resolved, get_family(resolved.family).denoiser)[:10]


def component_sha256(resolved: BaseModelRef, component: str) -> str:
    """Full sha256 of one component's weights (``vae``, ``text_encoder``...), for cache keys.

    Training caches (VAE latents, text embeddings) depend only on that component, so a fine-tune
    that changes the UNet alone keeps them valid. A single file holds every component in one file
    and is hashed whole; Hub ids without local bytes give "".
    """
    if resolved.kind == "single_file":
        target = Path(resolved.location)
    elif resolved.kind in ("tiny", "diffusers"):
        candidates = sorted((Path(resolved.location) / component).glob("*.safetensors"))
        if not candidates:
            return ""
        target = candidates[0]
    else:
        return ""
    return _cached_file_sha256(str(target), target.stat().st_mtime_ns)


_HASHES: dict[tuple[str, int], str] = {}


def _cached_file_sha256(path: str, mtime_ns: int) -> str:
    """A base model's sha256, hashed once per (path, modification time): a multi-GB file is read once
    however many cache keys and listings ask for it."""
    key = (path, mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


@dataclass(frozen=True)
class BaseModelInfo:
    """One row of ``lora-studio base-models list``."""

    ref: str
    kind: str
    family: str
    location: str
    description: str


def list_base_models() -> list[BaseModelInfo]:
    """The embedded models plus every diffusers folder / .safetensors file in ``$LORA_STUDIO_HOME/models``.

    Families are recognised as :func:`resolve` recognises them; a model the studio cannot run (an
    unsupported family, an unrecognised file) is listed with family ``?`` and the reason, not hidden.
    """
    rows = []
    for name in EMBEDDED_MODELS:
        embedded = resolve(name)
        family = get_family(embedded.family)
        rows.append(BaseModelInfo(ref=name, kind="tiny", family=family.name, location=embedded.location,
                                  description=f"embedded tiny {family.display_name} model (32 px scenes), "
                                              f"works offline"))
    models_dir = get_settings().home / "models"
    if models_dir.is_dir():
        for entry in sorted(models_dir.iterdir()):
            if entry.is_dir() and (entry / MODEL_INDEX).exists():
                kind, recognise, description = "diffusers", _diffusers_family, "diffusers folder"
            elif entry.is_file() and entry.suffix.lower() == ".safetensors":
                kind, recognise, description = "single_file", _single_file_family, "single-file checkpoint"
            else:
                continue
            try:
                family = recognise(entry).name
            except (StudioError, OSError) as e:  # a model the studio cannot run is listed with its reason
                rows.append(BaseModelInfo(str(entry), kind, "?", str(entry), f"unsupported: {e}"))
                continue
            rows.append(BaseModelInfo(str(entry), kind, family, str(entry), description))
    return rows


def check_base_model(ref: str, *, what: str = "base model") -> str:
    """``ref`` (stripped) if the UI may use it as a base model: ``tiny``, a Hugging Face Hub id
    (``owner/name[@revision]``: not a path, so not a file on this machine), or a path that
    :func:`check_data_path` accepts. A name that is both a Hub id and an existing relative path is
    judged as the path, as :func:`resolve` would load it."""
    # The same rule resolve() applies to tell a Hub id from a path.
    text = (ref or "").strip()
    hub_id = bool(_HUB_ID.match(text)) and not text.startswith((".", "/", "~"))
    if text in EMBEDDED_MODELS or (hub_id and not Path(text).expanduser().exists()):
        return text
    check_data_path(text, what=what)
    return text


def reference_architecture(family: Family | str, *, every_component: bool = False):
    """The family's full-size reference model (SDXL 1.0 base, SD-1.5, FLUX.1-dev), its LoRA components
    built on the ``meta`` device from the configs the studio ships: every module at its real shape, no
    weights and no memory, offline. :func:`adapters.formats.validate_against` reads it as it reads a
    pipeline, so a real-size adapter's names and shapes are checked without downloading the model.
    ``every_component``: every model component with a shipped config (text encoders without LoRA and
    the VAE too), for memory estimates.
    """
    import types

    import diffusers
    import torch
    import transformers

    family = get_family(family) if isinstance(family, str) else family
    folder = family.reference_config_dir
    if folder is None:
        raise InvalidRequestError(f"the studio has no full-size reference configs for {family.display_name}")
    index = json.loads((folder / MODEL_INDEX).read_text())
    wanted = [c for c in index if (folder / c / "config.json").is_file()] if every_component \
        else list(family.lora_components)
    parts = {}
    with torch.device("meta"):
        for component in wanted:
            library, class_name = index[component]
            if library == "diffusers":
                cls = getattr(diffusers, class_name)
                parts[component] = cls.from_config(cls.load_config(folder / component))
            else:
                cls = getattr(transformers, class_name)
                parts[component] = cls(cls.config_class.from_json_file(folder / component / "config.json"))
    return types.SimpleNamespace(**parts)


def export_single_file(pipeline_or_ref, path: str | Path, *, dtype: str | None = None) -> Path:
    """Write a pipeline, or any base-model reference (``tiny``, a diffusers folder, a single file...)
    loaded fresh, as one safetensors file in its family's original layout
    (:func:`studio.core.single_file.write_single_file`). The target and dtype are checked before
    anything loads."""
    check_export_target(path, dtype)
    pipe = load_fresh_pipeline(str(pipeline_or_ref)) if isinstance(pipeline_or_ref, (str, Path)) else pipeline_or_ref
    return write_single_file(pipe, path, dtype=dtype)
