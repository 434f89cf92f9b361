"""Apply a stack of adapters, each with its own strength, to a cached base pipeline, fast and exactly.

A stack is a list of :class:`AdapterSpec` (reference + weight, optional per-component weights and
per-block UNet weights in diffusers' dict form). :class:`AdapterEngine` owns the adapter state of ONE
pipeline and applies stacks to it under this policy:

- Each adapter file is read from disk once and kept loaded, in a bounded LRU; adapters evicted from
  it are deleted from the pipeline, because inactive adapters still slow ``set_adapters`` down.
- Changing the weights of loaded adapters never touches disk: only ``set_adapters``.
- A stack used for two requests in a row is fused into the base weights (no per-step LoRA cost).
  Unfusing subtracts in floating point and drifts by ~2e-6, so the engine snapshots the exact base
  weights of every layer it fuses into and copies them back on unfuse: after any sequence of stacks,
  an empty or all-zero stack gives the base output bit for bit. The copy alone IS the unfuse (peft's
  ``unmerge`` would recompute every delta only for the copy to overwrite it): ~1 ms instead of ~20.
- A new set of strengths for the same adapters in the same order only rescales: ``set_scale`` on the
  engine's cached list of adapter layers, the very call ``set_adapters`` ends in, without its walk
  over every module and its ``requires_grad`` toggling (~2 ms instead of ~10 for 3 adapters).
  Per-block weights take ``set_adapters``, which expands them per layer.
- Nothing partially applied survives an error: references, weights and files are checked before the
  pipeline is touched, and a failed load removes what it added and restores the previous stack.

The engine does not lock: callers hold ``studio.generation.run.pipeline_lock(pipe)`` around
apply-then-generate (Streamlit shares one pipeline object between sessions).
Adapter references resolve through :func:`resolve_adapter`: a ``.safetensors`` path, or a registry
reference (``name``, ``name@3``, ``name@prod``, ``sha256:<prefix>``).
"""

from __future__ import annotations

import functools
import math
import os
import re
import reprlib
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from adapters.formats import detect, read_adapter, to_diffusers
from adapters.registry import Registry
from studio.core.errors import IncompatibleAdapterError, InvalidRequestError, UnsafeWeightsError
from studio.core.families import FAMILIES, Family, architectures, family_of_pipeline
from studio.core.filesafety import PICKLE_SUFFIXES
from studio.core.hashing import tensor_sha256
from studio.core.settings import get_settings

MAX_ABS_WEIGHT = 4.0
DEFAULT_CACHE_SIZE = 8
_BLOCK_KEYS = {"down", "mid", "up"}


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of a stack: what to load, how strongly, and (once it ran) the exact file it was.

    ``weight`` scales every component. ``denoiser`` and ``text_encoders`` override it per role
    (ComfyUI's strength_model / strength_clip): the denoiser is the family's UNet or transformer, the
    text encoders are all of the family's text encoders. ``blocks`` gives per-block denoiser weights in
    diffusers' form, e.g. ``{"down": 0.9, "mid": 1.0, "up": {"block_0": 0.6}}`` (it replaces ``denoiser``).

    ``name``, ``version`` and ``tensor_sha256`` pin what ``ref`` resolved to when an image was made
    (``version`` is None for an adapter used from a file): generation fills them in, the recipe records
    them, and a re-run refuses an adapter whose tensors changed since.

    A stack is parsed into specs once, where it enters the studio (the CLI's flags, the UI's widgets, a
    recipe's JSON through :meth:`from_dict`), and carried as specs; :meth:`to_dict` writes a recipe's entry.
    """

    ref: str
    weight: float = 1.0
    denoiser: float | None = None
    text_encoders: float | None = None
    blocks: dict | None = None
    name: str | None = None
    version: int | None = None
    tensor_sha256: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.ref, str):
            raise InvalidRequestError(f"an adapter reference must be text (a name, name@version or a file path), "
                                      f"got {reprlib.repr(self.ref)}")
        if not self.ref.strip():
            raise InvalidRequestError("an adapter reference is empty: give a name, name@version or a file path")
        _check_weight(self.weight, f"weight of {self.ref}")
        for label, value in (("denoiser weight", self.denoiser), ("text-encoder weight", self.text_encoders)):
            if value is not None:
                _check_weight(value, f"{label} of {self.ref}")
        if self.blocks is not None:
            _check_blocks(self.blocks, self.ref)
        for key, ok, what in (
            ("name", self.name is None or isinstance(self.name, str), "text"),
            ("version", self.version is None or (isinstance(self.version, int) and not isinstance(self.version, bool)),
             "a whole number (none for an adapter used from a file)"),
            ("tensor_sha256", self.tensor_sha256 is None or (isinstance(self.tensor_sha256, str)
                                                             and re.fullmatch(r"[0-9a-f]{64}", self.tensor_sha256)),
             "64 lowercase hex digits"),
        ):
            if not ok:
                raise InvalidRequestError(f"adapter entry for {self.ref}: {key} must be {what}, got "
                                          f"{reprlib.repr(getattr(self, key))}")

    @property
    def denoiser_weight(self) -> float | dict:
        """What the denoiser gets: the per-block weights when given, else its strength."""
        if self.blocks is not None:
            return self.blocks
        return self.weight if self.denoiser is None else self.denoiser

    @property
    def text_encoder_weight(self) -> float:
        """What each of the family's text encoders gets."""
        return self.weight if self.text_encoders is None else self.text_encoders

    def is_zero(self) -> bool:
        return _all_zero(self.denoiser_weight) and self.text_encoder_weight == 0

    @staticmethod
    def strength_keys(family: Family | None = None) -> tuple[str, str]:
        """The keys a recipe entry holds the denoiser's and the text encoders' strengths under.

        For a family, the pipeline component names, as diffusers' ``set_adapters(adapter_weights=...)``
        keys them: the denoiser's (SD-1: ``unet``), and the text encoder's when the family has one
        (SD-1: ``text_encoder``) -- what SD-1 recipes have always held. A family with several text encoders,
        or no family, uses the role names ``text_encoders`` (and ``denoiser``), one strength for all of them.
        """
        if family is None:
            return "denoiser", "text_encoders"
        encoders = family.text_encoder_components
        return family.denoiser, encoders[0] if len(encoders) == 1 else "text_encoders"

    @classmethod
    def _strength_spellings(cls) -> dict[str, str]:
        """Every key a recipe entry may hold a per-role strength under -> the field it fills."""
        keys = [cls.strength_keys(None)] + [cls.strength_keys(family) for family in FAMILIES.values()]
        return {key: role for pair in keys for key, role in zip(pair, ("denoiser", "text_encoders"), strict=True)}

    def to_dict(self, family: Family | None = None) -> dict:
        """The entry as a recipe stores it: the per-role strengths under :meth:`strength_keys` of the base
        model's ``family``, fields left at None left out, except that a pinned entry always says its version
        (null: a file)."""
        data = asdict(self)  # a deep copy: the caller may change the blocks it gets
        denoiser_key, text_encoders_key = self.strength_keys(family)
        out = {"ref": data["ref"], "weight": data["weight"]}
        for key, value in ((denoiser_key, data["denoiser"]), (text_encoders_key, data["text_encoders"]),
                           ("blocks", data["blocks"]), ("name", data["name"])):
            if value is not None:
                out[key] = value
        if self.tensor_sha256 is not None or self.version is not None:
            out["version"] = self.version
        if self.tensor_sha256 is not None:
            out["tensor_sha256"] = self.tensor_sha256
        return out

    @classmethod
    def from_dict(cls, data: dict) -> AdapterSpec:
        """An entry as a recipe stores it (see :meth:`to_dict`). The strengths may be spelled as any
        family writes them (``unet`` for SD-1's denoiser) or by their role; a null means the default."""
        if not isinstance(data, dict) or data.get("ref") is None:
            raise InvalidRequestError(f"adapter entry {reprlib.repr(data)} needs at least a 'ref'")
        spellings = cls._strength_spellings()
        unknown = set(data) - {f.name for f in fields(cls)} - set(spellings)
        if unknown:
            raise InvalidRequestError(f"adapter entry has unknown fields {reprlib.repr(sorted(unknown, key=str))}")
        values: dict = {}
        for key, value in data.items():
            name = spellings.get(key, key)
            if name in values:
                both = ", ".join(k for k in data if spellings.get(k) == name)
                raise InvalidRequestError(f"adapter entry for {reprlib.repr(data['ref'])} gives its {name} strength "
                                          f"twice ({both}): keep one")
            if value is not None:
                values[name] = value
        return cls(**values)


def _check_weight(value, label: str) -> None:
    # An int is finite however large; math.isfinite would raise OverflowError for one no float holds (10**400).
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not math.isfinite(value))):
        raise InvalidRequestError(f"{label} must be a number, got {reprlib.repr(value)}")
    if abs(value) > MAX_ABS_WEIGHT:
        raise InvalidRequestError(
            f"{label} is {reprlib.repr(value)}: weights must lie in [-{MAX_ABS_WEIGHT:g}, {MAX_ABS_WEIGHT:g}]"
        )


def _check_blocks(blocks, ref: str) -> None:
    if not isinstance(blocks, dict) or not blocks:
        raise InvalidRequestError(f"per-block weights of {ref} must be a non-empty dict like {{'down': 0.9}}")
    unknown = set(blocks) - _BLOCK_KEYS
    if unknown:
        parts = reprlib.repr(sorted(unknown, key=str))
        raise InvalidRequestError(f"per-block weights of {ref} have unknown parts {parts}: use down, mid, up")
    for part, value in blocks.items():
        if isinstance(value, dict):
            for block, w in value.items():
                if not re.fullmatch(r"block_\d+", str(block)):
                    raise InvalidRequestError(f"per-block weights of {ref}: {part}.{block} is not 'block_N'")
                if isinstance(w, list):
                    for x in w:
                        _check_weight(x, f"{part}.{block} weight of {ref}")
                else:
                    _check_weight(w, f"{part}.{block} weight of {ref}")
        else:
            _check_weight(value, f"{part} weight of {ref}")


def _all_zero(weight) -> bool:
    if isinstance(weight, dict):
        return all(_all_zero(v) for v in weight.values())
    if isinstance(weight, list):
        return all(_all_zero(v) for v in weight)
    return weight == 0


def parse_adapter_arg(text: str) -> AdapterSpec:
    """``REF[:WEIGHT]`` as typed on the command line (``name@3:0.8``, ``sha256:0123abcd:0.5``)."""
    text = text.strip()
    ref, sep, tail = text.rpartition(":")
    if sep and ref:
        try:
            weight = float(tail)
        except ValueError:
            return AdapterSpec(ref=text)
        return AdapterSpec(ref=ref, weight=weight)
    return AdapterSpec(ref=text)


@dataclass(frozen=True)
class ResolvedAdapter:
    """Where an adapter's weights are and what identifies them (for recipes and A1111 hashes)."""

    ref: str  # the exact reference that finds these weights again (name@N, or the file path)
    name: str
    version: int | None
    path: Path
    tensor_sha256: str
    adapter_type: str = "lora"
    family: str | None = None  # None: a file whose keys do not say (SD-1 and SD-2 share module names)

    @property
    def key(self) -> str:
        return self.tensor_sha256


def resolve_adapter(ref: str, registry=None) -> ResolvedAdapter:
    """A file path or a registry reference -> :class:`ResolvedAdapter` (no weights are loaded)."""
    path = Path(ref).expanduser()
    looks_like_path = ref.endswith(".safetensors") or "/" in ref or path.suffix.lower() in (".ckpt", ".pt", ".bin")
    if looks_like_path:
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise UnsafeWeightsError(f"{path} is a pickle file: the studio loads adapters from .safetensors only")
        if not path.is_file():
            raise InvalidRequestError(f"adapter file {path} does not exist")
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)[:64] or "adapter"
        st = path.stat()
        digest, family = _file_identity(str(path.resolve()), st.st_size, st.st_mtime_ns)
        return ResolvedAdapter(ref=str(path.resolve()), name=stem, version=None, path=path.resolve(),
                               tensor_sha256=digest, family=family)
    if registry is None:
        registry = Registry()
    version = registry.get(ref)  # AdapterNotFoundError names close names when nothing matches
    return ResolvedAdapter(ref=version.ref, name=version.name, version=version.number, path=version.path,
                           tensor_sha256=version.tensor_sha256, adapter_type=version.adapter_type,
                           family=version.family)


@functools.lru_cache(maxsize=256)
def _file_identity(path: str, size: int, mtime_ns: int) -> tuple[str, str | None]:
    """(tensor sha256, family or None) of an adapter file, computed once per (path, size, mtime).

    Hashing reads the whole file; a stack used request after request would otherwise re-read every
    file each time, just to find the adapters already loaded. A rewritten file has a new mtime.
    """
    # A file has no registry record: its keys tell the family when no other architecture shares its
    # module tree (SDXL, SD3, Flux); SD-1 and SD-2 differ in widths only a base can check (header only).
    arch = detect(path).architecture
    return tensor_sha256(Path(path)), arch if architectures.own_tree(arch) else None


def check_family(resolved: list[ResolvedAdapter], family: str, base: str = "the base model") -> None:
    """Refuse adapters made for another base-model family than ``family`` (before any is loaded).

    An SDXL LoRA on an SD-1 pipeline would fail deep inside diffusers with a shape error, or worse,
    half-load; this names the adapter, its family and what to do instead.
    """
    for r in resolved:
        if r.family is not None and r.family != family:
            raise IncompatibleAdapterError(
                f"adapter {r.ref} was made for the {r.family} family and {base} is {family}: remove it from the "
                f"stack, or pick a base model of the {r.family} family", r.family)


@dataclass
class _Loaded:
    adapter_name: str  # the name inside the pipeline
    resolved: ResolvedAdapter
    components: tuple[str, ...]


@dataclass
class EngineStats:
    """Counters a benchmark or test reads: disk loads, fuses, unfuses, evictions."""

    loads: int = 0
    fuses: int = 0
    unfuses: int = 0
    evictions: int = 0
    set_adapters_calls: int = 0
    rescales: int = 0  # strength changes done by set_scale alone (same adapters, same order)
    history: list = field(default_factory=list)


class AdapterEngine:
    """The adapter state of one pipeline; see the module docstring for the policy."""

    def __init__(self, pipe, *, cache_size: int = DEFAULT_CACHE_SIZE, fuse: bool = True) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self.pipe = pipe
        self.family: Family = family_of_pipeline(pipe)  # which components carry adapters, denoiser first
        self.cache_size = cache_size
        self.fuse_enabled = fuse
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()  # tensor hash -> loaded adapter
        self._active: tuple = ()  # signature of the stack now set on the pipeline
        self._previous: tuple | None = None  # signature of the stack of the previous request
        self._fused: tuple | None = None  # signature of the stack now fused into the base weights
        self._snapshot: dict = {}  # (component, module name) -> exact base weight tensors, taken before fusing
        self._fused_layers: list = []  # (snapshot key, peft layer) of every layer the fused stack is merged into
        self._layers: list | None = None  # (component, module name, peft layer) of every adapter layer; None: stale
        self._set_names: tuple | None = None  # adapter names (in order) of the last set_adapters; None: unknown
        self._enabled: bool | None = None  # whether the adapter layers are enabled; None: unknown (call enable)
        self.stats = EngineStats()

    # -- public ---------------------------------------------------------------------------------

    def apply(self, stack: list[AdapterSpec], resolved: list[ResolvedAdapter]) -> None:
        """Make ``stack`` the pipeline's active adapters (``resolved`` is ``resolve_adapter`` of each)."""
        if len(stack) != len(resolved):
            raise ValueError("apply() needs one resolved adapter per stack entry")
        keys = [r.key for r in resolved]
        if len(set(keys)) != len(keys):
            dup = next(r for r in resolved if keys.count(r.key) > 1)
            raise InvalidRequestError(f"{dup.name} appears twice in the stack: combine its weights into one entry")
        signature = tuple((r.key, repr(s.denoiser_weight) if isinstance(s.denoiser_weight, dict) else s.denoiser_weight,
                           s.text_encoder_weight) for s, r in zip(stack, resolved))
        live = [(s, r) for s, r in zip(stack, resolved) if not s.is_zero()]
        if signature == self._fused:
            self._previous = signature
            return
        if self._fused is not None:
            self._unfuse()
        self._load_missing([r for _, r in live])
        self._set(live)
        self._active = signature
        repeated = signature == self._previous
        self._previous = signature
        if repeated and live and self.fuse_enabled and self._can_fuse(live):
            self._fuse(live, signature)

    def clear(self) -> None:
        """Deactivate every adapter (base output); loaded adapters stay cached."""
        self.apply([], [])

    def unload_all(self) -> None:
        """Unfuse, restore the exact base weights and remove every adapter (and its layers) from the pipeline."""
        if self._fused is not None:
            self._unfuse()
        if self._loaded:
            # Removes the adapters and peft's wrapper layers: the modules are plain again.
            self.pipe.unload_lora_weights()
        self._loaded.clear()
        self._active = ()
        self._previous = None
        self._forget_layers()

    @property
    def loaded_names(self) -> list[str]:
        return [entry.resolved.name for entry in self._loaded.values()]

    @property
    def is_fused(self) -> bool:
        return self._fused is not None

    # -- internals ------------------------------------------------------------------------------

    def _forget_layers(self) -> None:
        """Adapters were added or removed: the cached layer list and the set_adapters state are stale."""
        self._layers = None
        self._set_names = None
        self._enabled = None

    def _adapter_layers(self) -> list:
        if self._layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer  # peft loads with the first adapter, not at import

            self._layers = [(component, qual, module) for component in self.family.lora_components
                            if getattr(self.pipe, component, None) is not None
                            for qual, module in getattr(self.pipe, component).named_modules()
                            if isinstance(module, BaseTunerLayer)]
        return self._layers

    def _load_missing(self, resolved: list[ResolvedAdapter]) -> None:
        needed = {r.key for r in resolved}
        for r in resolved:
            if r.key in self._loaded:
                self._loaded.move_to_end(r.key)
                continue
            self._evict(keep=needed, room_for=1)
            adapter_name = f"{re.sub(r'[^A-Za-z0-9_]', '_', r.name)[:40]}_{r.key[:12]}"
            before = self._adapter_components()
            self._forget_layers()
            try:
                load_adapter_into(self.pipe, r, adapter_name)
            except Exception:
                # Remove whatever the failed load registered, so the pipeline is as it was.
                if adapter_name in self._adapter_components() and adapter_name not in before:
                    self.pipe.delete_adapters([adapter_name])
                self._restore_active_after_error()
                raise
            components = tuple(c for c, names in self._adapter_components_by_module().items() if adapter_name in names)
            self._loaded[r.key] = _Loaded(adapter_name=adapter_name, resolved=r, components=components)
            self.stats.loads += 1

    def _evict(self, keep: set[str], room_for: int) -> None:
        while len(self._loaded) + room_for > self.cache_size:
            victim = next((k for k in self._loaded if k not in keep), None)
            if victim is None:
                return  # the stack itself is larger than the cache: keep everything it needs
            entry = self._loaded.pop(victim)
            self._forget_layers()
            self.pipe.delete_adapters([entry.adapter_name])
            self.stats.evictions += 1

    def _set(self, live: list[tuple[AdapterSpec, ResolvedAdapter]]) -> None:
        if not live:
            if self._loaded and self._enabled is not False:
                self.pipe.disable_lora()
                self._enabled = False
            return
        if self._enabled is not True:
            self.pipe.enable_lora()  # walks every module: only when something disabled the layers
            self._enabled = True
        names = tuple(self._loaded[r.key].adapter_name for _, r in live)
        if names == self._set_names and not any(isinstance(s.denoiser_weight, dict) for s, _ in live):
            self._rescale(live)
            return
        self.stats.set_adapters_calls += 1
        names, weights = [], []
        for spec, r in live:
            entry = self._loaded[r.key]
            names.append(entry.adapter_name)
            weights.append({component: self._weight(spec, component) for component in self.family.lora_components
                            if component in entry.components})
        self.pipe.set_adapters(names, adapter_weights=weights)
        # Adapters loaded but not in the stack are inactive after set_adapters; nothing else to do.
        self._set_names = tuple(names)

    def _rescale(self, live: list[tuple[AdapterSpec, ResolvedAdapter]]) -> None:
        """New strengths for the adapters already active, in the same order: what ``set_adapters`` does
        per layer (``set_scale(adapter_name, weight)``), minus re-activating the same adapters."""
        per_component = {component: [(self._loaded[r.key].adapter_name, self._weight(s, component)) for s, r in live]
                         for component in self.family.lora_components}
        for component, _, module in self._adapter_layers():
            for adapter_name, weight in per_component[component]:
                module.set_scale(adapter_name, weight)  # a no-op for adapters the layer does not hold
        self.stats.rescales += 1

    def _weight(self, spec: AdapterSpec, component: str):
        """``spec``'s weight for ``component``: the denoiser's (a number or per-block dict), or the one
        every text encoder takes (ComfyUI's strength_model / strength_clip)."""
        return spec.denoiser_weight if self.family.is_denoiser(component) else spec.text_encoder_weight

    def _restore_active_after_error(self) -> None:
        self._active = ()
        self._previous = None
        if self._loaded:
            self.pipe.disable_lora()
            self._enabled = False

    def _can_fuse(self, live) -> bool:
        """peft cannot merge a lora_B bias into a layer that has no bias (an imported LyCORIS full update
        gives its whole component ``lora_bias``, bias-free layers included): such stacks run unfused."""
        names = {self._loaded[r.key].adapter_name for _, r in live}
        for _, _, module in self._adapter_layers():
            for name in _layer_adapter_names(module) & names:
                if (getattr(module, "lora_bias", {}).get(name)
                        and getattr(module.get_base_layer(), "bias", None) is None):
                    return False
        return True

    def _fuse(self, live, signature) -> None:
        import torch  # torch loads when weights are touched, not at import

        ordered = [self._loaded[r.key].adapter_name for _, r in live]
        names = set(ordered)
        self._fused_layers = []
        with torch.no_grad():
            for component, qual, module in self._adapter_layers():
                if not _layer_adapter_names(module) & names:
                    continue
                key = (component, qual)
                if key not in self._snapshot:
                    base = module.get_base_layer()
                    self._snapshot[key] = {n: p.detach().clone() for n, p in base.named_parameters(recurse=False)}
                self._fused_layers.append((key, module))
        components = sorted({c for _, r in live for c in self._loaded[r.key].components})
        try:
            # In stack order: DoRA's merge normalises the weight as merged so far, so order matters there.
            self.pipe.fuse_lora(components=components, adapter_names=ordered)
        except BaseException:
            self._fused = signature  # whatever got merged is undone from the snapshot
            self._unfuse()
            raise
        self._fused = signature
        self.stats.fuses += 1

    def _unfuse(self) -> None:
        """Put back the exact base weights of every fused layer and mark it unmerged.

        This replaces peft's ``unmerge``, which recomputes each adapter's delta and subtracts it (drifting
        by ~2e-6) only for the exact copy to overwrite the result anyway.
        """
        import torch  # torch loads when weights are touched, not at import

        with torch.no_grad():
            for key, module in self._fused_layers:
                params = self._snapshot[key]
                for n, p in module.get_base_layer().named_parameters(recurse=False):
                    p.copy_(params[n])
                caches = getattr(module, "_caches", None)
                for adapter_name in module.merged_adapters:
                    if caches is not None:  # DoRA's weight norm, stored by merge for unmerge
                        caches.pop(f"{adapter_name}-weight_norm", None)
                module.merged_adapters = []
        self.pipe._merged_adapters = set()  # diffusers' record of fused adapter names, as unfuse_lora leaves it
        self._fused_layers = []
        self._fused = None
        self.stats.unfuses += 1

    def _adapter_components_by_module(self) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for component, names in (self.pipe.get_list_adapters() or {}).items():
            found[component] = set(names)
        return found

    def _adapter_components(self) -> set[str]:
        return set().union(set(), *self._adapter_components_by_module().values())


def _layer_adapter_names(module) -> set[str]:
    names = set()
    for attr in ("lora_A", "hada_w1_a", "lokr_w1", "lokr_w1_a"):
        sub = getattr(module, attr, None)
        if sub is not None and hasattr(sub, "keys"):
            names.update(sub.keys())
    return names


def load_adapter_into(pipe, resolved: ResolvedAdapter, adapter_name: str) -> None:
    """Load one adapter file into ``pipe`` under ``adapter_name``, whatever its method.

    The method is read from the file itself (its keys and ``lora_adapter_metadata``), not trusted from
    the registry: LoRA and DoRA load through ``pipe.load_lora_weights``; LoKr through the UNet's
    ``load_lora_adapter`` (a folder + ``weight_name``, since a bare file path drops the metadata);
    LoHa, which diffusers refuses, through peft's ``inject_adapter_in_model`` +
    ``set_peft_model_state_dict`` per component (LoKr text-encoder parts too). Either way the adapter
    ends up as peft layers named ``adapter_name`` that ``set_adapters``/fuse/delete handle as any LoRA.
    """
    path = safetensors_named_path(resolved)
    info = detect(path)  # detect() validates the whole header byte by byte first
    if info.format != "diffusers" or info.alpha_source == "alpha tensors":
        path = canonical_copy(pipe, resolved, path, info)
        info = detect(path)
    if info.adapter_type in ("lora", "dora"):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name,
                               use_safetensors=True)
    else:
        _load_lycoris(pipe, path, info.adapter_type, adapter_name)
    # The proof that it applied: every module the file patches must now carry one of its layers.
    # A loader that skips keys it does not recognise (the "LoRA has no effect" reports) fails here.
    landed = landed_modules(pipe, adapter_name)
    if sum(landed.values()) != info.num_modules:
        where = ", ".join(f"{n} in {c}" for c, n in landed.items()) or "none"
        raise IncompatibleAdapterError(
            f"{resolved.name}: only {sum(landed.values())} of the {info.num_modules} modules it patches took its "
            f"layers when loaded ({where}); the rest would be silently ignored, so it is not applied. Re-import it "
            f"against this base model ('lora-studio adapters import') to see which keys do not fit")


def canonical_copy(pipe, resolved: ResolvedAdapter, path: Path, info) -> Path:
    """The canonical (peft, per-component config) copy of an adapter file the registry does not hold.

    kohya and original-name files, and peft files with per-module alpha tensors, are read by the
    studio's own converter (the one imports use: validated against ``pipe``, fused modules split by
    its sizes, alpha kept per module) rather than by diffusers' loaders, which drop keys they do not
    know. Written once per content and family under the cache, atomically.
    """
    family = family_of_pipeline(pipe)
    out = get_settings().home / "cache" / "adapters" / f"{resolved.tensor_sha256}-{family.name}-canonical.safetensors"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        to_diffusers(read_adapter(path, base_pipeline=pipe, family=family, base_name=None, info=info), out)
    return out


def landed_modules(pipe, adapter_name: str) -> dict[str, int]:
    """How many modules of each of ``pipe``'s LoRA components carry a layer of ``adapter_name``."""
    family = family_of_pipeline(pipe)
    counts = {}
    for component in family.lora_components:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        n = sum(1 for _, module in model.named_modules() if adapter_name in _layer_adapter_names(module))
        if n:
            counts[component] = n
    return counts


def safetensors_named_path(resolved: ResolvedAdapter) -> Path:
    """A path to the adapter's file whose name ends in ``.safetensors``.

    Registry blobs are named by their sha256 alone, and diffusers decides by the file name: a
    ``weight_name`` without the suffix sends it down its pickle (``torch.load``) path. A symlink
    ``<home>/cache/adapters/<sha256>.safetensors`` gives the blob the name diffusers needs, without
    copying it.
    """
    if resolved.path.suffix == ".safetensors":
        return resolved.path
    link_dir = get_settings().home / "cache" / "adapters"
    link_dir.mkdir(parents=True, exist_ok=True)
    link = link_dir / f"{resolved.tensor_sha256}-{resolved.path.name[:16]}.safetensors"
    if not (link.is_symlink() and link.resolve() == resolved.path.resolve()):
        tmp = link.with_name(f".tmp-{os.getpid()}-{link.name}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(resolved.path.resolve())
        os.replace(tmp, link)  # atomic: a concurrent reader sees the old link or the new one
    return link


def _peft_config(adapter_type: str, config: dict):
    """A ``LoHaConfig``/``LoKrConfig`` from a file's per-component config dict (unknown keys dropped)."""
    from peft import LoHaConfig, LoKrConfig  # peft loads with the first LoHa/LoKr, not at import

    cls = LoHaConfig if adapter_type == "loha" else LoKrConfig
    declared = str(config.get("peft_type", adapter_type)).upper()
    if declared != adapter_type.upper():
        raise InvalidRequestError(f"the adapter's keys are {adapter_type} but its metadata says {declared}")
    names = {f.name for f in fields(cls) if f.init} - {"peft_type"}
    return cls(**{k: v for k, v in config.items() if k in names})


def _inject(model, adapter_type: str, config: dict, state_dict: dict, adapter_name: str) -> None:
    """Add one LoHa/LoKr adapter to ``model`` with peft, keeping the adapters already there."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict  # see _peft_config

    prior = dict(getattr(model, "peft_config", None) or {})
    try:
        inject_adapter_in_model(_peft_config(adapter_type, config), model, adapter_name=adapter_name)
    finally:
        # inject_adapter_in_model replaces model.peft_config with the new adapter's alone; diffusers lists
        # (and sets, fuses, deletes) the adapters it finds there, so the earlier ones are put back.
        model.peft_config = {**prior, **(getattr(model, "peft_config", None) or {})}
    result = set_peft_model_state_dict(model, state_dict, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    missing = [k for k in getattr(result, "missing_keys", None) or [] if f".{adapter_name}" in k]
    if unexpected or missing:
        what = f"{len(unexpected)} tensors match no layer" if unexpected else f"{len(missing)} tensors are missing"
        raise InvalidRequestError(f"the adapter does not fit the model: {what} (e.g. {(unexpected or missing)[0]!r})")


def _load_lycoris(pipe, path: Path, adapter_type: str, adapter_name: str) -> None:
    family = family_of_pipeline(pipe)
    weights = read_adapter(path)  # canonical peft keys + one peft config per component
    by_component: dict[str, dict] = {}
    for key, tensor in weights.tensors.items():
        component, _, rest = key.partition(".")
        by_component.setdefault(component, {})[rest] = tensor
    unknown = [c for c in by_component if getattr(pipe, c, None) is None]
    if unknown:
        raise InvalidRequestError(f"{path.name} adapts {', '.join(unknown)}, which this pipeline does not have")
    for component, state_dict in by_component.items():
        model = getattr(pipe, component)
        if adapter_type == "lokr" and family.is_denoiser(component) and hasattr(model, "load_lora_adapter"):
            model.load_lora_adapter(str(path.parent), weight_name=path.name, prefix=component,
                                    adapter_name=adapter_name, use_safetensors=True)
        else:
            _inject(model, adapter_type, weights.configs[component], state_dict, adapter_name)


# ----------------------------------------------------------------------------------------------
# One engine per pipeline
# ----------------------------------------------------------------------------------------------

_ENGINES: dict[int, AdapterEngine] = {}


def has_engine(pipe) -> bool:
    engine = _ENGINES.get(id(pipe))
    return engine is not None and engine.pipe is pipe


def engine_for(pipe) -> AdapterEngine:
    """The engine that owns ``pipe``'s adapter state (created on first use)."""
    engine = _ENGINES.get(id(pipe))
    if engine is None or engine.pipe is not pipe:
        engine = AdapterEngine(pipe)
        _ENGINES[id(pipe)] = engine
    return engine
