"""Stable Diffusion XL (SDXL 1.0 base and its fine-tunes; the embedded ``tiny-sdxl`` is one too).

Two CLIP text encoders: ``text_encoder`` (CLIP ViT-L, ``CLIPTextModel``) and ``text_encoder_2``
(OpenCLIP ViT-bigG, ``CLIPTextModelWithProjection``). The UNet reads both encoders' penultimate
hidden states concatenated along the channels (768 + 1280 = 2048 on the real model) and, through
``added_cond_kwargs``, the second encoder's pooled projection (``text_embeds``) and six size numbers
(``time_ids``: original height and width, crop top and left, target height and width), the
micro-conditioning that lets SDXL train on every bucket without learning its crops. Epsilon
prediction on SD's noise schedule; native resolution 1024 px; VAE 8x (4x for the tiny model).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from studio.core.embedded import TINY_MODEL_DIR
from studio.core.families import architectures
from studio.core.families.base import Family, SingleFileComponent, SingleFileLayout, TextEncoder, TrainingPreset
from studio.core.families.sd1 import ATTENTION, ATTENTION_CONV, TEXT_ENCODER

# CLIP's hidden_states[-2]: SDXL conditions on the penultimate layer of both encoders.
PENULTIMATE = -2


def condition(components: Mapping[str, Any], prompts: list[str]) -> dict[str, Any]:
    """Prompts -> ``encoder_hidden_states`` (both encoders' penultimate layers, concatenated) and
    ``text_embeds`` (the second encoder's pooled projection), as ``StableDiffusionXLPipeline.encode_prompt``
    computes them (same padding and truncation; no clip skip)."""
    import torch  # the family module is imported without torch; the hook runs only with models loaded

    hidden, pooled = [], None
    for te in SDXL.text_encoders:
        tokenizer, encoder = components[te.tokenizer], components[te.component]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        if te.kind == "clip_with_projection":
            pooled = out[0]  # CLIPTextModelWithProjection's text_embeds: batch x projection_dim
        hidden.append(out.hidden_states[PENULTIMATE])
    return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}


def size_conditioning(original_size: tuple[int, int], crop_top_left: tuple[int, int],
                      target_size: tuple[int, int]) -> dict[str, Any]:
    """SDXL's micro-conditioning for one image: ``time_ids`` = original (h, w) + crop (top, left) + target (h, w)."""
    import torch

    return {"time_ids": torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)}


def call_denoiser(denoiser, latents, timesteps, conditioning: Mapping[str, Any], latent_size=None):
    """SDXL's UNet takes the pooled embedding and the size numbers as ``added_cond_kwargs``."""
    added = {"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]}
    return denoiser(latents, timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"],
                    added_cond_kwargs=added, return_dict=False)[0]


# SDXL 1.0 base's component configs (stabilityai/stable-diffusion-xl-base-1.0): the single-file
# layout's, and the full-size reference architecture's for the meta-device check.
CONFIGS = Path(__file__).resolve().parent / "configs" / "sdxl"

# Stability's SGM checkpoint layout (sd_xl_base_1.0.safetensors, and what A1111/ComfyUI/Civitai share):
# the UNet in LDM names (plus label_emb for the size embedding), the VAE as SD's, CLIP-L as
# transformers keeps it, and the second encoder in OpenCLIP's layout. The format name is written into
# exported files, so it never changes. Both tokenizers are SD's real vocabulary (the embedded
# model's); SDXL's second one pads with "!".
SINGLE_FILE = SingleFileLayout(
    format="sdxl-sgm-single-file",
    components=(
        SingleFileComponent("unet", "model.diffusion_model.", "UNet2DConditionModel", converter="ldm_unet"),
        SingleFileComponent("vae", "first_stage_model.", "AutoencoderKL", converter="ldm_vae"),
        SingleFileComponent("text_encoder", "conditioner.embedders.0.transformer.", "CLIPTextModel",
                            converter="ldm_clip_text", library="transformers", model_type="clip_text_model"),
        SingleFileComponent("text_encoder_2", "conditioner.embedders.1.model.", "CLIPTextModelWithProjection",
                            converter="open_clip_text", library="transformers", model_type="clip_text_model"),
    ),
    config_dir=CONFIGS,
    tokenizers={"tokenizer": TINY_MODEL_DIR / "tokenizer", "tokenizer_2": TINY_MODEL_DIR / "tokenizer"},
    tokenizer_options={"tokenizer_2": {"pad_token": "!"}},
)


SDXL = Family(
    name="sdxl",
    display_name="Stable Diffusion XL",
    pipelines=dict(zip(("text2img", "img2img", "inpaint"), architectures.SDXL.pipeline_class_names, strict=True)),
    native_resolution=1024,
    latent_granularity=8,
    # diffusers' SDXL LoRA scripts target the attention projections; LoCon reaches the convolutions too.
    target_modules={"attention": ATTENTION, "attention+conv": ATTENTION_CONV},
    text_encoder_target_modules=TEXT_ENCODER,
    kohya_base_model_version="sdxl_base_v1-0",
    modelspec_architecture="stable-diffusion-xl-v1-base",
    default_guidance_scale=5.0,
    architecture=architectures.SDXL,
    reference_config_dir=CONFIGS,
    single_file=SINGLE_FILE,
    condition=condition,
    size_conditioning=size_conditioning,
    call_denoiser=call_denoiser,
    denoiser="unet",
    denoiser_label="UNet",
    denoiser_kohya_prefixes=("lora_unet_",),
    text_encoders=(
        TextEncoder("text_encoder", "tokenizer", ("lora_te1_",), kind="clip", target_modules=TEXT_ENCODER),
        TextEncoder("text_encoder_2", "tokenizer_2", ("lora_te2_",), kind="clip_with_projection",
                    target_modules=TEXT_ENCODER),
    ),
    objective="epsilon",
    training_scheduler="DDPMScheduler",
    hub_tags=("stable-diffusion-xl", "stable-diffusion-xl-diffusers"),
    # kohya's SDXL guidance: UNet only, text-encoder outputs cached (docs/train_SDXL-en.md).
    recommended={"network.rank": 8, "training.learning_rate": 1e-4, "dataset.resolution": 1024,
                 "network.train_text_encoder": False},
    # The same step counts as SD-1 at batch 1: a 1024 px SDXL step takes several times the memory.
    training_presets={
        "quick": TrainingPreset(max_train_steps=500, rank=8, learning_rate=1e-4, train_batch_size=1),
        "balanced": TrainingPreset(max_train_steps=1500, rank=8, learning_rate=1e-4, train_batch_size=1,
                                   lr_scheduler="cosine", lr_warmup_steps=100),
        "high quality": TrainingPreset(max_train_steps=3000, rank=16, learning_rate=1e-4, train_batch_size=2,
                                       lr_scheduler="cosine", lr_warmup_steps=150),
    },
)
