"""Adapter file formats: detect a LoRA file's layout, check it against a base model, convert it.

Holds:

- :func:`detect` -> :class:`FormatInfo` - key layout (``diffusers`` or ``kohya``), adapter type
  (lora, dora, loha, lokr), rank, alpha and where alpha came from, target modules, components,
  trigger words, the architecture the keys look made for, and every metadata key. Reads the header
  and the ``.alpha`` scalars only.
- :func:`validate_against` - every key must name a module of the base pipeline with matching shapes;
  other architectures are refused by name.
- :func:`read_adapter` -> :class:`AdapterWeights` - the canonical in-memory form: peft keys
  (``unet.<module>.lora_A.weight``) plus one peft config per component.
- :func:`to_diffusers`, :func:`to_kohya`, :func:`build_metadata` - atomic writers of the two
  formats with kohya ``ss_*`` and Stability ModelSpec ``modelspec.*`` metadata in both.

Does not hold: the registry (``adapters/ingest.py`` connects files to it), loading adapters into
a pipeline for generation (``adapters/compose.py``), hashes (``studio/core/hashing.py``).

Key layouts, for the SD-1 module ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``::

    peft (canonical)   unet.down_blocks.0...attn1.to_q.lora_A.weight / .lora_B.weight
    diffusers, legacy  unet.down_blocks.0...attn1.to_q.lora.down.weight        (read only)
                       text_encoder.encoder...q_proj.lora_linear_layer.down.weight
    kohya              lora_unet_down_blocks_0_..._attn1_to_q.lora_down.weight / .lora_up / .alpha
                       lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight

kohya names replace every '.' of the module path by '_', and module names contain '_' themselves
(``down_blocks``, ``to_q``), so turning them back into modules needs the base model's module list:
detection without a model only guesses leaf names (``to_q``) for display.

The strength of a LoRA module is ``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA). peft files
carry alpha in the ``lora_adapter_metadata`` JSON, kohya files as ``.alpha`` scalars. A file with
neither is read the way every loader reads it (alpha = rank, scale 1) and :class:`FormatInfo`
says so in ``warnings``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from studio.core.atomic import write_atomic
from studio.core.errors import (
    CorruptWeightsError,
    IncompatibleAdapterError,
    InputFileNotFoundError,
    InvalidRequestError,
    UnsupportedAdapterError,
)
from studio.core.families import FAMILIES, Family, architectures, get_family, kohya_prefixes
from studio.core.families.base import OriginalModule
from studio.core.filesafety import (
    PICKLE_SUFFIXES,
    check_safetensors,
    json_nesting_within,
    quoted,
    refuse_json_constant,
)
from studio.core.jsonutil import jsonable
from studio.core.single_file import ldm_unet_module_names

FORMATS = ("diffusers", "kohya")
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
MODELSPEC_VERSION = "1.0.1"
METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}
MAX_SUGGESTED_TRIGGERS = 5  # A1111 lists every tag by count; five is what fits a prompt box
MAX_LISTED_KEYS = 20  # modules an error lists before saying how many more

LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
# canonical part -> the suffix it has in a peft key
PEFT_SUFFIX = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_B.bias": "lora_B.bias",
               # '.weight' on the magnitude: without it the text encoder's magnitudes are silently
               # re-initialised on load (FIELD-NOTES); the UNet loads either spelling.
               "lora_magnitude_vector": "lora_magnitude_vector.weight",
               **{p: p for p in LOHA_PARTS + LOKR_PARTS}}
_PEFT_PARTS = sorted([(".lora_magnitude_vector.weight", "lora_magnitude_vector"),
                      (".lora_magnitude_vector", "lora_magnitude_vector"),
                      (".lora_A.weight", "lora_A"), (".lora_B.weight", "lora_B"), (".lora_B.bias", "lora_B.bias"),
                      # an alpha scalar per module beside peft names (some Flux trainers and converters)
                      (".alpha", "alpha"),
                      *[(f".{p}", p) for p in LOHA_PARTS + LOKR_PARTS]], key=lambda x: -len(x[0]))
_LEGACY_PARTS = ((".lora_linear_layer.down.weight", "lora_A"), (".lora_linear_layer.up.weight", "lora_B"),
                 (".lora.down.weight", "lora_A"), (".lora.up.weight", "lora_B"))
# diffusers' attention-processor era: "...attn1.processor.to_q_lora.down.weight"
_LEGACY_PROCESSOR = re.compile(
    r"^(?P<m>.+?)(?:\.processor)?\.(?P<p>to_q|to_k|to_v|to_out)_lora\.(?P<d>down|up)\.weight$")
_LEGACY_UNET_LEAF = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_LEGACY_TE_LEAF = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_KOHYA_PARTS = {"lora_down.weight": "lora_A", "lora_up.weight": "lora_B", "alpha": "alpha", "dora_scale": "dora_scale",
                # LyCORIS: LoCon's CP-decomposed kernel, and full fine-tuning's weight and bias updates
                "lora_mid.weight": "lora_mid", "diff": "diff", "diff_b": "diff_b",
                **{p: p for p in LOHA_PARTS + LOKR_PARTS}}
# LyCORIS algorithms peft has no exact form for, by a key part only they write -> how users know them.
_UNREPRESENTABLE = {"oft_blocks": "OFT / BOFT (orthogonal finetuning, oft_blocks)",
                    "oft_diag": "OFT (oft_diag)", "a1.weight": "GLoRA (a1/a2/b1/b2)",
                    "on_input": "(IA)^3 (on_input)", "w_norm": "trained normalisation layers (w_norm/b_norm)",
                    "b_norm": "trained normalisation layers (w_norm/b_norm)"}

# Leaf module names, longest first, to show a kohya key's target without the base model.
_LEAVES = sorted(["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                  "time_emb_proj", "conv_shortcut", "conv1", "conv2", "conv_in", "conv_out", "conv", "q_proj",
                  "k_proj", "v_proj", "out_proj", "fc1", "fc2", "linear_1", "linear_2", "add_q_proj",
                  "add_k_proj", "add_v_proj", "to_add_out"], key=len, reverse=True)


# --------------------------------------------------------------------------------------------
# the file itself
# --------------------------------------------------------------------------------------------


def _resolve_path(path: str | Path) -> Path:
    """A file, or the folder ``save_lora_weights`` wrote (holding pytorch_lora_weights.safetensors)."""
    path = Path(path).expanduser()
    if path.is_dir():
        preferred = path / DIFFUSERS_WEIGHT_NAME
        if preferred.is_file():
            return preferred
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        what = f"{len(found)} .safetensors files" if found else "no .safetensors file"
        hint = f" (only pickles: {', '.join(pickles[:3])}; convert them first)" if pickles and not found else ""
        raise InputFileNotFoundError(f"{path} is a folder with {what}{hint}: pass the adapter file itself")
    if not path.exists():
        raise InputFileNotFoundError(f"{path} does not exist")
    return path


# --------------------------------------------------------------------------------------------
# keys
# --------------------------------------------------------------------------------------------


@dataclass
class _Module:
    """One adapted module as a file spells it: ``name`` is dotted (diffusers) or flat (kohya)."""

    component: str
    name: str
    style: str  # "peft" | "legacy" | "kohya"
    parts: dict[str, str] = field(default_factory=dict)  # canonical part -> the file's key


def _kohya_prefix_table(family: Family | None = None) -> list[tuple[str, str]]:
    """(kohya key prefix, component) of every family and known architecture, longest prefix first.

    With ``family`` its own prefixes win: ``lora_unet_`` is a UNet in general but FLUX's transformer in a
    Flux file, and ``lora_te3_`` is FLUX's T5 (``text_encoder_2``), not SD3's third encoder.
    Asked for once per parse rather than kept at import: families register after this module loads.
    Longest first, so that a prefix that begins another can never claim the other's keys.
    """
    table = {**kohya_prefixes(), **(family.kohya_prefix_map() if family is not None else {})}
    return sorted(table.items(), key=lambda item: -len(item[0]))


# Tensor suffixes of a module spelt in its original dotted names (ComfyUI writes either naming).
_ORIGINAL_PARTS = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_down.weight": "lora_A",
                   "lora_up.weight": "lora_B", "alpha": "alpha"}


def _split_key(key: str, prefixes: list[tuple[str, str]]) -> tuple[str, str, str, str] | None:
    """(style, component, module name, canonical part) of one key, or None when not an adapter key.

    ``prefixes`` is :func:`_kohya_prefix_table`. Styles: ``kohya`` (flat names after a prefix),
    ``original`` (a denoiser's original dotted names after ``diffusion_model.``, returned flat, as kohya
    spells them: both resolve through the base model's module list), ``legacy`` and ``peft``.
    """
    for prefix, component in prefixes:
        if key.startswith(prefix) and "." in key:
            flat, _, suffix = key.partition(".")
            part = _KOHYA_PARTS.get(suffix)
            if part is not None and len(flat) > len(prefix):
                return "kohya", component, flat[len(prefix):], part
            return None
    for prefix, component in architectures.ORIGINAL_PREFIXES.items():
        if key.startswith(prefix):
            for suffix, part in _ORIGINAL_PARTS.items():
                if key.endswith("." + suffix) and len(key) > len(prefix) + len(suffix) + 1:
                    return "original", component, key[len(prefix): -len(suffix) - 1].replace(".", "_"), part
            return None
    component, dot, rest = key.partition(".")
    if not dot or component not in architectures.COMPONENTS:
        return None
    for suffix, part in _LEGACY_PARTS:
        if rest.endswith(suffix):
            return "legacy", component, rest[: -len(suffix)], part
    m = _LEGACY_PROCESSOR.match(rest)
    if m:
        leaves = _LEGACY_UNET_LEAF if component in architectures.DENOISERS else _LEGACY_TE_LEAF
        return "legacy", component, f"{m['m']}.{leaves[m['p']]}", "lora_A" if m["d"] == "down" else "lora_B"
    for suffix, part in _PEFT_PARTS:
        if rest.endswith(suffix) and len(rest) > len(suffix):
            return "peft", component, rest[: -len(suffix)], part
    return None


def _unrepresentable(path_text: str, keys: list[str]) -> UnsupportedAdapterError | None:
    """The refusal for a LyCORIS algorithm the studio cannot hold in peft form, naming it; else None."""
    for key in keys:
        for part, algorithm in _UNREPRESENTABLE.items():
            if key.endswith("." + part):
                return UnsupportedAdapterError(
                    f"{path_text} is a LyCORIS {algorithm} adapter ({key!r}); peft, which the studio loads adapters "
                    f"with, has no exact equivalent, so it cannot be applied here. A1111 (its built-in Lora "
                    f"extension) and ComfyUI load it")
    return None


def _not_an_adapter(path_text: str, keys: list[str]) -> UnsupportedAdapterError:
    sample = ", ".join(repr(k) for k in keys[:3])
    named = _unrepresentable(path_text, keys)
    if named is not None:
        return named
    if not keys:
        return UnsupportedAdapterError(f"{path_text} holds no tensors: it is not an adapter")
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
           for k in keys):
        return UnsupportedAdapterError(f"{path_text} is a full model checkpoint (keys like {sample}), not an adapter: "
                                       f"use it as a base model (--base {path_text})")
    if any(k in ("emb_params", "clip_l", "clip_g", "string_to_param.*") or k.startswith("string_to_param")
           for k in keys):
        return UnsupportedAdapterError(f"{path_text} is a textual-inversion embedding (keys like {sample}), "
                                       f"not a LoRA adapter")
    return UnsupportedAdapterError(
        f"{path_text} has no LoRA keys the studio understands (keys like {sample}); it reads diffusers/peft keys "
        f"(unet.<module>.lora_A.weight) and kohya keys (lora_unet_<module>.lora_down.weight)")


def _parse(keys: list[str], path_text: str,
           family: Family | None = None) -> tuple[str, str, dict[tuple[str, str], _Module]]:
    """Group keys into modules; return (format, adapter type, modules). Raises on anything unknown.

    ``family`` (when known) decides what family-specific kohya prefixes name (:func:`_kohya_prefix_table`).
    The format is ``kohya`` for flat and original names alike: both need the base model's module list.
    """
    modules: dict[tuple[str, str], _Module] = {}
    unknown, styles = [], Counter()
    prefixes = _kohya_prefix_table(family)
    for key in keys:
        split = _split_key(key, prefixes)
        if split is None:
            unknown.append(key)
            continue
        style, component, name, part = split
        styles[style] += 1
        module = modules.setdefault((component, name), _Module(component, name, style))
        if part in module.parts:
            raise UnsupportedAdapterError(f"{path_text}: {key!r} and {module.parts[part]!r} are the same tensor of "
                                          f"module {name!r}; the file mixes two spellings of one adapter")
        module.parts[part] = key
    if not modules:
        raise _not_an_adapter(path_text, keys)
    if unknown:
        named = _unrepresentable(path_text, unknown)
        if named is not None:
            raise named
        raise UnsupportedAdapterError(
            f"{path_text} has {len(unknown)} key(s) that are not adapter tensors the studio understands, e.g. "
            f"{', '.join(repr(k) for k in unknown[:3])}; refusing rather than silently dropping them")
    if (styles["kohya"] or styles["original"]) and (styles["peft"] or styles["legacy"]):
        raise UnsupportedAdapterError(f"{path_text} mixes kohya keys (lora_unet_..., or original names: "
                                      f"diffusion_model....) and diffusers keys (unet...., transformer....): "
                                      f"re-export it from the tool that made it in one format")
    fmt = "kohya" if styles["kohya"] or styles["original"] else "diffusers"
    kinds = set()
    for m in modules.values():
        p = set(m.parts)
        if p & set(LOHA_PARTS):
            kinds.add("loha")
        elif p & set(LOKR_PARTS):
            kinds.add("lokr")
        elif p & {"lora_magnitude_vector", "dora_scale"}:
            kinds.add("dora")
        else:
            kinds.add("lora")
    if ("loha" in kinds or "lokr" in kinds) and any("dora_scale" in m.parts for m in modules.values()):
        raise UnsupportedAdapterError(
            f"{path_text} is a LyCORIS {'LoHa' if 'loha' in kinds else 'LoKr'} with weight decomposition (dora_scale "
            f"keys); peft has no DoRA form of these methods, so it cannot be applied here exactly. A1111 and ComfyUI "
            f"load it")
    if "loha" in kinds or "lokr" in kinds:
        if len(kinds) > 1:
            raise UnsupportedAdapterError(f"{path_text} mixes adapter methods ({', '.join(sorted(kinds))}) in one "
                                          f"file; the studio stores one method per adapter")
        adapter_type = kinds.pop()
    else:
        adapter_type = "dora" if "dora" in kinds else "lora"  # DoRA files may leave some modules without magnitude
    return fmt, adapter_type, modules


def _check_complete(m: _Module, adapter_type: str, shapes: Mapping[str, tuple], path_text: str) -> int | None:
    """Check a module has every tensor its method needs with agreeing ranks; return its rank."""
    def shape(part):
        return tuple(shapes[m.parts[part]])

    def missing(*parts):
        return CorruptWeightsError(f"{path_text}: module {m.name!r} ({m.component}) lacks {' and '.join(parts)}: "
                                   f"the file is incomplete; export it again")

    def flat(part):
        return CorruptWeightsError(f"{path_text}: module {m.name!r}: {part} has shape {list(shape(part))}, not a "
                                   f"matrix; the file is damaged")

    p = m.parts
    if adapter_type in ("lora", "dora") and "diff" in p:  # LyCORIS full: a LoRA of the update's full rank
        d = shape("diff")
        if len(d) < 2:
            raise flat("diff")
        return min(d[0], math.prod(d[1:]))
    if adapter_type in ("lora", "dora"):
        if "lora_A" not in p or "lora_B" not in p:
            raise missing(*[x for x in ("lora_A", "lora_B") if x not in p])
        a, b = shape("lora_A"), shape("lora_B")
        if len(a) < 2 or len(b) < 2 or a[0] != b[1]:
            raise CorruptWeightsError(f"{path_text}: module {m.name!r}: lora_A {list(a)} and lora_B {list(b)} do not "
                                      f"share a rank (lora_A rows must equal lora_B columns); the file is damaged")
        return a[0]
    if adapter_type == "loha":
        need = [x for x in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if x not in p]
        if need:
            raise missing(*need)
        for part in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            if len(shape(part)) != 2:
                raise flat(part)
        return shape("hada_w1_b")[0]
    for w in ("lokr_w1", "lokr_w2"):
        if w not in p and not (f"{w}_a" in p and f"{w}_b" in p):
            raise missing(w)
    for part in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"):
        if part in p and len(shape(part)) < 2:
            raise flat(part)
    for w in ("lokr_w2", "lokr_w1"):
        if f"{w}_a" in p:
            return shape(f"{w}_a")[1]
    return None  # both factors full matrices: the rank lives in the config only


def _leaf(name: str, flat: bool) -> str:
    for leaf in _LEAVES:
        spelled = leaf.replace(".", "_") if flat else leaf
        if name == spelled or name.endswith(("_" if flat else ".") + spelled):
            return leaf
    return name.rsplit("_" if flat else ".", 1)[-1]


def _pattern_value(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern lookup: the first key that matches the end of ``name``."""
    for key in pattern or {}:
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return pattern[key]
        except re.error:
            if name == key or name.endswith("." + key):
                return pattern[key]
    return default


# Metadata values that hold JSON (peft configs, kohya tag counts) nest a few levels at most.
METADATA_JSON_DEPTH = 8


def _metadata_json(raw: str):
    """A metadata value parsed as JSON, or None when it is not JSON or nests deeper than
    :data:`METADATA_JSON_DEPTH` (Python's parser would raise RecursionError on deep nesting)."""
    if not json_nesting_within(raw, METADATA_JSON_DEPTH):
        return None
    try:
        return json.loads(raw, parse_constant=refuse_json_constant)
    except ValueError:
        return None


def _number_option(value, *, whole: bool) -> bool:
    """A rank (``whole``) or alpha: a number in (0, 2**31); no layer is that wide, and the bound keeps
    ``float(value)`` from overflowing on a 400-digit integer."""
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
        return False
    return 0 < value < 2**31  # NaN fails both comparisons


# The peft config options the studio reads, and what each must hold (diffusers fails later on others).
_CONFIG_OPTIONS = {
    "r": ("a whole number > 0", lambda v: _number_option(v, whole=True)),
    "lora_alpha": ("a number > 0", lambda v: _number_option(v, whole=False)),
    "alpha": ("a number > 0", lambda v: _number_option(v, whole=False)),
    "rank_pattern": ("an object of module -> whole number > 0",
                     lambda v: isinstance(v, dict) and all(_number_option(x, whole=True) for x in v.values())),
    "alpha_pattern": ("an object of module -> number > 0",
                      lambda v: isinstance(v, dict) and all(_number_option(x, whole=False) for x in v.values())),
}


def _split_adapter_metadata(metadata: Mapping[str, str], warnings: list[str],
                            path_text: str = "the adapter") -> dict[str, dict]:
    """``lora_adapter_metadata`` -> {component: peft config dict} (diffusers packs them as "unet.r")."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    packed = _metadata_json(raw)
    if packed is None:
        warnings.append(f"metadata {ADAPTER_METADATA_KEY!r} is not JSON and was ignored")
        return {}
    if not isinstance(packed, dict):
        warnings.append(f"metadata {ADAPTER_METADATA_KEY!r} is not a JSON object and was ignored")
        return {}
    configs: dict[str, dict] = {}
    loose = []
    for key, value in packed.items():
        component, dot, option = key.partition(".")
        if dot and component in architectures.COMPONENTS:
            if option in _CONFIG_OPTIONS and value is not None and not _CONFIG_OPTIONS[option][1](value):
                raise CorruptWeightsError(
                    f"{path_text}: metadata {ADAPTER_METADATA_KEY!r} has {key} = {quoted(value, 40)}, which must be "
                    f"{_CONFIG_OPTIONS[option][0]}: the file's peft config is damaged; export it again")
            configs.setdefault(component, {})[option] = value
        else:
            loose.append(key)
    if loose:
        warnings.append(f"metadata {ADAPTER_METADATA_KEY!r} has options without a component prefix "
                        f"({', '.join(loose[:3])}); diffusers ignores those, and so does the studio")
    return configs


# --------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------


@dataclass
class FormatInfo:
    """What :func:`detect` learned from a file's header, ``.alpha`` scalars and metadata."""

    path: str
    format: str  # "diffusers" | "kohya"
    key_style: str  # "peft" | "legacy" (old diffusers keys) | "kohya"
    adapter_type: str  # lora | dora | loha | lokr
    rank: int | None  # the most common rank; rank_pattern lists modules that differ
    alpha: float | None  # the most common alpha; strength = alpha / rank
    alpha_source: str  # "metadata" | "alpha tensors" | "default (alpha = rank)"
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    target_modules: list[str]  # leaf names: to_q, to_out.0, q_proj...
    components: list[str]
    num_modules: int
    num_tensors: int
    dtypes: list[str]
    architecture: str | None  # sd1, sd2, sdxl, sd3, flux, dit, or None when the keys do not tell
    architecture_evidence: str
    trigger_words: list[str]
    trigger_words_source: str | None  # "modelspec.trigger_phrase" | "ssmd_keywords" | "ss_tag_frequency"
    trigger_words_suggested: bool  # True: guessed from training tags (A1111-style), not declared
    metadata: dict[str, str]  # every metadata key, verbatim
    warnings: list[str]

    @property
    def title(self) -> str | None:
        return self.metadata.get("ss_output_name") or self.metadata.get("modelspec.title") or None

    @property
    def base_model_version(self) -> str | None:
        return self.metadata.get("ss_base_model_version")

    @property
    def architecture_name(self) -> str | None:
        return architectures.display_name(self.architecture)

    def to_dict(self) -> dict:
        return asdict(self)


def _split_words(text: str) -> list[str]:
    out, seen = [], set()
    for word in text.split(","):
        word = word.strip()
        if word and len(word) <= 256 and word.lower() not in seen:
            seen.add(word.lower())
            out.append(word)
    return out


def tag_frequency(metadata: Mapping[str, str]) -> dict[str, int]:
    """``ss_tag_frequency`` summed over dataset folders: tag -> count (empty when absent or damaged)."""
    folders = _metadata_json(metadata.get("ss_tag_frequency") or "{}")
    totals: Counter = Counter()
    if isinstance(folders, dict):
        for tags in folders.values():
            if isinstance(tags, dict):
                for tag, count in tags.items():
                    if (isinstance(tag, str) and tag.strip() and isinstance(count, (int, float))
                            and not isinstance(count, bool) and (isinstance(count, int) or math.isfinite(count))):
                        totals[tag.strip()] += int(count)
    return dict(totals)


def trigger_words(metadata: Mapping[str, str]) -> tuple[list[str], str | None, bool]:
    """(words, source key, suggested): declared ``modelspec.trigger_phrase``, else ``ssmd_keywords``,
    else the most frequent training tags from ``ss_tag_frequency``, marked as suggested (A1111 shows
    those tags as hints; nobody declared them as triggers)."""
    for key in ("modelspec.trigger_phrase", "ssmd_keywords"):
        words = _split_words(metadata.get(key) or "")
        if words:
            return words, key, False
    counts = tag_frequency(metadata)
    if counts:
        # most frequent first; ties keep the order the trainer wrote them in (sorted() is stable)
        ranked = sorted(counts, key=lambda t: -counts[t])
        words = _split_words(",".join(ranked[:MAX_SUGGESTED_TRIGGERS]))
        return words, "ss_tag_frequency", True
    return [], None, False


def guess_architecture(shapes: Mapping[str, tuple]) -> tuple[str | None, str]:
    """(architecture, evidence) from key names and shapes alone; (None, '') when they do not tell.

    The keys go to :func:`studio.core.families.architectures.recognise_lora` with, for each down/A
    matrix, its (component, module name, input width): the widths tell the SD generations apart.
    """
    prefixes = _kohya_prefix_table()
    modules = []
    for key, shape in shapes.items():
        split = _split_key(key, prefixes)
        if split and split[3] == "lora_A" and len(shape) >= 2:
            modules.append((split[1], split[2], shape[1]))
    return architectures.recognise_lora(shapes, modules)


def detect(path: str | Path) -> FormatInfo:
    """Detect the layout, method, rank, alpha, targets, triggers and architecture of an adapter file.

    Reads the header and the ``.alpha`` scalars only. Raises :class:`UnsafeWeightsError` for pickles,
    :class:`CorruptWeightsError` for damaged files, :class:`UnsupportedAdapterError` for files that are
    not adapters (or mix layouts/methods).
    """
    path = _resolve_path(path)
    header = check_safetensors(_resolve_path(path))
    shapes = {k: tuple(e.shape) for k, e in header.tensors.items()}
    arch, evidence = guess_architecture(shapes)
    # Keys made for a known family are read with its prefixes (a Flux file's lora_unet_ is its transformer).
    fmt, adapter_type, modules = _parse(list(shapes), str(path), FAMILIES.get(arch or ""))
    warnings: list[str] = []
    style = next(iter(modules.values())).style if fmt == "kohya" else (
        "legacy" if all(m.style == "legacy" for m in modules.values()) else "peft")
    ranks = {key: _check_complete(m, adapter_type, shapes, str(path)) for key, m in modules.items()}
    configs = _split_adapter_metadata(header.metadata, warnings, str(path)) if fmt == "diffusers" else {}
    alphas: dict[tuple[str, str], float | None] = {}
    values = _read_scalars(path, [m.parts["alpha"] for m in modules.values() if "alpha" in m.parts])
    if fmt == "kohya":
        for key, m in modules.items():
            alphas[key] = values.get(m.parts.get("alpha"))
        present = sum(v is not None for v in alphas.values())
        alpha_source = "alpha tensors" if present else "default (alpha = rank)"
        if present and present < len(alphas):
            warnings.append(f"{len(alphas) - present} of {len(alphas)} modules have no .alpha tensor: they run at "
                            f"alpha = rank (scale 1), as every kohya loader does")
        if not present:
            said = header.metadata.get("ss_network_alpha")
            warnings.append("no .alpha tensors: alpha defaults to the rank (scale 1), as kohya loaders assume"
                            + (f"; ss_network_alpha says {said}, but loaders read the tensors, not that key"
                               if said else ""))
    else:
        alpha_key = "alpha" if adapter_type in ("loha", "lokr") else "lora_alpha"
        for key, m in modules.items():
            config = configs.get(m.component)
            if config is not None and config.get(alpha_key) is not None:
                alphas[key] = float(_pattern_value(config.get("alpha_pattern") or {}, m.name, config[alpha_key]))
            else:
                alphas[key] = None
            if "alpha" in m.parts:  # a per-module alpha tensor beside peft names wins, as in kohya files
                alphas[key] = values[m.parts["alpha"]]
        without = sorted({m.component for key, m in modules.items() if alphas[key] is None})
        alpha_source = "metadata" if len(without) < len({m.component for m in modules.values()}) else \
            "default (alpha = rank)"
        if values:
            alpha_source = "alpha tensors"
        if without:
            # diffusers itself assumes alpha = rank only for files with no config at all; a file with a
            # config for some components fails to load in diffusers, and the canonical copy repairs that.
            warnings.append(f"no {ADAPTER_METADATA_KEY!r} config for {', '.join(without)}: alpha defaults to the rank "
                            f"(scale 1), the convention for files without one; if it was trained with another "
                            f"alpha, its strength will be off")
    # LoKr with full factors has no rank in its tensors: the config says it.
    for key, m in modules.items():
        if ranks[key] is None:
            config = configs.get(m.component) or {}
            r = _pattern_value(config.get("rank_pattern") or {}, m.name, config.get("r"))
            ranks[key] = int(r) if isinstance(r, (int, float)) and r >= 1 else None
        if alphas[key] is None and ranks[key] is not None:
            alphas[key] = float(ranks[key])
    rank, rank_pattern = _common({f"{m.component}.{m.name}": ranks[k] for k, m in modules.items()})
    alpha, alpha_pattern = _common({f"{m.component}.{m.name}": alphas[k] for k, m in modules.items()})
    words, source, suggested = trigger_words(header.metadata)
    if suggested:
        warnings.append(f"no declared trigger words; suggested from the training tags (ss_tag_frequency): "
                        f"{', '.join(words)}")
    flat = fmt == "kohya"
    return FormatInfo(
        path=str(path), format=fmt, key_style=style, adapter_type=adapter_type, rank=rank,
        alpha=alpha, alpha_source=alpha_source, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        target_modules=sorted({_leaf(m.name, flat) for m in modules.values()}),
        components=sorted({m.component for m in modules.values()}, key=architectures.COMPONENTS.index),
        num_modules=len(modules), num_tensors=len(shapes),
        dtypes=sorted({e.dtype for e in header.tensors.values()}), architecture=arch, architecture_evidence=evidence,
        trigger_words=words, trigger_words_source=source, trigger_words_suggested=suggested,
        metadata=dict(header.metadata), warnings=warnings,
    )


def _common(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(most common value, {name: value} for the names that differ from it)."""
    known = {k: v for k, v in values.items() if v is not None}
    if not known:
        return None, {}
    common = Counter(known.values()).most_common(1)[0][0]
    return common, {k: v for k, v in sorted(known.items()) if v != common}


def _read_scalars(path: Path, keys: list[str]) -> dict[str, float]:
    if not keys:
        return {}
    from safetensors import safe_open  # framework="pt" needs torch: loaded when a file is read, not at import

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for key in keys:
            t = f.get_tensor(key)
            if t.numel() != 1:
                raise CorruptWeightsError(f"{path}: {key!r} has {t.numel()} values; an .alpha is one number")
            value = float(t.float().item())
            if not (math.isfinite(value) and value > 0):
                raise CorruptWeightsError(f"{path}: {key!r} is {value}; an alpha must be a finite number > 0")
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# validation against a base model
# --------------------------------------------------------------------------------------------


def _clip_root(family: Family, component: str) -> bool:
    """Whether kohya spells ``component``'s modules from a ``text_model.`` root: the family's CLIP text
    encoders, as transformers 4 laid out ``CLIPTextModel`` (T5 encoders have no such root)."""
    return any(te.component == component and te.kind.startswith("clip") for te in family.text_encoders)


@dataclass(frozen=True)
class _Split:
    """A module of the file that is several modules of the base (or one, its rows in another order):
    ``targets`` are (module, rows) in the order the file stacks their outputs, rows taken from the base
    model's own modules; ``swap_halves``: the file's two output halves are the module's in reverse."""

    original: str
    targets: tuple[tuple[str, int], ...]
    swap_halves: bool = False

    @property
    def rows(self) -> int:
        return sum(rows for _, rows in self.targets)


class _ModuleIndex:
    """The base pipeline's modules per component, by dotted name and by kohya's flat spelling (the
    denoiser's original names too, where its family has them: see ``Family.original_modules``)."""

    def __init__(self, pipe, family: Family) -> None:
        import torch  # torch only once a pipeline is being checked: detection stays light

        self.components: dict[str, dict[str, Any]] = {}
        self.flat: dict[str, dict[str, str | _Split]] = {}
        # Every component the pipeline has: a key naming one the base lacks is then reported as such
        # ("the base has no text_encoder_2") rather than as a module name that does not match.
        for component in architectures.COMPONENTS:
            model = getattr(pipe, component, None)
            if not isinstance(model, torch.nn.Module):
                continue
            named = {n: m for n, m in model.named_modules() if n}
            self.components[component] = named
            flat = {}
            for n in named:
                flat[n.replace(".", "_")] = n
                if _clip_root(family, component) and not n.startswith("text_model."):
                    # kohya spells CLIP modules with transformers 4's 'text_model.' root; transformers 5
                    # flattened CLIPTextModel, so both spellings must find the same module.
                    flat["text_model_" + n.replace(".", "_")] = n
            if type(model).__name__ == "UNet2DConditionModel":
                # kohya's SDXL files often spell the UNet in its original (SGM/LDM) block names
                # (lora_unet_input_blocks_4_1_proj_in): both spellings find the same module.
                try:
                    ldm = ldm_unet_module_names(model.config, named)
                except InvalidRequestError:  # a UNet without an original layout has diffusers names only
                    ldm = {}
                for n, original in ldm.items():
                    flat.setdefault(original.replace(".", "_"), n)
            if family.is_denoiser(component) and family.original_modules is not None:
                for original, ours in family.original_modules(model.config).items():
                    target = _split(original, ours, named)
                    if target is not None:
                        flat.setdefault(original.replace(".", "_"), target)
            self.flat[component] = flat

    def resolve(self, m: _Module) -> str | _Split | None:
        named = self.components.get(m.component)
        if named is None:
            return None
        if m.style in ("kohya", "original"):
            return self.flat[m.component].get(m.name)
        for candidate in (m.name, m.name.removeprefix("text_model."), f"text_model.{m.name}"):
            if candidate in named:
                return candidate
        return None


def _split(original: str, ours: str | OriginalModule, named: Mapping[str, Any]) -> str | _Split | None:
    """What one original module name is in a model whose modules are ``named``: a module name, a
    :class:`_Split` sized by the model's own modules, or None when the model lacks one of them."""
    if isinstance(ours, str):
        return ours if ours in named else None
    shapes = [_weight_shape(named[t]) if t in named else None for t in ours.targets]
    if any(s is None for s in shapes):
        return None
    if len(ours.targets) == 1 and not ours.swap_halves:
        return ours.targets[0]
    return _Split(original, tuple((t, s[0]) for t, s in zip(ours.targets, shapes)), ours.swap_halves)


@dataclass(frozen=True)
class ValidationReport:
    """What :func:`validate_against` matched: (component, name as the file spells it) -> module name,
    or the modules a fused original module splits into."""

    resolved: dict[tuple[str, str], str | _Split]
    components: tuple[str, ...]

    @property
    def num_modules(self) -> int:
        """Modules of the base the adapter patches (a fused qkv counts as its three)."""
        return sum(len(t.targets) if isinstance(t, _Split) else 1 for t in self.resolved.values())


# Submodules adapter methods add inside a wrapped layer (peft's ModuleDicts): not modules of the base.
_ADAPTER_SUBMODULES = ("lora_", "hada_", "lokr_", "oft_", "boft_", "ia3_")


def coverage(pipe, family: Family | str, adapter: AdapterWeights) -> dict:
    """How much of the base ``adapter`` patches: ``{"modules": N, "of": M, "by_component": {component:
    [n, m]}}``, M counting the Linear and convolution layers of the family's LoRA components (what an
    adapter can patch). ``pipe`` may already carry adapter layers (a training run's): peft's wrapper
    counts as the layer it wraps and its own lora_A/lora_B layers not at all."""
    import torch

    family = _family_obj(family)
    patched: dict[str, set[str]] = {}
    for component, name in adapter.modules():
        patched.setdefault(component, set()).add(name)
    by_component = {}
    for component in family.lora_components:
        model = getattr(pipe, component, None)
        if not isinstance(model, torch.nn.Module):
            continue
        layers = {name.removesuffix(".base_layer") for name, module in model.named_modules()
                  if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d))
                  and not any(part.startswith(_ADAPTER_SUBMODULES) for part in name.split("."))}
        if layers:
            by_component[component] = [len(patched.get(component, set()) & layers), len(layers)]
    return {"modules": sum(n for n, _ in by_component.values()), "of": sum(m for _, m in by_component.values()),
            "by_component": by_component}


def coverage_text(applies_to: Mapping[str, Any]) -> str:
    """``coverage``'s record as the adapter page and the CLI say it."""
    parts = ", ".join(f"{c} {n} of {m}" for c, (n, m) in applies_to.get("by_component", {}).items() if n)
    return f"{applies_to['modules']} modules of {applies_to['of']} in the base" + (f" ({parts})" if parts else "")


def _family_obj(family: Family | str) -> Family:
    return family if isinstance(family, Family) else get_family(family)


def _weight_shape(module) -> tuple[int, ...] | None:
    w = getattr(module, "weight", None)
    return tuple(w.shape) if w is not None and hasattr(w, "shape") else None


def _split_problem(m: _Module, target: _Split, named: Mapping[str, Any], shapes: Mapping[str, tuple],
                   adapter_type: str) -> str | None:
    """Why the module's tensors cannot be split over ``target``'s modules (None when they can)."""
    if adapter_type not in ("lora", "dora") or set(m.parts) - {"lora_A", "lora_B", "alpha", "dora_scale"}:
        return (f"{target.original} is {len(target.targets)} modules of the base; only LoRA and DoRA (lora_A, "
                f"lora_B, alpha, dora_scale) split over them exactly")
    a, b = tuple(shapes[m.parts["lora_A"]]), tuple(shapes[m.parts["lora_B"]])
    if "dora_scale" in m.parts and math.prod(shapes[m.parts["dora_scale"]]) != target.rows:
        return (f"dora_scale {list(shapes[m.parts['dora_scale']])} does not match {target.original}'s "
                f"{target.rows} outputs")
    for module_name, _ in target.targets:
        w = _weight_shape(named[module_name])
        if w is None or len(w) != 2 or len(a) != 2 or a[1] != w[1]:
            return f"lora_A {list(a)} does not fit the input of {module_name} (weight {list(w or ())})"
    if len(b) != 2 or b[0] != target.rows:
        parts = " + ".join(f"{rows} ({t.rsplit('.', 1)[-1]})" for t, rows in target.targets)
        return f"lora_B {list(b)} has {b[0]} outputs where this model's {target.original} has {parts} = {target.rows}"
    return None


def _shape_problem(m: _Module, module, shapes: Mapping[str, tuple], adapter_type: str) -> str | None:
    """Why the module's tensors cannot patch ``module`` (None when they fit)."""
    w = _weight_shape(module)
    if w is None or len(w) < 2:
        return f"{type(module).__name__} has no 2-D/4-D weight to adapt"
    out, rest = w[0], w[1:]
    shape = {part: tuple(shapes[key]) for part, key in m.parts.items()}
    if adapter_type in ("lora", "dora") and "diff" in shape:
        if shape["diff"] != w:
            return f"diff {list(shape['diff'])} is not the module's weight shape {list(w)}"
        if "diff_b" in shape and shape["diff_b"] != (out,):
            return f"diff_b {list(shape['diff_b'])} does not match the module's {out} outputs"
        return None
    if adapter_type in ("lora", "dora") and "lora_mid" in shape:  # down (1x1), mid (the kernel), up (1x1)
        a, mid, b = shape["lora_A"], shape["lora_mid"], shape["lora_B"]
        if len(w) != 4 or len(a) != 4 or len(mid) != 4 or a[1] != rest[0] or mid[2:] != rest[1:] or b[0] != out:
            return (f"lora_down {list(a)}, lora_mid {list(mid)}, lora_up {list(b)} do not make an update of the "
                    f"module's weight {list(w)}")
        return None
    if adapter_type in ("lora", "dora"):
        a, b = shape["lora_A"], shape["lora_B"]
        if len(a) != len(w) or a[1:] != rest:
            return f"lora_A {list(a)} does not fit the module's input {list(rest)} (weight {list(w)})"
        if len(b) != len(w) or b[0] != out or any(d != 1 for d in b[2:]):
            return f"lora_B {list(b)} does not fit the module's output {out} (weight {list(w)})"
        for part in ("lora_magnitude_vector", "dora_scale", "lora_B.bias"):
            if part in shape and math.prod(shape[part]) != out:
                return f"{part} {list(shape[part])} does not match the module's {out} outputs"
        return None
    fan_in = math.prod(rest)
    if adapter_type == "loha":
        if "hada_t1" in shape:  # Tucker-decomposed conv: the kernel lives in t1/t2
            return None if shape["hada_t1"][2:] == rest[1:] else f"hada_t1 {list(shape['hada_t1'])} kernel differs"
        for w1, w2 in (("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b")):
            if (shape[w1][0], math.prod(shape[w2][1:])) != (out, fan_in):
                return f"{w1}/{w2} {list(shape[w1])}x{list(shape[w2])} do not make a {out}x{fan_in} update"
        return None
    # LoKr: kron(w1, w2) has (w1 rows * w2 rows) outputs and (w1 cols * w2's remaining dims) inputs
    w1 = shape.get("lokr_w1") or (shape["lokr_w1_a"][0], shape["lokr_w1_b"][1])
    if "lokr_t2" in shape:
        return None
    w2 = shape.get("lokr_w2") or (shape["lokr_w2_a"][0], *shape["lokr_w2_b"][1:])
    if w1[0] * w2[0] != out or w1[1] * math.prod(w2[1:]) != fan_in:
        return f"LoKr factors {list(w1)} (x) {list(w2)} do not make a {out}x{fan_in} update"
    return None


def validate_against(base_pipeline, state_dict: Mapping[str, Any], family, *,
                     base_name: str | None = None) -> ValidationReport:
    """Check that every key of ``state_dict`` (peft, legacy diffusers or kohya keys; tensors or shapes)
    names a module of ``base_pipeline`` whose shapes it fits. Raises :class:`IncompatibleAdapterError`
    naming the architecture the adapter looks made for; zero matching keys is an error too (loading it
    would silently change nothing)."""
    family = _family_obj(family)
    base = f"the base {base_name!r}" if base_name else "the base model"
    base_arch = f"{base} ({family.display_name})"
    shapes = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in state_dict.items()}
    fmt, adapter_type, modules = _parse(list(shapes), "the adapter", family)
    for m in modules.values():
        _check_complete(m, adapter_type, shapes, "the adapter")
    arch, evidence = guess_architecture(shapes)
    if architectures.other_tree(arch, family.name):
        raise IncompatibleAdapterError(
            f"this adapter was made for {architectures.display_name(arch)} ({evidence}); {base_arch} cannot use it: "
            f"import it with --base set to a base model of that architecture, or pick an adapter made for "
            f"{family.display_name}", arch)
    index = _ModuleIndex(base_pipeline, family)
    resolved, unmatched, misfits = {}, [], []
    claimed: dict[tuple[str, str], str] = {}  # (component, module) -> the name that patches it
    for (component, name), m in modules.items():
        target = index.resolve(m)
        if target is None:
            unmatched.append(m)
            continue
        named = index.components[component]
        if isinstance(target, _Split):
            problem = _split_problem(m, target, named, shapes, adapter_type)
            modules_patched = [t for t, _ in target.targets]
        else:
            problem = _shape_problem(m, named[target], shapes, adapter_type)
            modules_patched = [target]
        for module_name in modules_patched:
            twin = claimed.setdefault((component, module_name), name)
            if twin != name:  # e.g. one module spelt both in diffusers and in original block names
                raise UnsupportedAdapterError(f"the adapter patches {component} module {module_name!r} twice (as "
                                              f"{twin!r} and as {name!r}); re-export it from the tool that made it")
        if problem:
            misfits.append((m, target.original if isinstance(target, _Split) else target, problem))
        else:
            resolved[(component, name)] = target
    if misfits:
        raise _misfit_error(base_pipeline, family, misfits, shapes, base, base_arch, len(modules))
    without_lora = sorted({c for c, _ in resolved} - set(family.lora_components))
    if without_lora:
        # diffusers' loaders drop such keys without a word (FLUX's T5 LoRA): refuse by name instead.
        counts = ", ".join(f"{sum(1 for comp, _ in resolved if comp == c)} in {c}" for c in without_lora)
        examples = ", ".join(repr(n) for c, n in resolved if c in without_lora)
        raise IncompatibleAdapterError(
            f"the adapter patches modules the studio does not apply LoRA to on {family.display_name} ({counts}; e.g. "
            f"{examples[:200]}): {family.display_name} pipelines carry LoRA on {', '.join(family.lora_components)} "
            f"only, so those keys would be silently ignored. Re-export the adapter without them (kohya: "
            f"{', '.join(family.kohya_prefix(c) for c in without_lora)} keys)", None)
    if unmatched:
        missing_components = sorted({m.component for m in unmatched} - set(index.components))
        # Every unmatched module up to a screenful, so the user sees which keys do not fit, not a sample.
        examples = ", ".join(repr(f"{m.component}: {m.name}") for m in unmatched[:MAX_LISTED_KEYS])
        if len(unmatched) > MAX_LISTED_KEYS:
            examples += f" and {len(unmatched) - MAX_LISTED_KEYS} more"
        hint = (f" It looks made for {architectures.display_name(arch)} ({evidence})."
                if arch and arch != family.name else "")
        if missing_components:
            hint += f" {base_arch} has no {', '.join(missing_components)}."
        if not resolved:
            raise IncompatibleAdapterError(
                f"none of the {len(modules)} module(s) this adapter patches exist in {base_arch} ({examples}): "
                f"loading it would change nothing.{hint} Pick the base model it was trained for, or another adapter",
                arch)
        raise IncompatibleAdapterError(
            f"{len(unmatched)} of the {len(modules)} modules this adapter patches do not exist in {base_arch} "
            f"({examples}); every key must map to a module, or part of the adapter would be silently "
            f"dropped.{hint}", arch)
    return ValidationReport(resolved=resolved, components=tuple(sorted({c for c, _ in resolved},
                                                                      key=architectures.COMPONENTS.index)))


def check_against_reference(path: str | Path, family: Family | str) -> ValidationReport:
    """Validate an adapter file's names and shapes against ``family``'s full-size reference model
    (:func:`studio.core.base_models.reference_architecture`: built on the meta device, no weights), so
    a real-size SDXL LoRA is checked against a real-size SDXL on any machine, offline."""
    from studio.core.base_models import reference_architecture  # builds models: torch, diffusers

    family = _family_obj(family)
    path = _resolve_path(path)
    header = check_safetensors(path)
    shapes = {k: tuple(e.shape) for k, e in header.tensors.items()}
    try:
        return validate_against(reference_architecture(family), shapes, family,
                                base_name=f"full-size {family.display_name}")
    except IncompatibleAdapterError as e:
        raise IncompatibleAdapterError(f"{path}: {e}", e.architecture) from None


def _misfit_error(pipe, family: Family, misfits, shapes, base: str, base_arch: str,
                  total: int) -> IncompatibleAdapterError:
    # Name the architecture by the width that disagrees: the cross-attention input of the UNet
    # (attn2.to_k/to_v read the text embedding) or the text encoder's hidden size.
    for m, target, _ in misfits:
        a = m.parts.get("lora_A")
        if a is None:
            continue
        width = shapes[a][1]
        if family.is_denoiser(m.component) and re.search(r"attn2\.to_[kv]$", target):
            theirs = architectures.by_cross_attention_dim(width)
            ours = getattr(getattr(pipe, family.denoiser, None), "config", None)
            ours = getattr(ours, "cross_attention_dim", None)
            return IncompatibleAdapterError(
                f"this LoRA was made for a model with cross-attention dim {width}"
                f"{f' ({theirs.display_name})' if theirs else ''}; {base} has {ours}: import it against a base "
                f"model of that kind (--base), or pick an adapter made for this one", theirs and theirs.name)
        if m.component in family.text_encoder_components and target.endswith(("q_proj", "k_proj", "v_proj")):
            theirs = architectures.by_text_encoder_width(width)
            model = getattr(pipe, m.component, None)
            ours = getattr(getattr(model, "config", None), "hidden_size", None)
            return IncompatibleAdapterError(
                f"this LoRA was made for a text encoder of width {width}"
                f"{f' ({theirs.display_name})' if theirs else ''}; {base} has {ours}: import it against a base "
                f"model of that kind (--base), or pick an adapter made for this one", theirs and theirs.name)
    m, target, problem = misfits[0]
    return IncompatibleAdapterError(
        f"{len(misfits)} of the {total} modules this adapter patches have other shapes than in {base_arch}; "
        f"first: {m.component} {target}: {problem}. It was made for a different model: pick the base it was "
        f"trained for (--base)")


# --------------------------------------------------------------------------------------------
# the canonical in-memory form
# --------------------------------------------------------------------------------------------


@dataclass
class AdapterWeights:
    """An adapter in canonical form: peft keys ``<component>.<module>.<part>`` and, per component, the
    peft config that loads them (``LoraConfig``/``LoHaConfig``/``LoKrConfig`` keyword arguments).

    ``metadata`` is the source file's metadata, kept so that exports carry it on.
    """

    tensors: dict[str, Any]
    configs: dict[str, dict]
    adapter_type: str
    metadata: dict[str, str] = field(default_factory=dict)

    def modules(self) -> dict[tuple[str, str], dict[str, Any]]:
        """(component, module) -> {canonical part: tensor}."""
        out: dict[tuple[str, str], dict[str, Any]] = {}
        prefixes = _kohya_prefix_table()
        for key, tensor in self.tensors.items():
            style, component, name, part = _split_key(key, prefixes)
            out.setdefault((component, name), {})[part] = tensor
        return out

    def scales(self) -> dict[tuple[str, str], tuple[int | None, float | None, bool]]:
        """(component, module) -> (rank, alpha, rsLoRA): what the adapter's strength depends on."""
        out = {}
        for (component, name), parts in self.modules().items():
            config = self.configs.get(component, {})
            rank = _module_rank(parts, config, name)
            alpha_key = "lora_alpha" if self.adapter_type in ("lora", "dora") else "alpha"
            alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get(alpha_key))
            out[(component, name)] = (rank, float(alpha) if alpha is not None else None,
                                      bool(config.get("use_rslora")))
        return out

    @property
    def rank(self) -> int | None:
        return _common({f"{c}.{n}": s[0] for (c, n), s in self.scales().items()})[0]

    @property
    def alpha(self) -> float | None:
        return _common({f"{c}.{n}": s[1] for (c, n), s in self.scales().items()})[0]

    @property
    def components(self) -> list[str]:
        return sorted({c for c, _ in self.modules()}, key=architectures.COMPONENTS.index)

    @property
    def target_modules(self) -> list[str]:
        return sorted({_leaf(n, False) for _, n in self.modules()})


def _module_rank(parts: Mapping[str, Any], config: Mapping[str, Any], name: str) -> int | None:
    if "lora_A" in parts:
        return int(parts["lora_A"].shape[0])
    if "hada_w1_b" in parts:
        return int(parts["hada_w1_b"].shape[0])
    for w in ("lokr_w2_a", "lokr_w1_a"):
        if w in parts:
            return int(parts[w].shape[1])
    r = _pattern_value(config.get("rank_pattern") or {}, name, config.get("r"))
    return int(r) if r is not None else None


def _number(x: float) -> int | float:
    """JSON-friendly: 8.0 -> 8 (peft and kohya tools print integral alphas as integers)."""
    return int(x) if float(x).is_integer() else float(x)


def _lora_config(scales: dict[str, tuple[int, float]], *, use_dora: bool, use_rslora: bool,
                 lora_bias: bool) -> dict:
    """A LoraConfig dict reproducing each module's rank and alpha exactly.

    target_modules are full module paths: peft matches a target by name suffix, so a bare 'to_q'
    would also wrap every to_q the file has no tensors for.
    """
    r, rank_pattern = _common({n: s[0] for n, s in scales.items()})
    alpha, alpha_pattern = _common({n: s[1] for n, s in scales.items()})
    return {"peft_type": "LORA", "r": r, "lora_alpha": _number(alpha), "rank_pattern": rank_pattern,
            "alpha_pattern": {k: _number(v) for k, v in alpha_pattern.items()}, "target_modules": sorted(scales),
            "use_dora": use_dora, "use_rslora": use_rslora, "lora_bias": lora_bias, "bias": "none"}


def read_adapter(path: str | Path, *, base_pipeline=None, family: Family | str | None = None,
                 base_name: str | None = None, info: FormatInfo | None = None) -> AdapterWeights:
    """Read any supported adapter file into canonical :class:`AdapterWeights`.

    With ``base_pipeline`` the file is validated against it first (:func:`validate_against`), for
    ``family`` (the base's family, name or ``Family``; required with a base); kohya files need a base,
    since only the base model's module list turns flat kohya names back into modules.
    LyCORIS LoHa/LoKr files (kohya layout, ``alpha`` tensors) become peft LoHa/LoKr with configs that
    rebuild their factors and scales exactly; kohya/LyCORIS DoRA (``dora_scale`` per output channel)
    becomes peft DoRA. Refuses DoRA normalised per input channel, which peft cannot hold, and tensors
    holding NaN or infinity.
    """
    if base_pipeline is not None and family is None:
        raise InvalidRequestError("read_adapter validates against base_pipeline for a family: pass family= "
                                  "(the base model's family)")
    path = _resolve_path(path)
    info = info or detect(path)
    from safetensors.torch import load_file  # torch loads when weights are read, not at import

    tensors = load_file(str(path))
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(t.isfinite().all()):
            raise CorruptWeightsError(f"{path}: tensor {key!r} holds NaN or infinite values; an adapter like this "
                                      f"produces black or noise images: re-export it from a healthy checkpoint")
    fmt, adapter_type, modules = _parse(list(tensors), str(path), _family_obj(family) if family else None)
    for m in modules.values():
        if "dora_scale" in m.parts:
            _check_dora_axis(path, m, tensors[m.parts["dora_scale"]])
    if base_pipeline is not None:
        try:
            resolved = validate_against(base_pipeline, tensors, family, base_name=base_name).resolved
        except IncompatibleAdapterError as e:
            raise IncompatibleAdapterError(f"{path}: {e}", e.architecture) from None
    elif fmt == "kohya":
        raise InvalidRequestError("kohya keys spell module paths with '_' for '.', so reading them needs the base "
                                  "model: pass base_pipeline")
    else:
        resolved = {key: m.name for key, m in modules.items()}
    warnings: list[str] = []
    source_configs = _split_adapter_metadata(info.metadata, warnings, str(path)) if fmt == "diffusers" else {}
    out: dict[str, Any] = {}
    per_component: dict[str, dict[str, tuple[int, float]]] = {}
    flags: dict[str, dict[str, bool]] = {}
    method_alphas: dict[str, float] = {}
    for key, m in modules.items():
        target = resolved[key]
        if isinstance(target, _Split):
            pieces = _split_tensors(tensors[m.parts["lora_A"]], tensors[m.parts["lora_B"]], target)
            # DoRA's magnitude is one value per output row, and the norm is taken per row: rows split exactly
            magnitudes = (_split_tensors(tensors[m.parts["lora_A"]], tensors[m.parts["dora_scale"]].flatten(1), target)
                          if "dora_scale" in m.parts else {})
            for name, (a, b) in pieces.items():
                out[f"{m.component}.{name}.lora_A.weight"] = a
                out[f"{m.component}.{name}.lora_B.weight"] = b
                if name in magnitudes:
                    out[f"{m.component}.{name}.lora_magnitude_vector.weight"] = magnitudes[name][1].flatten()
        else:
            pieces = {target: None}
            parts = _as_lora(m, tensors)
            for part, tensor in parts.items():
                if part == "alpha":
                    continue
                out[f"{m.component}.{target}.{PEFT_SUFFIX[part]}"] = tensor.contiguous()
        if adapter_type not in ("lora", "dora"):
            if "alpha" in m.parts:  # LyCORIS files: the scale is alpha / rank, per module
                method_alphas[f"{m.component}.{target}"] = float(tensors[m.parts["alpha"]].float().item())
            continue
        config = source_configs.get(m.component)
        rank = int(out[f"{m.component}.{next(iter(pieces))}.lora_A.weight"].shape[0])
        if "alpha" in m.parts:
            alpha = float(tensors[m.parts["alpha"]].float().item())
        elif config is not None and config.get("lora_alpha") is not None:
            alpha = float(_pattern_value(config.get("alpha_pattern") or {}, m.name, config["lora_alpha"]))
        else:
            alpha = float(rank)  # what diffusers and kohya loaders use when a file carries no alpha
        for name in pieces:  # each module of a fused original keeps its rank and alpha: the same scale
            per_component.setdefault(m.component, {})[name] = (rank, alpha)
        f = flags.setdefault(m.component, {"use_dora": False, "lora_bias": False,
                                           "use_rslora": bool((config or {}).get("use_rslora"))})
        f["use_dora"] |= "lora_magnitude_vector" in m.parts or "dora_scale" in m.parts
        f["lora_bias"] |= "lora_B.bias" in m.parts or "diff_b" in m.parts
    if adapter_type in ("lora", "dora"):
        _zero_missing_biases(out, {c for c, f in flags.items() if f["lora_bias"]})
        configs = {c: _lora_config(s, **flags[c]) for c, s in per_component.items()}
    else:
        configs = _method_configs(adapter_type, source_configs, out, info, method_alphas)
    return AdapterWeights(tensors=dict(sorted(out.items())), configs=configs, adapter_type=adapter_type,
                          metadata=dict(info.metadata))


def _as_lora(m: _Module, tensors: Mapping[str, Any]) -> dict[str, Any]:
    """A module's parts, with LyCORIS's LoRA-shaped forms written as plain LoRA, exactly:

    - LoCon with a CP-decomposed kernel (``lora_down`` 1x1, ``lora_mid`` k x k, ``lora_up`` 1x1) runs
      down, then mid, then up: down and mid are one k x k convolution, lora_A = mid (x) down, rank kept;
    - a full update (``diff``, ``diff_b``) is a LoRA of rank min(out, in x kernel): lora_A the update and
      lora_B the identity, or lora_A the identity over every input tap and lora_B the update; ``diff_b``
      becomes lora_B's bias. It runs at scale 1 (alpha = rank), as LyCORIS runs it;
    - DoRA's ``dora_scale`` is peft's ``lora_magnitude_vector``: both rescale each output row of
      W + (alpha / rank) B A to the stored magnitude, so at strength 1 they are the same weight.
    """
    parts = {part: tensors[key] for part, key in m.parts.items()}
    if "dora_scale" in parts:
        # LyCORIS/kohya DoRA: dora_scale [out, 1(, 1, 1)] is peft's lora_magnitude_vector, which peft keeps
        # [out] on Linear layers and [1, out, 1, 1] on convolutions (its per-output norm, transposed).
        magnitude = parts.pop("dora_scale")
        conv = (parts.get("lora_A", parts.get("diff"))).dim() == 4
        parts["lora_magnitude_vector"] = magnitude.reshape(1, -1, 1, 1) if conv else magnitude.flatten()
    if "lora_mid" not in parts and "diff" not in parts:
        return parts
    import torch  # only once weights are read

    if "lora_mid" in parts:
        down, mid = parts.pop("lora_A"), parts.pop("lora_mid")
        parts["lora_A"] = torch.einsum("abhw,bi->aihw", mid.float(), down.flatten(1).float()).to(mid.dtype)
        return parts
    diff = parts.pop("diff")
    outputs, fan_in, ones = diff.shape[0], diff[0].numel(), [1] * (diff.dim() - 2)
    if outputs <= fan_in:
        parts["lora_A"] = diff
        parts["lora_B"] = torch.eye(outputs, dtype=diff.dtype).reshape(outputs, outputs, *ones)
    else:
        parts["lora_A"] = torch.eye(fan_in, dtype=diff.dtype).reshape(fan_in, *diff.shape[1:])
        parts["lora_B"] = diff.reshape(outputs, fan_in, *ones)
    if "diff_b" in parts:
        parts["lora_B.bias"] = parts.pop("diff_b")
    return parts


def _check_dora_axis(path: Path, m: _Module, dora_scale) -> None:
    """peft's DoRA keeps one magnitude per output channel; LyCORIS's ``wd_on_out=False`` (and A1111's
    early DoRA) keep one per input channel, ``dora_scale`` [1, in, ...]: the norms differ, refuse by name."""
    if dora_scale.dim() >= 2 and dora_scale.shape[0] == 1 and dora_scale.shape[1] > 1:
        raise UnsupportedAdapterError(
            f"{path} is a DoRA with its magnitude per input channel ({m.parts['dora_scale']!r} is "
            f"{list(dora_scale.shape)}; LyCORIS's wd_on_out=False); peft's DoRA normalises per output channel, "
            f"so it cannot be applied here exactly. A1111 and ComfyUI load it")


def _zero_missing_biases(tensors: dict[str, Any], components: set[str]) -> None:
    """peft's ``lora_bias`` is per component: its modules without a bias update get zeros, so every
    tensor the config implies is in the file."""
    import torch

    for key in [k for k in tensors if k.endswith(".lora_B.weight") and k.split(".", 1)[0] in components]:
        bias = key.removesuffix(".weight") + ".bias"
        if bias not in tensors:
            tensors[bias] = torch.zeros(tensors[key].shape[0], dtype=tensors[key].dtype)


def _split_tensors(a, b, target: _Split) -> dict[str, tuple[Any, Any]]:
    """lora_A, lora_B of a fused original module -> (lora_A, lora_B) of each base module it is.

    Exact: B @ A stacked by rows is each module's B rows @ the same A. A is copied per module
    (safetensors refuses tensors that share memory).
    """
    import torch  # only once weights are read

    if target.swap_halves:
        half = b.shape[0] // 2
        b = torch.cat([b[half:], b[:half]])
    out, start = {}, 0
    for name, rows in target.targets:
        out[name] = (a.clone().contiguous(), b[start:start + rows].contiguous())
        start += rows
    return out


def _method_configs(adapter_type: str, source: dict[str, dict], tensors: dict[str, Any],
                    info: FormatInfo, alphas: Mapping[str, float] | None = None) -> dict[str, dict]:
    """LoHa/LoKr configs: kept as the file declares them (peft re-derives factorisations from them, so
    they are not rewritten); inferred from shapes when the file has none, with ``alphas`` (``component.
    module`` -> the file's alpha tensor, LyCORIS's layout) or else alpha = rank."""
    by_component: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        component, _, rest = key.partition(".")
        by_component.setdefault(component, {})[rest] = t
    configs = {}
    for component, sd in by_component.items():
        if component in source:
            configs[component] = jsonable({"peft_type": adapter_type.upper(), **source[component]})
            continue
        if adapter_type == "lokr" and alphas is not None:
            configs[component] = _lokr_config(sd, {m[len(component) + 1:]: a for m, a in alphas.items()
                                                   if m.startswith(component + ".")}, info)
            continue
        if adapter_type == "lokr":
            from diffusers.utils.peft_utils import _create_lokr_config  # diffusers only for LoKr without a config

            configs[component] = jsonable(_create_lokr_config(sd, None).to_dict())
            continue
        ranks = {}
        for k, t in sd.items():
            if k.endswith(".hada_w1_b"):
                ranks[k[: -len(".hada_w1_b")]] = int(t.shape[0])
        r, rank_pattern = _common(ranks)
        # alpha = rank per module (scale 1, the convention without metadata) unless the file gave one
        module_alphas = {m: (alphas or {}).get(f"{component}.{m}", float(rank)) for m, rank in ranks.items()}
        alpha, alpha_pattern = _common(module_alphas)
        configs[component] = {"peft_type": "LOHA", "r": r, "alpha": alpha, "rank_pattern": rank_pattern,
                              "alpha_pattern": alpha_pattern, "target_modules": sorted(ranks),
                              "use_effective_conv2d": any(k.endswith(".hada_t1") for k in sd)}
    return configs


# Kernel areas a flattened LoKr conv factor may have (1x1, 3x3, 2x2, 4x4, 5x5, 7x7).
_KERNEL_AREAS = (1, 9, 4, 16, 25, 49)


def _lokr_config(sd: Mapping[str, Any], alphas: Mapping[str, float], info: FormatInfo) -> dict:
    """The peft LoKr config that rebuilds a LyCORIS LoKr file's factors exactly.

    Both libraries split a layer's (out, in) as Kronecker factors w1 (a, c) x w2 (b, d), chosen by one
    ``factorization(dim, factor)`` rule for the whole network, and decompose w1 (with ``decompose_both``)
    and w2 into rank-r products when r is below half their larger side. So the rank a module needs is
    its decomposed factor's inner size, or (both factors full) any r at least half the sides, and the
    factor is the one value for which the rule gives every module its shapes. LyCORIS runs two full
    factors at scale 1 whatever the file's alpha; otherwise at alpha / r, as peft does.
    """
    import math

    from peft.tuners.lokr.layer import factorization  # peft only when a LoKr file is read

    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, t in sd.items():
        module, _, part = key.rpartition(".")
        modules.setdefault(module, {})[part] = tuple(t.shape)
    ranks, module_alphas, sides = {}, {}, {}
    for module, p in modules.items():
        w1 = p.get("lokr_w1") or (p["lokr_w1_a"][0], p["lokr_w1_b"][1])
        if "lokr_w2" in p:
            w2s = [p["lokr_w2"][:2]]
        elif "lokr_t2" in p:
            w2s = [(p["lokr_w2_a"][1], p["lokr_w2_b"][1])]
        else:  # a flattened conv kernel in w2_b's columns: its size is not in the file, so each is tried
            cols = p["lokr_w2_b"][1]
            w2s = [(p["lokr_w2_a"][0], cols // k) for k in _KERNEL_AREAS if cols % k == 0]
        sides[module] = (w1, w2s)
        if "lokr_w2_a" in p:
            r = p["lokr_w2_a"][1] if "lokr_t2" not in p else p["lokr_w2_a"][0]
        elif "lokr_w1_a" in p:
            r = p["lokr_w1_a"][1]
        else:  # two full factors: any r that keeps them full, at scale 1
            r = max(1, math.ceil(max(w2s[0]) / 2), math.ceil(max(w1) / 2))
            module_alphas[module] = float(r)
        ranks[module] = int(r)
        module_alphas.setdefault(module, float(alphas.get(module, r)))
    decompose_both = any("lokr_w1_a" in p for p in modules.values())
    def split_by(factor: int, w1: tuple[int, int], w2: tuple[int, int]) -> bool:
        return all(factorization(w1[i] * w2[i], factor) == (w1[i], w2[i]) for i in (0, 1))

    for factor in (-1, *sorted({d for w1, _ in sides.values() for d in w1})):
        if all(any(split_by(factor, w1, w2) for w2 in w2s) for w1, w2s in sides.values()):
            break
    else:
        # e.g. LyCORIS's factor 4 on 4 input channels gives (1, 4); peft's rule gives (4, 1) for it
        module = next(m for m, (w1, w2s) in sides.items() if not any(split_by(-1, w1, w2) for w2 in w2s))
        raise UnsupportedAdapterError(
            f"{info.path}: a LyCORIS LoKr whose Kronecker factors peft cannot rebuild (layer {module}: w1 "
            f"{list(sides[module][0])}, no single factorization rule of peft gives every layer its split; LyCORIS "
            f"and peft split small layers differently when the factor exceeds their square root). A1111 and ComfyUI "
            f"load it; to use it here, retrain or re-export it with factor -1")
    r, rank_pattern = _common(ranks)
    alpha, alpha_pattern = _common(module_alphas)
    return {"peft_type": "LOKR", "r": r, "alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "target_modules": sorted(modules), "decompose_both": decompose_both, "decompose_factor": factor,
            "use_effective_conv2d": any("lokr_t2" in p for p in modules.values())}


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def build_metadata(*, adapter_type: str, rank: int | None, alpha: float | None, family: Family | str,
                   name: str | None = None, trigger_words=(), tags=(), description: str | None = None,
                   author: str | None = None, license: str | None = None, date: datetime | None = None,
                   base: Mapping[str, str] | None = None) -> dict[str, str]:
    """kohya ``ss_*`` and ModelSpec ``modelspec.*`` keys for an adapter, over ``base`` (the source
    file's metadata, which is kept: ss_tag_frequency, training settings, thumbnails...).

    Keys this function sets replace the base's (the ``modelspec`` trigger phrase, tags, description,
    author and license are removed when not given); hash keys are dropped here and recomputed by the
    writer, since they describe the bytes being written.
    """
    fam = _family_obj(family)
    md = {k: v for k, v in (base or {}).items()
          if k not in (ADAPTER_METADATA_KEY, "sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")}
    md["format"] = "pt"
    lycoris = adapter_type in ("loha", "lokr")
    md["ss_network_module"] = "lycoris.kohya" if lycoris else "networks.lora"
    if lycoris:
        md["ss_network_args"] = json.dumps({"algo": adapter_type})
    if rank is not None:
        md["ss_network_dim"] = str(rank)
    if alpha is not None:
        md["ss_network_alpha"] = str(float(alpha))  # kohya writes the float: "8.0"
    md["ss_base_model_version"] = fam.kohya_base_model_version
    md["modelspec.sai_model_spec"] = MODELSPEC_VERSION
    # ModelSpec has one adapter architecture suffix, '/lora', for every network kind (as sd-scripts writes)
    md["modelspec.architecture"] = fam.modelspec_lora_architecture("lora")
    md["modelspec.implementation"] = "diffusers"
    if name:
        md["ss_output_name"] = name
        md["modelspec.title"] = name
    md["modelspec.date"] = (date or datetime.now(UTC)).isoformat(timespec="seconds")
    # The record owns these: an empty value removes the source file's, so an export never shows
    # trigger words or tags the registry no longer has.
    for key, value in (("modelspec.trigger_phrase", ", ".join(trigger_words or ())),
                       ("modelspec.tags", ", ".join(tags or ())), ("modelspec.description", description),
                       ("modelspec.author", author), ("modelspec.license", license)):
        if value:
            md[key] = value
        else:
            md.pop(key, None)
    return md


def _serialize(tensors: Mapping[str, Any], metadata: dict[str, str]) -> tuple[bytes, bytes]:
    """(header bytes, data bytes) with ``sshs_model_hash``/``modelspec.hash_sha256`` set to the sha256 of
    the data bytes. The data section does not depend on metadata (only offsets are in the header),
    so the hash is computed on a first serialisation and the header is then rebuilt around it."""
    from safetensors.torch import save  # torch loads when a file is written, not at import

    blob = save(dict(tensors), metadata=None)
    n = int.from_bytes(blob[:8], "little")
    data = blob[8 + n:]
    digest = hashlib.sha256(data).hexdigest()
    header = json.loads(blob[8:8 + n])
    header.pop("__metadata__", None)
    md = {**metadata, "sshs_model_hash": digest, "modelspec.hash_sha256": "0x" + digest}
    raw = json.dumps({"__metadata__": md, **header}, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad with spaces to 8 bytes, as safetensors does, so tensors stay aligned
    return len(raw).to_bytes(8, "little") + raw, data


def _write_atomic(out: str | Path, chunks: tuple[bytes, ...]) -> Path:
    """Write ``chunks`` to ``out`` through the studio's atomic writer: a reader sees the old file or the
    whole new one, a full disk is a :class:`~studio.core.errors.DiskFullError` with nothing partial
    left, and the folder is flushed so the export survives a power cut."""
    return write_atomic(out, lambda f: f.writelines(chunks), durable=True)


def to_diffusers(adapter: AdapterWeights, out: str | Path, *, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``adapter`` as a diffusers/peft file (what ``pipe.load_lora_weights`` reads), atomically.

    The peft config of every component goes under ``lora_adapter_metadata`` ("unet.r", "unet.lora_alpha"...),
    so alpha != rank reloads exactly; ``metadata`` (see :func:`build_metadata`) goes beside it.
    """
    packed = {f"{component}.{k}": v for component, config in sorted(adapter.configs.items())
              for k, v in config.items()}
    md = {k: str(v) for k, v in (metadata or {}).items()}
    md[ADAPTER_METADATA_KEY] = json.dumps(jsonable(packed), sort_keys=True)
    return _write_atomic(out, _serialize(adapter.tensors, md))


def check_kohya_exportable(adapter_type: str, family: Family | str | None = None) -> None:
    """Raise :class:`UnsupportedAdapterError` unless ``adapter_type`` can be written in kohya layout for
    ``family`` (LoHa and LoKr in LyCORIS's keys, for families the kohya layout names by diffusers' modules)."""
    if adapter_type == "dora" and family is not None and _family_obj(family).original_modules is not None:
        raise UnsupportedAdapterError(
            f"DoRA adapters on {_family_obj(family).display_name} export to the diffusers/peft format only: its "
            f"kohya layout fuses q, k and v into one module, whose dora_scale would need the magnitudes of the "
            f"base's rows the adapter does not patch; use --format diffusers")
    if adapter_type in ("loha", "lokr") and family is not None and _family_obj(family).original_modules is not None:
        raise UnsupportedAdapterError(
            f"{METHOD_NAMES[adapter_type]} adapters on {_family_obj(family).display_name} export to the "
            f"diffusers/peft format only: its kohya layout fuses q, k and v into one module, and Hadamard or "
            f"Kronecker factors of three modules do not fuse into one; use --format diffusers")


def kohya_state_dict(adapter: AdapterWeights, family: Family | str, *, denoiser_config=None) -> dict[str, Any]:
    """The kohya/A1111 keys of a LoRA: ``lora_unet_*``/``lora_te_text_model_*`` with ``.alpha`` per module.

    Each component gets the prefix ``family`` writes for it (SD-1: ``lora_unet_``, ``lora_te_``); a family
    with original module names (FLUX, SD3) has its denoiser written in them (:func:`_original_state_dict`),
    named from ``denoiser_config`` (the base's; its depth decides SD3's last block) or, without one,
    from the depths the adapter's own module names show.
    Alpha is written as each module's own alpha, so strength survives (diffusers'
    ``convert_state_dict_to_kohya`` writes alpha = rank). rsLoRA scales by alpha/sqrt(r); kohya by
    alpha/r, so an rsLoRA module is written with alpha * sqrt(r).
    """
    import torch  # the .alpha scalars are tensors; importing this module must not load torch

    check_kohya_exportable(adapter.adapter_type, family)
    family = _family_obj(family)
    scales = adapter.scales()
    modules = adapter.modules()
    out: dict[str, Any] = {}
    if adapter.adapter_type in ("loha", "lokr"):
        return _lycoris_state_dict(adapter, family, modules, scales)
    for (component, name), parts in modules.items():
        if "lora_B.bias" in parts:
            raise UnsupportedAdapterError(f"{component} {name} has a lora_B bias (peft lora_bias=True), which kohya "
                                          f"files cannot hold: export with --format diffusers")
    if family.original_modules is not None:
        # The denoiser in the family's original names (ComfyUI and kohya read Flux files only so), fused
        # modules written fused; the text encoders below as usual.
        out.update(_original_state_dict(adapter, family, modules, scales, denoiser_config))
    for (component, name), parts in modules.items():
        if family.original_modules is not None and family.is_denoiser(component):
            continue
        key = _kohya_key(family, component, name)
        out[f"{key}.lora_down.weight"] = parts["lora_A"]
        out[f"{key}.lora_up.weight"] = parts["lora_B"]
        # float32 holds any alpha a config can state exactly enough (fp16 would turn 0.1 into 0.09998)
        out[f"{key}.alpha"] = torch.tensor(_kohya_alpha(*scales[(component, name)]), dtype=torch.float32)
        if "lora_magnitude_vector" in parts:  # LyCORIS's dora_scale: [out, 1] on Linear, [out, 1, 1, 1] on conv
            magnitude = parts["lora_magnitude_vector"]
            out[f"{key}.dora_scale"] = magnitude.reshape(-1, *[1] * (parts["lora_A"].dim() - 1)).contiguous()
    return dict(sorted(out.items()))


def _kohya_key(family: Family, component: str, name: str) -> str:
    """A module's kohya key: the component's prefix, then its path with '_' for '.'."""
    flat = name.replace(".", "_")
    if _clip_root(family, component) and not name.startswith("text_model."):
        flat = "text_model_" + flat  # the usual SD-1 spelling: lora_te_text_model_encoder_layers_...
    return family.kohya_prefix(component) + flat


def _lycoris_state_dict(adapter: AdapterWeights, family: Family, modules, scales) -> dict[str, Any]:
    """LoHa/LoKr in LyCORIS's kohya layout (``lora_unet_..hada_w1_a``, ``.lokr_w1``, ``.alpha``), as A1111
    and ComfyUI read it. LyCORIS scales by alpha / r, as peft does, except a LoKr module whose two
    Kronecker factors are both full matrices, which it runs at scale 1: there peft's scale is folded
    into w1 (the product is linear in it) and alpha written as the rank."""
    import torch  # the .alpha scalars are tensors; importing this module must not load torch

    out: dict[str, Any] = {}
    for (component, name), parts in modules.items():
        key = _kohya_key(family, component, name)
        rank, alpha, _ = scales[(component, name)]
        rank = rank or 1
        alpha = float(rank) if alpha is None else alpha
        parts = dict(parts)
        if adapter.adapter_type == "lokr" and "lokr_w1" in parts and "lokr_w2" in parts:
            parts["lokr_w1"] = parts["lokr_w1"] * (alpha / rank)
            alpha = float(rank)
        for part, tensor in parts.items():
            out[f"{key}.{part}"] = tensor.contiguous()
        out[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return dict(sorted(out.items()))


def _kohya_alpha(rank: int, alpha: float | None, rslora: bool) -> float:
    """The alpha a kohya loader (scale alpha / r) needs for a module's peft (rank, alpha, rsLoRA)."""
    alpha = float(rank) if alpha is None else alpha
    return alpha * math.sqrt(rank) if rslora else alpha


def _depths(names) -> Any:
    """The block counts, dual-attention blocks and guidance input an adapter's denoiser module names show:
    what names every module they patch in the original layout when the base's config is not at hand
    (SD3's last block, whose context stream differs, is then taken to be the deepest one patched)."""
    from types import SimpleNamespace

    def deepest(block: str) -> int:
        found = [int(m.group(1)) for n in names if (m := re.match(rf"{block}\.(\d+)\.", n))]
        return max(found, default=-1) + 1

    return SimpleNamespace(num_layers=deepest("transformer_blocks"),
                           num_single_layers=deepest("single_transformer_blocks"),
                           guidance_embeds=any("guidance_embedder" in n for n in names),
                           dual_attention_layers=sorted({int(m.group(1)) for n in names
                                                         if (m := re.match(r"transformer_blocks\.(\d+)\.attn2\.", n))}))


def _original_state_dict(adapter: AdapterWeights, family: Family, modules, scales,
                         denoiser_config=None) -> dict[str, Any]:
    """kohya keys (``lora_unet_`` + the original flat name) for the denoiser of a family with original names.

    A fused original module (Flux's ``img_attn.qkv``, ``linear1``) becomes one LoRA of rank sum(r):
    lora_down stacks each patched module's A, lora_up places each B (times its own scale) in its rows and
    rank columns, zeros elsewhere (the modules the adapter does not patch), and alpha = that rank, so
    the scale is 1 and every part keeps its own strength exactly.
    """
    import torch

    denoiser = {name: parts for (component, name), parts in modules.items() if family.is_denoiser(component)}
    prefix = family.kohya_prefix(family.denoiser)
    out: dict[str, Any] = {}
    written: set[str] = set()
    for original, ours in family.original_modules(denoiser_config or _depths(list(denoiser))).items():
        key = prefix + original.replace(".", "_")
        if isinstance(ours, str):
            if ours in denoiser:
                out[f"{key}.lora_down.weight"] = denoiser[ours]["lora_A"]
                out[f"{key}.lora_up.weight"] = denoiser[ours]["lora_B"]
                out[f"{key}.alpha"] = torch.tensor(_kohya_alpha(*scales[(family.denoiser, ours)]), dtype=torch.float32)
                written.add(ours)
            continue
        present = [t for t in ours.targets if t in denoiser]
        if not present:
            continue
        # Rows of each target: its own B's, or (not patched) its width times the unit the patched ones show.
        unit = denoiser[present[0]]["lora_B"].shape[0] // ours.widths[ours.targets.index(present[0])]
        rows = [denoiser[t]["lora_B"].shape[0] if t in denoiser else unit * w
                for t, w in zip(ours.targets, ours.widths, strict=True)]
        ranks = [denoiser[t]["lora_A"].shape[0] for t in present]
        down = torch.cat([denoiser[t]["lora_A"] for t in present])
        up = torch.zeros(sum(rows), sum(ranks), dtype=down.dtype)
        column = 0
        for t, start, n in zip(ours.targets, [sum(rows[:i]) for i in range(len(rows))], rows, strict=True):
            if t not in denoiser:
                continue
            rank, alpha, rslora = scales[(family.denoiser, t)]
            r = denoiser[t]["lora_B"].shape[1]
            up[start:start + n, column:column + r] = denoiser[t]["lora_B"] * (_kohya_alpha(rank, alpha, rslora) / rank)
            column += r
        if ours.swap_halves:
            up = torch.cat([up[up.shape[0] // 2:], up[: up.shape[0] // 2]])
        out[f"{key}.lora_down.weight"] = down.contiguous()
        out[f"{key}.lora_up.weight"] = up
        out[f"{key}.alpha"] = torch.tensor(float(sum(ranks)), dtype=torch.float32)
        written.update(present)
    left = sorted(set(denoiser) - written)
    if left:
        raise UnsupportedAdapterError(f"{len(left)} {family.denoiser} module(s) of this adapter have no name in "
                                      f"{family.display_name}'s original layout (e.g. {left[0]!r}); export it with "
                                      f"--format diffusers")
    return out


def to_kohya(adapter: AdapterWeights, out: str | Path, *, family: Family | str,
             metadata: Mapping[str, str] | None = None, denoiser_config=None) -> Path:
    """Write ``adapter`` in kohya/A1111/ComfyUI layout, atomically: LoRA in kohya's keys, DoRA with
    LyCORIS's ``dora_scale``, LoHa and LoKr in LyCORIS's keys.

    ``family`` (the adapter's) gives each component's key prefix. ``lora_adapter_metadata`` is never
    written here: diffusers refuses a kohya file that carries both ``.alpha`` tensors and that key
    ("Both network_alphas and metadata cannot be specified").
    """
    state = kohya_state_dict(adapter, family, denoiser_config=denoiser_config)
    md = {k: str(v) for k, v in (metadata or {}).items() if k != ADAPTER_METADATA_KEY}
    return _write_atomic(out, _serialize(state, md))
