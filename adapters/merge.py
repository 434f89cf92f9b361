"""Merge several registered LoRAs into one new adapter with peft's weighted merging, and register it.

Holds :func:`merge_adapters` (parents + weights + method -> a new registry version with origin
"merged", the parents as lineage and the merge settings in its ``source`` record), the
:class:`MergeSettings` it records, and :func:`parse_merge_arg` for ``REF[:WEIGHT]`` on the command line.

How: every parent is read in canonical form (``adapters.formats.read_adapter``), injected into a
private float32 copy of the base model's UNet (and text encoder, where parents have one) as its own
peft adapter, and peft's ``LoraModel.add_weighted_adapter`` builds the merged adapter from them
(``linear``, ``cat``, ``svd``, ``ties``, ``dare_linear``). The result goes through ``adapters.ingest.ingest``,
like every new version: validated against the private copy, written as the diffusers/peft file
``adapters.compose`` loads, and registered.

Does not hold: runtime composition without merging (``adapters/compose.py``), file layouts
(``adapters/formats.py``).

What peft cannot do is refused before any model is loaded: LoHa/LoKr/DoRA parents (its weighted
merge is for plain LoRA layers), parents of different families, unequal ranks for the methods that
sum factors of one shape (linear, ties, dare_linear), and the same version twice.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from adapters import formats
from adapters.compose import parse_adapter_arg
from adapters.ingest import ingest
from adapters.registry import check_name
from studio.core import base_models
from studio.core.errors import IncompatibleAdapterError, InvalidRequestError, UnsupportedAdapterError
from studio.core.families import get_family

METHODS = ("linear", "cat", "svd", "ties", "dare_linear")
SAME_RANK_METHODS = ("linear", "ties", "dare_linear")  # factors are summed: every parent needs one shape
DENSITY_METHODS = ("ties", "dare_linear")  # keep this fraction of each delta's entries
MAX_ABS_WEIGHT = 4.0  # as a stack entry (adapters.compose)


@dataclass(frozen=True)
class MergeSettings:
    """How a merged adapter was made; recorded in the new version's ``source`` under ``merge``."""

    method: str = field(metadata={"help": f"peft combination_type: {', '.join(METHODS)}"})
    parents: list[str] = field(metadata={"help": "the parent versions (name@N), in order"})
    weights: list[float] = field(metadata={"help": "one weight per parent"})
    density: float | None = field(default=None, metadata={"help": "ties / dare_linear: fraction of entries kept"})
    rank: int | None = field(default=None, metadata={"help": "svd: rank of the merged adapter (default: the "
                                                                "largest parent rank)"})
    components: list[str] = field(default_factory=list, metadata={"help": "components merged (the family's "
                                                                          "denoiser and text encoders)"})

    def to_dict(self) -> dict:
        return asdict(self)


def parse_merge_arg(text: str) -> tuple[str, float]:
    """``REF[:WEIGHT]`` (``mystyle@2:0.7``; weight 1.0 when omitted), as ``lora-studio adapters merge`` takes it."""
    spec = parse_adapter_arg(text)
    return spec.ref, spec.weight


def _check_settings(parents, method: str, density: float | None, rank: int | None) -> None:
    if method not in METHODS:
        raise InvalidRequestError(f"unknown merge method {method!r}: choose one of {', '.join(METHODS)}")
    if not parents:
        raise InvalidRequestError("a merge needs at least one parent: REF[:WEIGHT] ...")
    for ref, weight in parents:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise InvalidRequestError(f"the weight of {ref} must be a number, got {weight!r}")
        if abs(weight) > MAX_ABS_WEIGHT:
            raise InvalidRequestError(f"the weight of {ref} is {weight}: weights must lie in [-4, 4]")
    if method in DENSITY_METHODS:
        if density is None:
            raise InvalidRequestError(f"--method {method} needs --density D (the fraction of each delta kept, "
                                      f"e.g. 0.5)")
    elif density is not None:
        raise InvalidRequestError(f"--density applies to {' and '.join(DENSITY_METHODS)}, not {method}")
    if density is not None and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise InvalidRequestError(f"density must be in (0, 1], got {density!r}")
    if rank is not None:
        if method != "svd":
            raise InvalidRequestError(f"--rank applies to svd (which re-factorises the merged delta), not {method}: "
                                      f"the rank of a {method} merge follows from its parents")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise InvalidRequestError(f"rank must be a whole number >= 1, got {rank!r}")


def _module_ranks(adapter) -> dict[str, int]:
    return {f"{c}.{n}": s[0] for (c, n), s in adapter.scales().items()}


def merge_adapters(registry, parents: list[tuple[str, float]], *, method: str, name: str,
                   density: float | None = None, rank: int | None = None, description: str = "",
                   tags: list[str] | None = None, trigger_words: list[str] | None = None):
    """Merge ``parents`` (``[(reference, weight), ...]``) into a new version of ``name``; return it.

    ``method`` is peft's ``combination_type``: ``linear`` (weighted sum; equal ranks), ``cat``
    (factors side by side: exact, rank = sum of ranks), ``svd`` (exact sum re-factorised to ``rank``),
    ``ties`` and ``dare_linear`` (prune each delta to ``density`` first; equal ranks). Parents must be
    LoRAs of one family; the merged adapter is a LoRA of that family on the parents' base model, with
    the parents as lineage and the settings in ``source["merge"]``.
    """
    check_name(name)
    _check_settings(parents, method, density, rank)
    versions = [registry.get(ref) for ref, _ in parents]
    refs = [v.ref for v in versions]
    if len(set(refs)) != len(refs):
        dup = next(r for r in refs if refs.count(r) > 1)
        raise InvalidRequestError(f"{dup} is named twice: give each parent once, with the weight you want")
    for v in versions:
        if v.adapter_type != "lora":
            raise UnsupportedAdapterError(
                f"{v.ref} is a {v.adapter_type.upper() if v.adapter_type != 'dora' else 'DoRA'} adapter: peft's "
                f"weighted merge works on plain LoRA layers only; stack it at generation time instead "
                f"(--adapter {v.ref}:W)")
    families = sorted({v.family for v in versions})
    if len(families) > 1:
        raise IncompatibleAdapterError(
            f"the parents are made for different families ({', '.join(f'{v.ref}: {v.family}' for v in versions)}): "
            f"merge adapters of one base-model family only")
    family = get_family(families[0])  # an unknown family is refused here, before any weights are read
    base = sorted({v.base_model or "tiny" for v in versions})[0]
    adapters = [formats.read_adapter(v.path, family=v.family) for v in versions]
    if method in SAME_RANK_METHODS and len(parents) > 1:
        ranks = [sorted(set(_module_ranks(a).values())) for a in adapters]
        if len({tuple(r) for r in ranks}) > 1:
            shown = ", ".join(f"{v.ref}: rank {'/'.join(map(str, r))}" for v, r in zip(versions, ranks))
            raise InvalidRequestError(
                f"{method} merging sums the parents' factors, so every parent needs the same rank ({shown}): use "
                f"--method cat (rank = sum of ranks) or --method svd --rank R")
    # The family's LoRA-bearing components, denoiser first: each is merged on its own model.
    covered = family.lora_components
    components = [c for c in covered if any(c in a.components for a in adapters)]
    other = sorted({c for a in adapters for c in a.components} - set(covered))
    if other:
        raise UnsupportedAdapterError(f"the parents adapt {', '.join(other)}; merging covers {', '.join(covered)}")

    merged_tensors: dict = {}
    merged_scales: dict[str, dict[str, tuple[int, float]]] = {}
    pipe = _fresh_pipeline(base)
    for component in components:
        tensors, scales = _merge_component(getattr(pipe, component), component, adapters, parents, method,
                                           density, rank)
        merged_tensors.update(tensors)
        merged_scales[component] = scales
    # peft's merged adapters are plain LoRAs; their alpha comes from the config it made (= its rank).
    configs = {c: formats._lora_config(s, use_dora=False, use_rslora=False, lora_bias=False)
               for c, s in merged_scales.items()}
    merged = formats.AdapterWeights(tensors=dict(sorted(merged_tensors.items())), configs=configs,
                                    adapter_type="lora")
    settings = MergeSettings(method=method, parents=refs, weights=[float(w) for _, w in parents], density=density,
                             rank=rank, components=components)
    words = trigger_words if trigger_words is not None else list(dict.fromkeys(
        w for v in versions for w in v.trigger_words))
    # One path for every new version: ingest validates every key against the private copy (which holds
    # the same modules as the base), writes the canonical file and registers it.
    return ingest(registry, merged, name=name, origin="merged", base=base, family=family,
                  pipeline=pipe, trigger_words=words, tags=tags or (), description=description,
                  source_info={"merge": settings.to_dict()}, parents=refs,
                  metadata={"modelspec.merged_from": ", ".join(f"{r}:{w:g}" for r, (_, w) in zip(refs, parents)),
                            "lora_studio_merge": _json(settings.to_dict())}).version


def _json(value) -> str:
    return json.dumps(value, sort_keys=True)


def _fresh_pipeline(base: str):
    """A private float32 copy of the base: peft injects layers into it, which the cached pipeline must not see."""
    return base_models.load_fresh_pipeline(base)


def _merge_component(model, component: str, adapters, parents, method: str, density, rank):
    """Inject each parent's ``component`` part into ``model`` and let peft merge them.

    Returns (``{component.module.lora_X.weight: tensor}``, ``{module: (rank, alpha)}``). Parents without
    this component take no part in its merge (for linear, cat and svd that is exactly a zero delta).
    """
    # torch and peft load only when a merge runs, not whenever the CLI imports this module
    import torch
    from peft import LoraConfig, LoraModel, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    involved = [(i, a, w) for i, (a, (_, w)) in enumerate(zip(adapters, parents)) if component in a.components]
    tuner = None
    names, weights = [], []
    for i, adapter, weight in involved:
        adapter_name = f"parent_{i}"
        config = LoraConfig(**{k: v for k, v in adapter.configs[component].items() if k != "peft_type"})
        if tuner is None:
            tuner = LoraModel(model, config, adapter_name)
        else:
            tuner.peft_config[adapter_name] = config
            tuner.inject_adapter(model, adapter_name)
        state = {k.partition(".")[2]: v for k, v in adapter.tensors.items() if k.startswith(f"{component}.")}
        result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
        missing = [k for k in result.missing_keys if f".{adapter_name}." in k]
        if result.unexpected_keys or missing:
            raise IncompatibleAdapterError(
                f"{parents[i][0]} does not fit the base model's {component} "
                f"(e.g. {(result.unexpected_keys or missing)[0]!r})")
        names.append(adapter_name)
        weights.append(float(weight))
    kwargs = {}
    if density is not None:
        kwargs["density"] = float(density)
    if rank is not None:
        kwargs["svd_rank"] = rank
    if method in ("ties", "dare_linear"):
        torch.manual_seed(0)  # dare drops entries at random: a fixed seed makes a merge repeatable
    try:
        tuner.add_weighted_adapter(names, weights, "merged", combination_type=method, **kwargs)
    except (ValueError, TypeError, RuntimeError) as e:
        raise InvalidRequestError(f"peft refused the {method} merge of the {component} parts: {e}") from None
    state = get_peft_model_state_dict(model, adapter_name="merged")
    tensors = {f"{component}.{k}": v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    # Each merged layer's strength as peft applies it (scaling = alpha / r), kept exactly in the file.
    scales = {}
    for qual, module in model.named_modules():
        if "merged" in getattr(module, "scaling", {}) and hasattr(module, "r"):
            r = int(module.r["merged"])
            scales[qual] = (r, float(module.scaling["merged"]) * r)
    return tensors, scales
