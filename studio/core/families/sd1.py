"""Stable Diffusion 1.x (SD 1.4, 1.5 and their fine-tunes; the embedded tiny model is one too).

One CLIP ViT-L/14 text encoder (last hidden state, 77 tokens), a UNet2DConditionModel denoiser with
epsilon prediction, and a VAE with 8x downsampling (4x for the tiny model). Native resolution
512 px. ``configs/sd1/`` holds SD-1.5's component configs so that single-file checkpoints load
offline (the tokenizer comes from the embedded model: it is SD-1's real vocabulary).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from studio.core.embedded import TINY_MODEL_DIR
from studio.core.families import architectures
from studio.core.families.base import Family, SingleFileComponent, SingleFileLayout, TextEncoder, TrainingPreset

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
# LoCon-style: attention plus the ResNet convolutions, the projections around the transformer
# blocks and the time embedding (what kohya's conv_dim reaches on SD-1).
ATTENTION_CONV = ATTENTION + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
                              "conv_shortcut", "time_emb_proj")
TEXT_ENCODER = ("q_proj", "k_proj", "v_proj", "out_proj")
# SD-1.5's component configs: the single-file layout's and the full-size reference architecture's.
CONFIGS = Path(__file__).resolve().parent / "configs" / "sd1"


def encode_prompts(tokenizer, text_encoder, prompts: list[str]):
    """Prompts -> the ``encoder_hidden_states`` SD-1's UNet expects (last hidden state, 77 tokens).

    The same padding and truncation as ``StableDiffusionPipeline.encode_prompt``, so training sees
    exactly what inference will.
    """
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def condition(components: Mapping[str, Any], prompts: list[str]) -> dict[str, Any]:
    """SD-1's UNet takes one conditioning tensor: ``encoder_hidden_states`` (batch x 77 x 768)."""
    return {"encoder_hidden_states": encode_prompts(components["tokenizer"], components["text_encoder"], prompts)}


# The original Stable Diffusion (LDM) checkpoint layout that A1111 and ComfyUI read and write. The
# format name is what the studio writes into the files it exports; files already written carry it,
# so it never changes. The tokenizer is the embedded model's: SD-1's real CLIP vocabulary.
SINGLE_FILE = SingleFileLayout(
    format="sd1-ldm-single-file",
    components=(
        SingleFileComponent("unet", "model.diffusion_model.", "UNet2DConditionModel", converter="ldm_unet"),
        SingleFileComponent("vae", "first_stage_model.", "AutoencoderKL", converter="ldm_vae"),
        SingleFileComponent("text_encoder", "cond_stage_model.transformer.", "CLIPTextModel",
                            converter="ldm_clip_text", library="transformers", model_type="clip_text_model"),
    ),
    config_dir=CONFIGS,
    tokenizers={"tokenizer": TINY_MODEL_DIR / "tokenizer"},
)


SD1 = Family(
    name="sd1",
    display_name="Stable Diffusion 1.x",
    pipelines=dict(zip(("text2img", "img2img", "inpaint"), architectures.SD1.pipeline_class_names, strict=True)),
    native_resolution=512,
    latent_granularity=8,
    target_modules={"attention": ATTENTION, "attention+conv": ATTENTION_CONV},
    text_encoder_target_modules=TEXT_ENCODER,
    kohya_base_model_version="sd_v1",
    modelspec_architecture="stable-diffusion-v1",
    single_file=SINGLE_FILE,
    reference_config_dir=CONFIGS,
    architecture=architectures.SD1,
    condition=condition,
    denoiser="unet",
    denoiser_label="UNet",
    denoiser_kohya_prefixes=("lora_unet_",),
    text_encoders=(TextEncoder("text_encoder", "tokenizer", ("lora_te_", "lora_te1_"), kind="clip",
                               target_modules=TEXT_ENCODER),),
    objective="epsilon",
    training_scheduler="DDPMScheduler",
    hub_tags=("stable-diffusion", "stable-diffusion-diffusers"),
    recommended={"network.rank": 8, "training.learning_rate": 1e-4, "dataset.resolution": 512},
    # kohya-style SD-1.5 runs: 1,500 to 3,000 steps of batch 2 at 1e-4; "balanced" is the recommendation
    # above. Batch 2 at 512 px fits an 8 GB card.
    training_presets={
        "quick": TrainingPreset(max_train_steps=500, rank=8, learning_rate=1e-4, train_batch_size=2),
        "balanced": TrainingPreset(max_train_steps=1500, rank=8, learning_rate=1e-4, train_batch_size=2,
                                   lr_scheduler="cosine", lr_warmup_steps=100),
        "high quality": TrainingPreset(max_train_steps=3000, rank=16, learning_rate=1e-4, train_batch_size=4,
                                       lr_scheduler="cosine", lr_warmup_steps=150),
    },
    # The studio shows images as the user asked for them; SD-1's NSFW checker is off (as in A1111).
    pipeline_options={"safety_checker": None, "requires_safety_checker": False},
)
