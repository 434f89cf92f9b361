"""Every model architecture the studio can name, and how to recognise each from files alone.

An :class:`Architecture` is what can be told about a model tree without loading it: the key
patterns and tensor widths that give away an adapter made for it, the key prefixes of its original
(LDM/single-file) checkpoints, the pipeline class names ``model_index.json`` gives it, and the
kohya prefixes of its components. A supported :class:`~studio.core.families.base.Family` points at
its architecture; the others are here so that an SDXL or Flux LoRA offered to an SD-1 base is named
for what it is instead of failing on a shape.

Adapters for one ``module_tree`` cannot load on another: SD-1 and SD-2 share the SD UNet's tree and
are told apart by widths only, against the base's own modules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# The SD UNet's cross-attention projections (they read the text embedding, so their input width
# names the text encoder) and a CLIP encoder's attention projections (input width = hidden size).
_CROSS_ATTENTION = re.compile(r"attn2[._]to_[kv]$")
_CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class Architecture:
    """What identifies one model architecture in files."""

    name: str
    display_name: str
    # Adapters load only onto the same tree: "sd-unet" (SD-1 and SD-2), "sdxl-unet", "mmdit", "flux", "dit".
    module_tree: str
    # (regex searched in a raw adapter key, what a match shows): enough on its own to name the architecture.
    lora_key_patterns: tuple[tuple[str, str], ...] = ()
    # Input width of the UNet's cross-attention to_k/to_v, and of the (first) CLIP encoder's q/k/v.
    cross_attention_dim: int | None = None
    text_encoder_width: int | None = None
    # Key prefixes found only in this architecture's original single-file checkpoints.
    single_file_prefixes: tuple[str, ...] = ()
    # ``_class_name`` values of its diffusers pipelines (model_index.json).
    pipeline_class_names: tuple[str, ...] = ()
    # kohya-style key prefix -> component, for an architecture no family describes yet (a family's
    # own denoiser and text encoders carry its prefixes; see ``families.kohya_prefixes``).
    kohya_prefixes: Mapping[str, str] = field(default_factory=dict)


SD1 = Architecture(
    name="sd1", display_name="SD-1.x", module_tree="sd-unet", cross_attention_dim=768, text_encoder_width=768,
    single_file_prefixes=("cond_stage_model.transformer.",),
    pipeline_class_names=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                          "StableDiffusionInpaintPipeline"),
    # kohya prefixes: the SD-1 family's text encoders and denoiser say them (studio/core/families/sd1.py)
)
SD2 = Architecture(
    name="sd2", display_name="SD-2.x", module_tree="sd-unet", cross_attention_dim=1024, text_encoder_width=1024,
    # SD-2's OpenCLIP ViT-H text tower in the original checkpoints
    single_file_prefixes=("cond_stage_model.model.",),
    kohya_prefixes={"lora_unet_": "unet", "lora_te_": "text_encoder"},
)
SDXL = Architecture(
    name="sdxl", display_name="SDXL", module_tree="sdxl-unet", cross_attention_dim=2048, text_encoder_width=1280,
    lora_key_patterns=((r"^(text_encoder_2\.|lora_te2_)", "a second text encoder"),
                       (r"add_embedding|^lora_unet_(input_blocks|output_blocks|middle_block|label_emb)",
                        "SDXL UNet naming")),
    single_file_prefixes=("conditioner.embedders.1.model.",),
    pipeline_class_names=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                          "StableDiffusionXLInpaintPipeline"),
    kohya_prefixes={"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"},
)
SD3 = Architecture(
    name="sd3", display_name="SD3", module_tree="mmdit",
    lora_key_patterns=((r"joint_blocks", "SD3 joint blocks"),),
    single_file_prefixes=("model.diffusion_model.joint_blocks.",),
    pipeline_class_names=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                          "StableDiffusion3InpaintPipeline"),
    kohya_prefixes={"lora_transformer_": "transformer", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                    "lora_te3_": "text_encoder_3"},
)
FLUX = Architecture(
    name="flux", display_name="Flux", module_tree="flux",
    lora_key_patterns=((r"double_blocks|single_blocks|single_transformer_blocks",
                        "Flux double/single-stream blocks"),),
    single_file_prefixes=("double_blocks.", "model.diffusion_model.double_blocks."),
    pipeline_class_names=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"),
    kohya_prefixes={"lora_transformer_": "transformer", "lora_te1_": "text_encoder"},
)
DIT = Architecture(
    name="dit", display_name="a transformer (DiT) model such as Flux or SD3", module_tree="dit",
    lora_key_patterns=((r"^(transformer\.|lora_transformer_)", "a transformer denoiser, not a UNet"),),
    kohya_prefixes={"lora_transformer_": "transformer"},
)

# Recognition order: the most specific key patterns first (a Flux key also starts with
# "transformer."), widths last.
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (FLUX, SD3, DIT, SDXL, SD1, SD2)}

# Dotted key prefixes of adapters spelt in a denoiser's original module names (ComfyUI's and BFL's Flux
# files: diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight) -> the component they patch.
ORIGINAL_PREFIXES = {"diffusion_model.": "transformer"}

# Every component an adapter file may name, in the order the studio lists them.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")
DENOISERS = ("unet", "transformer")


def architecture(name: str) -> Architecture | None:
    return ARCHITECTURES.get(name)


def display_name(name: str | None) -> str | None:
    """``"SDXL"`` for ``"sdxl"``; None for None; an unknown name as it is."""
    if name is None:
        return None
    arch = ARCHITECTURES.get(name)
    return arch.display_name if arch else name


# "dit" says only "a transformer denoiser": any transformer tree may be the one.
_TRANSFORMER_TREES = ("flux", "mmdit", "dit")


def other_tree(name: str | None, tree_of: str) -> bool:
    """Whether architecture ``name`` has another module tree than architecture ``tree_of`` (a generic
    transformer adapter is not known to be another tree than Flux's or SD3's)."""
    theirs, ours = ARCHITECTURES.get(name or ""), ARCHITECTURES.get(tree_of)
    if theirs is None or ours is None:
        return False
    if "dit" in (theirs.module_tree, ours.module_tree):
        return not (theirs.module_tree in _TRANSFORMER_TREES and ours.module_tree in _TRANSFORMER_TREES)
    return theirs.module_tree != ours.module_tree


def own_tree(name: str | None) -> bool:
    """Whether architecture ``name`` is the only one with its module tree, so that an adapter's keys
    name it without a base to compare widths against (SD-1 and SD-2 share the SD UNet's tree)."""
    arch = ARCHITECTURES.get(name or "")
    return arch is not None and sum(a.module_tree == arch.module_tree for a in ARCHITECTURES.values()) == 1


def by_cross_attention_dim(width: int) -> Architecture | None:
    return next((a for a in ARCHITECTURES.values() if a.cross_attention_dim == width), None)


def by_text_encoder_width(width: int) -> Architecture | None:
    return next((a for a in ARCHITECTURES.values() if a.text_encoder_width == width), None)


def recognise_lora(keys: Iterable[str], modules: Iterable[tuple[str, str, int]] = ()) -> tuple[str | None, str]:
    """(architecture name, evidence) of an adapter from its keys, and from ``modules``: (component,
    module name, input width of its down/A matrix) triples. (None, "") when they do not tell."""
    keys = list(keys)
    for arch in ARCHITECTURES.values():
        for pattern, why in arch.lora_key_patterns:
            rx = re.compile(pattern)
            hit = next((k for k in keys if rx.search(k)), None)
            if hit is not None:
                return arch.name, f"key {hit!r} ({why})"
    for component, name, width in modules:
        if component == "unet" and _CROSS_ATTENTION.search(name):
            arch = by_cross_attention_dim(width)
            if arch is not None:
                return arch.name, f"cross-attention dim {width}"
        if component == "text_encoder" and name.endswith(_CLIP_ATTENTION):
            arch = by_text_encoder_width(width)
            if arch is not None:
                return arch.name, f"text encoder width {width}"
    return None, ""


def recognise_single_file(keys: Iterable[str]) -> tuple[str | None, str]:
    """(architecture name, evidence) of a full checkpoint from its tensor names; (None, "") if unknown."""
    keys = list(keys)
    for arch in ARCHITECTURES.values():
        for prefix in arch.single_file_prefixes:
            hit = next((k for k in keys if k.startswith(prefix)), None)
            if hit is not None:
                return arch.name, f"key {hit!r}"
    return None, ""


def recognise_pipeline_class(class_name: str) -> Architecture | None:
    """The architecture whose diffusers pipelines include ``class_name`` (model_index.json's ``_class_name``)."""
    return next((a for a in ARCHITECTURES.values() if class_name in a.pipeline_class_names), None)
