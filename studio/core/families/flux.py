"""FLUX.1 (dev, schnell and their fine-tunes; the embedded ``tiny-flux`` is one too).

A flow-matching transformer (``FluxTransformer2DModel``: double-stream blocks where text and image
tokens keep their own weights, then single-stream blocks over both) conditioned on two encoders:
``text_encoder`` (CLIP ViT-L, only its pooled output, as ``pooled_projections``) and
``text_encoder_2`` (T5-XXL, its last hidden state, as ``encoder_hidden_states``). The VAE's latents
are packed 2x2 into tokens (a 16-channel latent becomes 64 features a token), positions go in as
``img_ids``/``txt_ids`` (rotary embeddings), the timestep is the noise level sigma in [0, 1], and
FLUX.1-dev also reads a ``guidance`` number (its distilled CFG; schnell has no such input).
Training is rectified flow: ``noisy = (1 - sigma) x + sigma e``, target ``e - x``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from studio.core.families import architectures
from studio.core.families.base import Family, OriginalModule, TextEncoder, TrainingPreset, in_block

# diffusers' Flux LoRA scripts target the attention projections of both streams.
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# + the MLPs of both streams and the single blocks' fused projections.
ATTENTION_MLP = ATTENTION + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                             "proj_mlp", "proj_out")
# Every linear layer inside the blocks, modulation included (ai-toolkit's choice).
ALL_LINEAR = ATTENTION_MLP + ("norm1.linear", "norm1_context.linear", "norm.linear")
CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
T5_TARGETS = ("q", "k", "v", "o")
# The ``guidance`` number training feeds a guidance-distilled transformer (kohya's recommendation for
# FLUX.1-dev LoRAs; the embedded tiny-flux was trained at it and samples with true CFG instead).
TRAINING_GUIDANCE = 1.0


def condition(components: Mapping[str, Any], prompts: list[str], max_sequence_length: int | None = None
              ) -> dict[str, Any]:
    """Prompts -> ``pooled_projections`` (CLIP's pooled output) and ``encoder_hidden_states`` (T5's last
    hidden state), as ``FluxPipeline.encode_prompt`` computes them (same padding and truncation)."""
    clip_tokenizer, clip = components["tokenizer"], components["text_encoder"]
    ids = clip_tokenizer(prompts, padding="max_length", max_length=clip_tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    pooled = clip(ids.to(clip.device), output_hidden_states=False).pooler_output
    t5_tokenizer, t5 = components["tokenizer_2"], components["text_encoder_2"]
    length = FLUX.t5_length(t5_tokenizer, max_sequence_length)
    ids = t5_tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                       return_tensors="pt").input_ids
    hidden = t5(ids.to(t5.device), output_hidden_states=False)[0]
    return {"encoder_hidden_states": hidden, "pooled_projections": pooled}


def pack_latents(latents):
    """(batch, C, H, W) latents -> (batch, H/2 * W/2, 4C) tokens, as ``FluxPipeline._pack_latents``."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens, height: int, width: int):
    """The inverse of :func:`pack_latents`, for a latent grid of ``height`` x ``width``."""
    b, _, features = tokens.shape
    tokens = tokens.view(b, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return tokens.reshape(b, features // 4, height, width)


def image_ids(height: int, width: int, device=None, dtype=None):
    """Each packed token's (0, row, column), as ``FluxPipeline._prepare_latent_image_ids`` for a latent
    grid of ``height`` x ``width``."""
    import torch

    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def call_denoiser(denoiser, tokens, sigmas, conditioning: Mapping[str, Any], latent_size: tuple[int, int]):
    """The transformer on packed ``tokens`` at noise levels ``sigmas`` (what the pipeline passes as
    ``timestep / 1000``), with text ids all zero and, for a guidance-distilled model, the guidance number."""
    import torch

    hidden = conditioning["encoder_hidden_states"]
    guidance = None
    if denoiser.config.guidance_embeds:
        value = conditioning.get("guidance", TRAINING_GUIDANCE)
        guidance = torch.full((tokens.shape[0],), float(value), device=tokens.device, dtype=torch.float32)
    return denoiser(
        hidden_states=tokens, timestep=sigmas.to(tokens.dtype), guidance=guidance,
        pooled_projections=conditioning["pooled_projections"], encoder_hidden_states=hidden,
        txt_ids=torch.zeros(hidden.shape[1], 3, device=tokens.device, dtype=tokens.dtype),
        img_ids=image_ids(*latent_size, device=tokens.device, dtype=tokens.dtype), return_dict=False,
    )[0]


def sampling_options(pipe, guidance_scale: float, negative_prompt: str, recommended: Mapping[str, Any]) -> dict:
    """The pipeline-call options a request's CFG and negative prompt become.

    A guidance-distilled model (FLUX.1-dev) takes the CFG as its ``guidance`` input and needs no
    negative pass; a model whose ``lora_studio.json`` says ``"true_cfg": true`` (the embedded
    tiny-flux, trained without distillation) runs true classifier-free guidance against the negative
    prompt ("" when none), with the guidance input at the value it was trained with.
    """
    options = {"max_sequence_length": FLUX.t5_length(pipe.tokenizer_2)}
    if recommended.get("true_cfg"):
        return {**options, "guidance_scale": TRAINING_GUIDANCE, "true_cfg_scale": guidance_scale,
                "negative_prompt": negative_prompt}
    return {**options, "guidance_scale": guidance_scale, "negative_prompt": negative_prompt or None}


# BFL's module names (black-forest-labs/flux, ComfyUI, kohya's lora_unet_ keys) -> diffusers', per block.
_DOUBLE = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
           "img_attn.qkv": OriginalModule(("attn.to_q", "attn.to_k", "attn.to_v")), "img_attn.proj": "attn.to_out.0",
           "txt_attn.qkv": OriginalModule(("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
           "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
           "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}
# linear1 computes q, k, v and the MLP's input in one matrix; linear2 reads attention and MLP outputs.
_SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out",
           # FluxSingleTransformerBlock's MLP is 4x the inner width (its mlp_ratio)
           "linear1": OriginalModule(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), widths=(1, 1, 1, 4))}
_EMBEDDERS = {"img_in": "x_embedder", "txt_in": "context_embedder",
              "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
              "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
              "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
              "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
              "final_layer.linear": "proj_out",
              # BFL's final modulation yields (shift, scale); diffusers' AdaLayerNormContinuous (scale, shift).
              "final_layer.adaLN_modulation.1": OriginalModule(("norm_out.linear",), swap_halves=True)}
_GUIDANCE = {"guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
             "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2"}


def original_modules(config) -> dict[str, str | OriginalModule]:
    """Every BFL module name of a transformer with ``config``'s depths -> the diffusers module(s) it is."""
    out: dict[str, str | OriginalModule] = {**_EMBEDDERS, **(_GUIDANCE if config.guidance_embeds else {})}
    for i in range(config.num_layers):
        for theirs, ours in _DOUBLE.items():
            out[f"double_blocks.{i}.{theirs}"] = in_block(f"transformer_blocks.{i}", ours)
    for i in range(config.num_single_layers):
        for theirs, ours in _SINGLE.items():
            out[f"single_blocks.{i}.{theirs}"] = in_block(f"single_transformer_blocks.{i}", ours)
    return out



FLUX = Family(
    name="flux",
    display_name="FLUX.1",
    pipelines=dict(zip(("text2img", "img2img", "inpaint"), architectures.FLUX.pipeline_class_names, strict=True)),
    native_resolution=1024,
    latent_granularity=16,  # 8x VAE, then 2x2 packing
    target_modules={"attention": ATTENTION, "attention+mlp": ATTENTION_MLP, "all-linear": ALL_LINEAR},
    text_encoder_target_modules=CLIP_TARGETS,
    kohya_base_model_version="flux1",
    modelspec_architecture="flux-1-dev",
    default_guidance_scale=3.5,
    architecture=architectures.FLUX,
    # FLUX.1-dev's transformer and CLIP configs (black-forest-labs/FLUX.1-dev), for the meta-device check.
    reference_config_dir=Path(__file__).resolve().parent / "configs" / "flux",
    condition=condition,
    # FluxPipeline refuses T5 prompts longer than this.
    t5_max_length=512,
    pack_latents=pack_latents,
    unpack_latents=unpack_latents,
    call_denoiser=call_denoiser,
    sampling_options=sampling_options,
    # FluxPipeline shifts the schedule by the image's token count (``mu``): only flow-matching Euler takes it.
    samplers={"Euler": ("FlowMatchEulerDiscreteScheduler", {})},
    denoiser="transformer",
    denoiser_label="transformer",
    # kohya's and ComfyUI's Flux files say lora_unet_ with BFL's module names (``original_modules``);
    # OneTrainer's say lora_transformer_ with diffusers' names. Either spelling reads after either prefix.
    denoiser_kohya_prefixes=("lora_unet_", "lora_transformer_"),
    original_modules=original_modules,
    text_encoders=(
        TextEncoder("text_encoder", "tokenizer", ("lora_te1_",), kind="clip", target_modules=CLIP_TARGETS),
        # kohya names T5 lora_te3_ (OneTrainer lora_te2_). diffusers' Flux loader has no T5 LoRA (it drops
        # those keys without a word); the studio refuses such files by name rather than half-apply them.
        TextEncoder("text_encoder_2", "tokenizer_2", ("lora_te3_", "lora_te2_"), kind="t5", lora=False,
                    target_modules=T5_TARGETS),
    ),
    objective="flow_matching",
    training_scheduler="FlowMatchEulerDiscreteScheduler",
    hub_tags=("flux", "flux-diffusers"),
    # FLUX.1-dev's weights (and adapters derived from them) are under its non-commercial license;
    # schnell's are Apache 2.0.
    base_model_licenses={
        "black-forest-labs/FLUX.1-dev": {
            "license": "other", "license_name": "flux-1-dev-non-commercial-license",
            "license_link": "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"},
        "black-forest-labs/FLUX.1-schnell": {"license": "apache-2.0"},
    },
    # diffusers' and kohya's Flux LoRA guidance: transformer only, rank 16, lr 1e-4 at 1024 px.
    recommended={"network.rank": 16, "training.learning_rate": 1e-4, "dataset.resolution": 1024,
                 "network.train_text_encoder": False},
    # The usual FLUX.1 LoRA run (ai-toolkit's example config): 2,000 steps of batch 1 at 1e-4, rank 16,
    # constant rate; batch 1 throughout, as a 12 B transformer's activations at 1024 px fill a 24 GB card.
    training_presets={
        "quick": TrainingPreset(max_train_steps=500, rank=8, learning_rate=1e-4, train_batch_size=1),
        "balanced": TrainingPreset(max_train_steps=2000, rank=16, learning_rate=1e-4, train_batch_size=1),
        "high quality": TrainingPreset(max_train_steps=4000, rank=32, learning_rate=1e-4, train_batch_size=1,
                                       lr_scheduler="cosine", lr_warmup_steps=200),
    },
)
