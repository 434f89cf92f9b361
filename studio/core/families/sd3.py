"""Stable Diffusion 3 and 3.5 (Medium, Large, Large Turbo; the embedded ``tiny-sd3`` is one too).

An MMDiT flow-matching transformer (``SD3Transformer2DModel``: joint blocks where image and text tokens
keep their own weights and attend together; SD3.5 Medium adds a second, image-only attention in its
first blocks and RMS-normalised q/k) conditioned on three encoders: ``text_encoder`` (CLIP ViT-L) and
``text_encoder_2`` (OpenCLIP ViT-bigG), both with projection, and ``text_encoder_3`` (T5-XXL). The
CLIP encoders' penultimate hidden states are concatenated along the channels, zero-padded to T5's
width and put before T5's tokens (``encoder_hidden_states``); their pooled projections, concatenated,
are ``pooled_projections``. Latents are patchified inside the transformer (no packing here), and the
timestep is the noise level times 1000. Training is rectified flow, as FLUX's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from studio.core.families import architectures
from studio.core.families.base import Family, OriginalModule, TextEncoder, TrainingPreset, in_block

# diffusers' SD3 LoRA script targets the attention projections of both streams (and attn2 of SD3.5 M).
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
ATTENTION_MLP = ATTENTION + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
ALL_LINEAR = ATTENTION_MLP + ("norm1.linear", "norm1_context.linear")
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
T5_TARGETS = ("q", "k", "v", "o")
PENULTIMATE = -2


def condition(components: Mapping[str, Any], prompts: list[str], max_sequence_length: int | None = None
              ) -> dict[str, Any]:
    """Prompts -> ``encoder_hidden_states`` and ``pooled_projections`` as
    ``StableDiffusion3Pipeline.encode_prompt`` computes them (no clip skip; same padding and truncation)."""
    import torch

    hidden, pooled = [], []
    for te, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        tokenizer, encoder = components[tok], components[te]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        pooled.append(out[0])  # CLIPTextModelWithProjection's text_embeds
        hidden.append(out.hidden_states[PENULTIMATE])
    clip = torch.cat(hidden, dim=-1)
    t5_tokenizer, t5 = components["tokenizer_3"], components["text_encoder_3"]
    length = SD3.t5_length(t5_tokenizer, max_sequence_length)
    ids = t5_tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                       add_special_tokens=True, return_tensors="pt").input_ids
    t5_hidden = t5(ids.to(t5.device))[0]
    clip = torch.nn.functional.pad(clip, (0, t5_hidden.shape[-1] - clip.shape[-1]))
    return {"encoder_hidden_states": torch.cat([clip, t5_hidden], dim=-2), "pooled_projections": torch.cat(pooled, -1)}


def call_denoiser(denoiser, latents, sigmas, conditioning: Mapping[str, Any], latent_size=None):
    """The transformer at noise levels ``sigmas``: SD3's timestep is sigma x 1000 (what the pipeline passes)."""
    return denoiser(hidden_states=latents, timestep=sigmas.to(latents.dtype) * 1000,
                    encoder_hidden_states=conditioning["encoder_hidden_states"],
                    pooled_projections=conditioning["pooled_projections"], return_dict=False)[0]


def sampling_options(pipe, guidance_scale: float, negative_prompt: str, recommended: Mapping[str, Any]) -> dict:
    """Classic CFG against the negative prompt, with T5 read to the length training used."""
    return {"guidance_scale": guidance_scale, "negative_prompt": negative_prompt or None,
            "max_sequence_length": SD3.t5_length(pipe.tokenizer_3)}


# Stability's MMDiT names (sd3.5_*.safetensors, ComfyUI, kohya's lora_unet_ keys) -> diffusers', per block.
_X = {"attn.qkv": OriginalModule(("attn.to_q", "attn.to_k", "attn.to_v")), "attn.proj": "attn.to_out.0",
      "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2", "adaLN_modulation.1": "norm1.linear"}
_X_DUAL = {"attn2.qkv": OriginalModule(("attn2.to_q", "attn2.to_k", "attn2.to_v")), "attn2.proj": "attn2.to_out.0"}
_CONTEXT = {"attn.qkv": OriginalModule(("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
            "attn.proj": "attn.to_add_out", "mlp.fc1": "ff_context.net.0.proj", "mlp.fc2": "ff_context.net.2",
            "adaLN_modulation.1": "norm1_context.linear"}
# The last block's context stream only feeds attention: no output projection or MLP, and its
# modulation is a final-layer one, (shift, scale) in Stability's order, (scale, shift) in diffusers'.
_CONTEXT_LAST = {"attn.qkv": _CONTEXT["attn.qkv"],
                 "adaLN_modulation.1": OriginalModule(("norm1_context.linear",), swap_halves=True)}
_EMBEDDERS = {"context_embedder": "context_embedder",
              "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
              "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
              "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
              "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
              "final_layer.linear": "proj_out",
              "final_layer.adaLN_modulation.1": OriginalModule(("norm_out.linear",), swap_halves=True)}


def original_modules(config) -> dict[str, str | OriginalModule]:
    """Every Stability MMDiT module name of a transformer with ``config``'s depth -> the diffusers module(s)."""
    out: dict[str, str | OriginalModule] = dict(_EMBEDDERS)
    dual = set(getattr(config, "dual_attention_layers", ()) or ())
    for i in range(config.num_layers):
        x = {**_X, **(_X_DUAL if i in dual else {})}
        context = _CONTEXT_LAST if i == config.num_layers - 1 else _CONTEXT
        for stream, table in (("x_block", x), ("context_block", context)):
            for theirs, ours in table.items():
                out[f"joint_blocks.{i}.{stream}.{theirs}"] = in_block(f"transformer_blocks.{i}", ours)
    return out



SD3 = Family(
    name="sd3",
    display_name="Stable Diffusion 3",
    pipelines=dict(zip(("text2img", "img2img", "inpaint"), architectures.SD3.pipeline_class_names, strict=True)),
    native_resolution=1024,
    latent_granularity=16,  # 8x VAE, then 2x2 patches
    target_modules={"attention": ATTENTION, "attention+mlp": ATTENTION_MLP, "all-linear": ALL_LINEAR},
    text_encoder_target_modules=CLIP_TARGETS,
    kohya_base_model_version="sd3",
    modelspec_architecture="stable-diffusion-v3-medium",
    default_guidance_scale=4.5,
    architecture=architectures.SD3,
    # SD3.5 Medium's transformer and text-encoder configs (stabilityai/stable-diffusion-3.5-medium).
    reference_config_dir=Path(__file__).resolve().parent / "configs" / "sd3",
    condition=condition,
    # StableDiffusion3Pipeline's default T5 length.
    t5_max_length=256,
    call_denoiser=call_denoiser,
    sampling_options=sampling_options,
    samplers={"Euler": ("FlowMatchEulerDiscreteScheduler", {})},
    denoiser="transformer",
    denoiser_label="transformer",
    # kohya's SD3 files say lora_unet_ with Stability's names (``original_modules``); OneTrainer's
    # lora_transformer_ with diffusers' names.
    denoiser_kohya_prefixes=("lora_unet_", "lora_transformer_"),
    original_modules=original_modules,
    text_encoders=(
        TextEncoder("text_encoder", "tokenizer", ("lora_te1_",), kind="clip_with_projection",
                    target_modules=CLIP_TARGETS),
        TextEncoder("text_encoder_2", "tokenizer_2", ("lora_te2_",), kind="clip_with_projection",
                    target_modules=CLIP_TARGETS),
        # diffusers' SD3 loader carries no T5 LoRA: refused by name, as on FLUX.
        TextEncoder("text_encoder_3", "tokenizer_3", ("lora_te3_",), kind="t5", lora=False, target_modules=T5_TARGETS),
    ),
    objective="flow_matching",
    training_scheduler="FlowMatchEulerDiscreteScheduler",
    hub_tags=("sd3", "sd3-diffusers"),
    # SD3/3.5 weights, and adapters derived from them, fall under the Stability AI Community License.
    base_model_licenses={
        repo: {"license": "other", "license_name": "stabilityai-ai-community",
               "license_link": f"https://huggingface.co/{repo}/blob/main/LICENSE.md"}
        for repo in ("stabilityai/stable-diffusion-3.5-large", "stabilityai/stable-diffusion-3.5-medium",
                     "stabilityai/stable-diffusion-3.5-large-turbo", "stabilityai/stable-diffusion-3-medium-diffusers")
    },
    # diffusers' SD3 LoRA README: rank 4-16, lr 1e-4 at 1024 px, transformer only.
    recommended={"network.rank": 16, "training.learning_rate": 1e-4, "dataset.resolution": 1024,
                 "network.train_text_encoder": False},
    # Within the README's rank 4-16 at 1e-4; batch 1 at 1024 px (2 for the long run, where memory allows).
    training_presets={
        "quick": TrainingPreset(max_train_steps=500, rank=8, learning_rate=1e-4, train_batch_size=1),
        "balanced": TrainingPreset(max_train_steps=1500, rank=16, learning_rate=1e-4, train_batch_size=1,
                                   lr_scheduler="cosine", lr_warmup_steps=100),
        "high quality": TrainingPreset(max_train_steps=3000, rank=16, learning_rate=1e-4, train_batch_size=2,
                                       lr_scheduler="cosine", lr_warmup_steps=150),
    },
)
