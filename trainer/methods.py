"""Adapter methods: a :class:`~trainer.config.NetworkConfig` -> the peft config that trains it, and
the trained layers -> the canonical form the studio saves (``adapters.formats.AdapterWeights``).

One builder per method, filled into :data:`METHOD_BUILDERS` by explicit ``register_method`` calls:

- ``lora``: ``LoraConfig`` (kohya's networks.lora);
- ``dora``: ``LoraConfig(use_dora=True)``, weight-decomposed LoRA;
- ``loha``: ``LoHaConfig``, a Hadamard product of two low-rank pairs (LyCORIS LoHa);
- ``lokr``: ``LoKrConfig``, a Kronecker product (LyCORIS LoKr).

Saving goes through ``adapters.formats`` (canonical peft keys, every component's peft config under
``lora_adapter_metadata``), which sidesteps the traps FIELD-NOTES.md lists: alpha != rank reloads
exactly, DoRA text-encoder magnitudes get their ``.weight`` suffix, and LoHa/LoKr (which diffusers'
converters reject) are stored in the layout ``adapters/compose.py`` loads.

Not here: the training loop (``trainer/loop.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapters.formats import AdapterWeights
from studio.core.errors import CheckpointError, ConfigError
from studio.core.families.base import Family
from studio.core.jsonutil import jsonable
from trainer.config import NetworkConfig

# peft (and torch with it) is imported inside the functions that use it: trainer.loop imports this
# module, and trainer.cli that one, so `python -m trainer --help` would otherwise load them.

METHOD_BUILDERS: dict[str, Callable[..., Any]] = {}


def register_method(name: str, builder: Callable[..., Any]) -> None:
    if name in METHOD_BUILDERS:
        raise ValueError(f"adapter method {name!r} is already registered")
    METHOD_BUILDERS[name] = builder


def target_modules(network: NetworkConfig, family: Family, component: str) -> list[str]:
    """Module names for ``component`` (a pipeline component name): for the denoiser a preset's names
    or the user's list, for a text encoder the family's names for it.

    Text encoders need their own names (q_proj... in CLIP): a preset of the denoiser's names would
    match nothing there.
    """
    if component != family.denoiser:
        encoder = {te.component: te for te in family.text_encoders}[component]
        return list(encoder.target_modules or family.text_encoder_target_modules)
    if isinstance(network.target_modules, str):
        if network.target_modules not in family.target_modules:
            raise ConfigError(f"{family.display_name} has no target preset {network.target_modules!r}: its presets are "
                              f"{', '.join(family.target_modules)}, or give a list of module names",
                              option="network.target_modules")
        return list(family.target_modules[network.target_modules])
    return list(network.target_modules)


def _lora(network: NetworkConfig, targets: list[str], *, use_dora: bool = False):
    from peft import LoraConfig

    # init_lora_weights=True: B = 0, so step 0 is exactly the base model (kohya and diffusers do the same).
    return LoraConfig(r=network.rank, lora_alpha=network.lora_alpha, lora_dropout=network.dropout,
                      target_modules=targets, init_lora_weights=True, use_dora=use_dora)


def _dora(network: NetworkConfig, targets: list[str]):
    return _lora(network, targets, use_dora=True)


def _loha(network: NetworkConfig, targets: list[str]):
    from peft import LoHaConfig

    # use_effective_conv2d: LyCORIS' default for conv layers (a Tucker core instead of a flattened kernel).
    return LoHaConfig(r=network.rank, alpha=network.lora_alpha, module_dropout=network.dropout,
                      target_modules=targets, use_effective_conv2d=True, init_weights=True)


def _lokr(network: NetworkConfig, targets: list[str]):
    from peft import LoKrConfig

    return LoKrConfig(r=network.rank, alpha=network.lora_alpha, module_dropout=network.dropout,
                      target_modules=targets, use_effective_conv2d=True, init_weights=True)


register_method("lora", _lora)
register_method("dora", _dora)
register_method("loha", _loha)
register_method("lokr", _lokr)


def peft_config(network: NetworkConfig, family: Family, component: str):
    """The peft config training ``network`` on ``component`` (a pipeline component name) of a ``family`` model."""
    return METHOD_BUILDERS[network.adapter_type](network, target_modules(network, family, component))


def inject(model, config, adapter_name: str = "default"):
    """Add trainable adapter layers to ``model`` (denoiser or text encoder) in place; only they train.

    ``peft.inject_adapter_in_model`` handles every method (diffusers' ``add_adapter`` is LoRA-minded).
    Raises a clear error when no module matches the targets.
    """
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    try:
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    except ValueError as e:
        raise ConfigError(f"network.target_modules: {e}", option="network.target_modules") from None
    for name, p in model.named_parameters():
        # peft marks adapter parameters trainable; everything else stays frozen.
        p.requires_grad_(f".{adapter_name}" in name and _is_adapter_param(name))
    return [p for p in model.parameters() if p.requires_grad]


_ADAPTER_PARTS = ("lora_A", "lora_B", "lora_magnitude_vector", "hada_", "lokr_")


def _is_adapter_param(name: str) -> bool:
    return any(part in name for part in _ADAPTER_PARTS)


def adapter_state_dict(model, adapter_name: str = "default") -> dict[str, Any]:
    """The adapter's tensors with peft's saved key names (no adapter name), detached on CPU in float32."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {k: v.detach().to("cpu").float().contiguous() for k, v in sd.items()}


def load_adapter_state_dict(model, state: dict[str, Any], adapter_name: str = "default") -> None:
    """Put saved adapter tensors back into an injected model (resume); every key must land."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise CheckpointError(f"checkpoint holds {len(unexpected)} tensor(s) this network does not have, e.g. "
                              f"{unexpected[0]}: it was saved with other network settings")


def canonical_weights(states: dict[str, dict[str, Any]], configs: dict[str, Any], adapter_type: str):
    """``{component: peft state dict}`` + ``{component: peft config}`` -> ``AdapterWeights``.

    Keys become ``<component>.<module>.<part>``; a DoRA magnitude gets ``.weight`` (without it the
    text encoder's magnitudes are silently re-initialised on load: FIELD-NOTES.md).
    """
    tensors = {}
    for component, sd in states.items():
        for key, t in sd.items():
            if key.endswith(".lora_magnitude_vector"):
                key += ".weight"
            tensors[f"{component}.{key}"] = t
    packed = {}
    for component, config in configs.items():
        d = jsonable(config.to_dict())
        d["peft_type"] = adapter_type.upper() if adapter_type in ("loha", "lokr") else "LORA"
        d["target_modules"] = sorted(d["target_modules"]) if isinstance(d.get("target_modules"), list) \
            else d.get("target_modules")
        # Runtime-only fields mean nothing in a file and some peft versions refuse unknown ones.
        for key in ("runtime_config", "base_model_name_or_path", "revision", "task_type", "inference_mode"):
            d.pop(key, None)
        packed[component] = d
    return AdapterWeights(tensors=dict(sorted(tensors.items())), configs=packed, adapter_type=adapter_type)


__all__ = [
    "METHOD_BUILDERS",
    "adapter_state_dict",
    "canonical_weights",
    "inject",
    "load_adapter_state_dict",
    "peft_config",
    "register_method",
    "target_modules",
]
