"""The recipe that builds the embedded tiny base model from a seed.

    python -m studio.app.tiny.build                 # full build into studio/core/embedded/tiny (~30 min, 2 CPUs)
    python -m studio.app.tiny.build --smoke --out D # a few steps of every phase, for tests
    python -m studio.app.tiny.build --model tiny-sd3 --refine-from DIR --out D
                                                    # only the recipe's refine stage, on a first-stage build

The result is a standard diffusers ``StableDiffusionPipeline`` folder (CLIP tokenizer and text
encoder, AutoencoderKL, UNet2DConditionModel, DDPM scheduler config), trained in three phases:

1. VAE: 32 px RGB <-> 4x8x8 latents (4x downsampling), on plain, striped and outlined scenes and on
   full-frame textures (stripes of several periods and angles, checks, rings, noise), so that style
   adapters trained later have latents that can express their style.
2. Latent statistics: the VAE ``scaling_factor`` is 1 / std of the training latents, as SD does.
3. UNet and CLIP text encoder, trained jointly from scratch on plain scenes captioned
   "a {colour} {shape} on a {background} background" (10% empty captions, for classifier-free
   guidance), epsilon prediction on SD-1's noise schedule.

The tokenizer is not trained: it is SD-1's real CLIP vocabulary, read from the output folder's
``tokenizer/`` (or copied from the embedded model's). This module holds the training recipe only;
loading and generation live in ``studio.core.base_models`` and ``studio.generation``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from studio.app.tiny.scenes import COLOURS, SHAPES, STYLES, random_scene, random_texture, render
from studio.app.tiny.tokenizer import build_t5_tokenizer
from studio.core.embedded import EMBEDDED_DIR, TINY_MODEL_DIR
from studio.core.families import get_family

IMAGE_SIZE = 32


@dataclass
class BuildConfig:
    """Every knob of the recipe; the defaults are the ones the committed weights were built with."""

    seed: int = 0
    vae_steps: int = 1200
    vae_batch: int = 16
    vae_lr: float = 1e-3
    unet_steps: int = 3000
    unet_batch: int = 48
    unet_lr: float = 5e-4
    warmup_steps: int = 100
    empty_caption_rate: float = 0.1
    scenes_per_combo: int = 48
    eval_steps: int = 20
    # CFG the model is evaluated at and recommends (lora_studio.json). Measured on the committed
    # weights, 72 images, Euler 20 steps: shape rate 96% at CFG 2, 85% at 3, 81% at 4, 69% at 6.
    eval_guidance: float = 2.0
    # Reuse the embedded SD-1 model's VAE (trained on the same scenes and textures, 4x8x8 latents)
    # instead of training one: tiny-sdxl does, so both models share a latent space and a build phase.
    reuse_vae: bool = False
    # A second denoiser stage on the saved (float16-rounded) weights: a fresh AdamW, warmup and cosine
    # over ``refine_steps`` at ``refine_lr``, new draws from seed + 1. A stage of its own, not a longer
    # first stage, so that a model can be refined from its committed weights without repeating them.
    refine_steps: int = 0
    refine_lr: float = 2e-4


def _clip(vocab_size: int, hidden: int, *, with_projection: bool = False):
    """A narrow CLIP text encoder over SD's real vocabulary (SD's BOS/EOS token ids)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    ))


def _sd_scheduler():
    """SD's noise schedule (SD-1 and SDXL share it); steps_offset=1 as their scheduler configs have it."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        clip_sample=False,
        prediction_type="epsilon",
    )


def _sd1_components(vocab_size: int) -> dict:
    """Fresh, randomly initialised tiny SD-1 components (architecture only; no weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),  # three blocks = two downsamples = 4x
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=IMAGE_SIZE,
    )
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return {"text_encoder": _clip(vocab_size, 64), "vae": vae, "unet": unet, "scheduler": _sd_scheduler()}


# Text width of each tiny SDXL encoder: the UNet's cross-attention reads both, concatenated (32 + 32).
SDXL_TEXT_WIDTH = 32
# SDXL's add_embedding input: six size numbers, each embedded in addition_time_embed_dim channels,
# plus the second encoder's pooled projection: 6 x 8 + 32 = 80.
SDXL_TIME_EMBED_DIM = 8


def _sdxl_components(vocab_size: int) -> dict:
    """Fresh tiny SDXL components: two CLIP encoders (the second with projection), a UNet with
    SDXL's ``text_time`` added conditioning and linear projections. Sized to stay under 15 MB in
    float16 with the shared VAE: 2 x 1.6 M (encoders, mostly the 49408-token embedding) + 2.85 M
    (UNet) + 0.95 M (VAE) = 7.0 M parameters."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 96),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=2 * SDXL_TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=32,
        use_linear_projection=True,
        transformer_layers_per_block=1,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + SDXL_TEXT_WIDTH,
    )
    return {"text_encoder": _clip(vocab_size, SDXL_TEXT_WIDTH),
            "text_encoder_2": _clip(vocab_size, SDXL_TEXT_WIDTH, with_projection=True),
            "unet": unet, "scheduler": _sd_scheduler()}


# tiny-flux: T5 and CLIP widths (the transformer reads T5's hidden states and CLIP's pooled output),
# and the transformer's attention: 8 heads of 16 channels, rotary axes 4 + 6 + 6 = 16 (id, row, column).
FLUX_TEXT_WIDTH = 32
FLUX_HEADS, FLUX_HEAD_DIM, FLUX_ROPE_AXES = 8, 16, (4, 6, 6)


def _t5(vocab_size: int, width: int = FLUX_TEXT_WIDTH):
    """A narrow T5 v1.1-style encoder (gated-GELU feed-forward: the wi_0/wi_1 names real LoRAs use)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=width, d_ff=2 * width, d_kv=8, num_heads=4,
        num_layers=2, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0,
    ))


def _flow_scheduler():
    """FLUX.1's sampler config: flow-matching Euler with the resolution-dependent time shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def _flux_components(vocab_size: int, t5_vocab_size: int) -> dict:
    """Fresh tiny FLUX.1-dev-like components: CLIP (pooled) + T5 encoders and a transformer with double-
    and single-stream blocks and a guidance input, over the shared VAE's 4-channel latents packed 2x2
    (16 features a token). Sizes: CLIP 1.6 M (mostly the 49408-token embedding), T5 0.03 M, transformer
    2.4 M, VAE 0.95 M: 5.0 M parameters, ~10 MB in float16."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=3, num_single_layers=6, attention_head_dim=FLUX_HEAD_DIM,
        num_attention_heads=FLUX_HEADS, joint_attention_dim=FLUX_TEXT_WIDTH, pooled_projection_dim=FLUX_TEXT_WIDTH,
        guidance_embeds=True, axes_dims_rope=FLUX_ROPE_AXES,
    )
    return {"text_encoder": _clip(vocab_size, FLUX_TEXT_WIDTH), "text_encoder_2": _t5(t5_vocab_size),
            "transformer": transformer, "scheduler": _flow_scheduler()}


# tiny-sd3: two CLIP encoders of width 32 (concatenated: 64, as 768 + 1280 = 2048 on the real model)
# and a T5 of width 64, which the CLIP states are zero-padded to (2048 -> 4096 on the real model).
SD3_CLIP_WIDTH, SD3_T5_WIDTH = 32, 64
SD3_HEADS, SD3_HEAD_DIM = 8, 16


def _sd3_components(vocab_size: int, t5_vocab_size: int) -> dict:
    """Fresh tiny SD3.5-like components: two CLIP encoders with projection, a T5, and an MMDiT with
    SD3.5's RMS-normalised q/k and one dual-attention block (SD3.5 Medium's first 13 of 24), over the
    shared VAE's 4-channel latents in 2x2 patches (16 tokens at 32 px)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    inner = SD3_HEADS * SD3_HEAD_DIM
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 4, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
        attention_head_dim=SD3_HEAD_DIM, num_attention_heads=SD3_HEADS, joint_attention_dim=SD3_T5_WIDTH,
        caption_projection_dim=inner, pooled_projection_dim=2 * SD3_CLIP_WIDTH,
        # room for 128 px images (32 patches a side) in img2img, beyond the native 32 px
        pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0,),
    )
    # SD3's sampler without the 1024 px shift of 3: at 16 tokens the schedule needs none.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return {"text_encoder": _clip(vocab_size, SD3_CLIP_WIDTH, with_projection=True),
            "text_encoder_2": _clip(vocab_size, SD3_CLIP_WIDTH, with_projection=True),
            "text_encoder_3": _t5(t5_vocab_size, SD3_T5_WIDTH), "transformer": transformer, "scheduler": scheduler}


def _to_tensor(images) -> torch.Tensor:  # noqa: F821
    import torch

    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return f


def train_vae(vae, cfg: BuildConfig, rng: random.Random, log) -> None:
    """Reconstruction (L1 + MSE) with a light KL term, on scenes in every style and on textures."""
    import torch

    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(cfg.warmup_steps, cfg.vae_steps), cfg.vae_steps))
    vae.train()
    for step in range(cfg.vae_steps):
        images = [
            render(random_scene(rng, IMAGE_SIZE, style=rng.choice(STYLES)), IMAGE_SIZE)
            if rng.random() < 0.6
            else random_texture(rng, IMAGE_SIZE)
            for _ in range(cfg.vae_batch)
        ]
        x = _to_tensor(images)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = (recon - x).abs().mean() + ((recon - x) ** 2).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step}/{cfg.vae_steps} recon {rec.item():.4f} kl {kl.item():.4f}")
    vae.eval()


def scene_dataset(cfg: BuildConfig, rng: random.Random):
    """Plain scenes: every (colour, shape, background) combination, ``scenes_per_combo`` placements."""
    scenes = []
    for colour in COLOURS:
        for background in COLOURS:
            if background == colour:
                continue
            for shape in SHAPES:
                for _ in range(cfg.scenes_per_combo):
                    scenes.append(random_scene(rng, IMAGE_SIZE, colour=colour, shape=shape, background=background))
    rng.shuffle(scenes)
    return scenes


def train_denoiser(family, models: dict, vae, scheduler, cfg: BuildConfig, rng: random.Random, log) -> float:
    """Joint denoiser + text-encoder training on cached latents; returns the VAE scaling factor.

    ``models`` holds the family's pipeline components by name (denoiser, text encoders, tokenizers);
    prompts become conditioning through the family's own hook, the one the trainer and the
    pipelines use, so the model learns exactly the conditioning inference will give it.
    """
    import torch
    import torch.nn.functional as F

    scenes = scene_dataset(cfg, rng)
    captions = [s.caption for s in scenes]
    with torch.no_grad():
        means, stds = [], []
        for i in range(0, len(scenes), 256):
            dist = vae.encode(_to_tensor([render(s, IMAGE_SIZE) for s in scenes[i : i + 256]])).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
        lat_mean, lat_std = torch.cat(means), torch.cat(stds)
    scaling_factor = vae.config.scaling_factor if cfg.reuse_vae else float(1.0 / lat_mean.std())
    log(f"cached {len(scenes)} latents; scaling_factor {scaling_factor:.4f}")

    denoiser = models[family.denoiser]
    encoders = [models[c] for c in family.text_encoder_components]
    params = list(denoiser.parameters()) + [p for e in encoders for p in e.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(cfg.warmup_steps, cfg.unet_steps), cfg.unet_steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    # Every scene is rendered whole at IMAGE_SIZE: original = target size, no crop.
    size = (IMAGE_SIZE, IMAGE_SIZE)
    per_image = family.size_conditioning(size, (0, 0), size) if family.size_conditioning else {}
    for module in [denoiser, *encoders]:
        module.train()
    n = len(scenes)
    for step in range(cfg.unet_steps):
        idx = torch.randint(0, n, (cfg.unet_batch,), generator=gen)
        latents = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scaling_factor
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.empty_caption_rate
        batch_captions = ["" if dropped else captions[i] for i, dropped in zip(idx.tolist(), drop.tolist())]
        noise = torch.randn(latents.shape, generator=gen)
        conditioning = family.conditioning(models, batch_captions)
        conditioning.update({k: v.expand(cfg.unet_batch, *v.shape) for k, v in per_image.items()})
        if family.objective == "flow_matching":
            # Rectified flow with logit-normal noise levels (SD3's default density): x_s = (1 - s) x + s e,
            # the transformer predicts the velocity e - x.
            sigmas = torch.sigmoid(torch.randn(cfg.unet_batch, generator=gen))
            s = sigmas.view(-1, 1, 1, 1)
            pred = family.predict(denoiser, (1 - s) * latents + s * noise, sigmas, conditioning)
            loss = F.mse_loss(pred, noise - latents)
        else:
            t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
            pred = family.predict(denoiser, scheduler.add_noise(latents, noise, t), t, conditioning)
            # min-SNR-5 weighting (Hang et al. 2023) for epsilon prediction: min(SNR, 5) / SNR.
            alphas_cumprod = scheduler.alphas_cumprod
            snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
            weight = torch.clamp(snr, max=5.0) / snr
            loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.unet_steps - 1:
            log(f"{family.denoiser} step {step}/{cfg.unet_steps} loss {loss.item():.4f} "
                f"lr {sched.get_last_lr()[0]:.2e}")
    for module in [denoiser, *encoders]:
        module.eval()
    return scaling_factor


def evaluate(model_dir: Path, cfg: BuildConfig, seeds=(1, 2, 3)) -> dict:
    """Generate the standard prompt grid from the saved folder and grade it with the checker."""
    from studio.app.tiny.quality import measure_quality

    return measure_quality(model_dir, seeds=seeds, steps=cfg.eval_steps, guidance_scale=cfg.eval_guidance)


# embedded model name -> (family, component builder, pipeline kwargs beyond the components)
MODELS = {
    "tiny": ("sd1", _sd1_components, {"safety_checker": None, "feature_extractor": None,
                                      "requires_safety_checker": False}),
    # Empty prompts are encoded, not zeroed: the model learns its unconditional branch from "" (10% of captions).
    "tiny-sdxl": ("sdxl", _sdxl_components, {"force_zeros_for_empty_prompt": False}),
    "tiny-flux": ("flux", _flux_components, {}),
    "tiny-sd3": ("sd3", _sd3_components, {}),
}
# Settings a model's recipe changes from BuildConfig's defaults. The transformers learn the scenes'
# shapes more slowly than the UNets (no convolutions): at 3000 steps tiny-flux drew squares round
# (shape 56% at CFG 2), its loss still falling; at 5000 steps, shape 78% at CFG 2, 86% at 3, 75% at 4.
# tiny-sd3 after 5000 steps: shape 75% at CFG 2, 72% at 3; refined 3000 steps more: 78% at CFG 2,
# 86% at 3, 81% at 4 (colour and background 100% throughout).
MODEL_RECIPES: dict[str, dict] = {"tiny-flux": {"unet_steps": 5000, "eval_guidance": 3.0},
                                  "tiny-sd3": {"unet_steps": 5000, "refine_steps": 3000, "eval_guidance": 3.0}}
# Components read from the embedded SD-1 model instead of shipping a copy (lora_studio.json's
# "shared_components"; the studio's loader reads them from there): SD's vocabulary is 1.5 MB a copy.
SHARED_TOKENIZER = "tiny/tokenizer"  # relative to studio/core/embedded


def build(out_dir: Path, cfg: BuildConfig, log=print, run_eval: bool = True, model: str = "tiny") -> dict:
    """Run the whole recipe for embedded ``model`` and write a diffusers folder to ``out_dir``;
    returns the build report."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    family_name, make_components, pipeline_kwargs = MODELS[model]
    family = get_family(family_name)
    t0 = time.perf_counter()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)

    out_dir = Path(out_dir)
    shared = {}
    if family_name == "sd1":
        tok_dir = out_dir / "tokenizer"
        if not (tok_dir / "vocab.json").exists():
            shutil.copytree(TINY_MODEL_DIR / "tokenizer", tok_dir, dirs_exist_ok=True)
    else:
        tok_dir = TINY_MODEL_DIR / "tokenizer"
        # CLIP tokenizers come from tiny/; a T5 tokenizer (Flux) is built here, it is a few kilobytes.
        shared = {te.tokenizer: SHARED_TOKENIZER for te in family.text_encoders if te.kind != "t5"}
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    tokenizers = {name: tokenizer for name in shared} if shared else {"tokenizer": tokenizer}
    t5 = [te.tokenizer for te in family.text_encoders if te.kind == "t5"]
    if t5:
        from transformers import AutoTokenizer

        tokenizers[t5[0]] = AutoTokenizer.from_pretrained(build_t5_tokenizer(out_dir / t5[0]), local_files_only=True)
        models = make_components(len(tokenizer), len(tokenizers[t5[0]]))
    else:
        models = make_components(len(tokenizer))
    models.update(tokenizers)
    if cfg.reuse_vae:
        models["vae"] = AutoencoderKL.from_pretrained(TINY_MODEL_DIR / "vae", torch_dtype=torch.float32)
        log("reusing the embedded SD-1 model's VAE")
    else:
        train_vae(models["vae"], cfg, rng, log)
    t_vae = time.perf_counter() - t0
    scaling_factor = train_denoiser(family, models, models["vae"], models["scheduler"], cfg, rng, log)
    models["vae"].register_to_config(scaling_factor=scaling_factor)
    if family.objective == "flow_matching":
        models["vae"].register_to_config(shift_factor=0.0)  # FluxPipeline adds it back after unscaling
    t_train = time.perf_counter() - t0
    pipe = family.pipeline_class("text2img")(**models, **pipeline_kwargs)
    size = save_model(pipe, out_dir, family, shared, cfg)
    params = {name: sum(p.numel() for p in module.parameters())
              for name, module in models.items() if hasattr(module, "parameters")}
    report = {
        "model": model,
        "config": asdict(cfg),
        "parameters": params,
        "size_bytes": size,
        "vae_seconds": round(t_vae, 1),
        "train_seconds": round(t_train, 1),
        "scaling_factor": scaling_factor,
    }
    if cfg.refine_steps:
        report.update(refine(out_dir, cfg, log=log, model=model))
    if run_eval:
        report["quality"] = evaluate(out_dir, cfg)
    (out_dir / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def refine(out_dir: Path, cfg: BuildConfig, log=print, model: str = "tiny") -> dict:
    """The recipe's second denoiser stage (``cfg.refine_steps``) on the model saved in ``out_dir``,
    saved back in place; returns the report's refine fields."""
    from dataclasses import replace

    import torch

    from studio.core.base_models import load_fresh_pipeline, model_record

    family = get_family(MODELS[model][0])
    t0 = time.perf_counter()
    seed = cfg.seed + 1
    torch.manual_seed(seed)
    pipe = load_fresh_pipeline(str(out_dir), precision="float32")
    models = dict(pipe.components)
    for name in [family.denoiser, *family.text_encoder_components]:
        models[name].requires_grad_(True)  # the studio's loader freezes what it loads
    stage = replace(cfg, seed=seed, unet_steps=cfg.refine_steps, unet_lr=cfg.refine_lr)
    log(f"refining {family.denoiser} for {cfg.refine_steps} steps at lr {cfg.refine_lr:g}")
    train_denoiser(family, models, models["vae"], models["scheduler"], stage, random.Random(seed), log)
    shared = dict(model_record(out_dir).get("shared_components") or {})
    # The tokenizers are not trained: keep the files the first stage wrote (a loaded tokenizer saves
    # its runtime defaults too).
    tokenizers = {f: f.read_bytes() for te in family.text_encoders if te.tokenizer not in shared
                  for f in (out_dir / te.tokenizer).iterdir()}
    save_model(pipe, out_dir, family, shared, cfg)
    for f in (out_dir / te.tokenizer for te in family.text_encoders if te.tokenizer not in shared):
        shutil.rmtree(f)
    for f, data in tokenizers.items():
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(data)
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file() and f.name != "build_report.json")
    return {"refine_seconds": round(time.perf_counter() - t0, 1), "size_bytes": size}


def refine_from(first_stage: Path, out_dir: Path, cfg: BuildConfig, log=print, run_eval: bool = True,
                model: str = "tiny") -> dict:
    """The refine stage alone, on a copy of ``first_stage`` (the recipe's first stage, built before
    with the same settings) written to ``out_dir``; its build report gains the refine fields."""
    if not cfg.refine_steps:
        raise SystemExit(f"{model}'s recipe has no refine stage; pass --refine-steps N")
    first_stage, out_dir = Path(first_stage), Path(out_dir)
    if first_stage.resolve() != out_dir.resolve():
        shutil.copytree(first_stage, out_dir, dirs_exist_ok=True)
    report_path = out_dir / "build_report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {"model": model}
    report["config"] = asdict(cfg)
    report.update(refine(out_dir, cfg, log=log, model=model))
    for stale in [key for key in report if key.startswith("quality")]:  # measured on the first stage
        report.pop(stale, None)
    if run_eval:
        report["quality"] = evaluate(out_dir, cfg)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def save_model(pipe, out_dir: Path, family, shared: dict, cfg: BuildConfig) -> int:
    """Write ``pipe`` as the shipped folder (float16 weights, small tokenizers, lora_studio.json);
    returns its size in bytes. The pipeline is left in float32 with the stored (rounded) weights."""
    import torch

    models = pipe.components
    # Stored in float16 (half the bytes); loading upcasts to float32 for CPU inference.
    pipe.to(torch.float16)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    pipe.to(torch.float32)
    for weights in out_dir.rglob("*.safetensors"):
        weights.chmod(0o644)  # safetensors writes 0600 whatever the umask; these are shipped files
    for config in [*out_dir.glob("*/config.json"), out_dir / "model_index.json"]:
        # where the modules were loaded from (a build folder, the SD-1 model's VAE): not part of the model
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    # save_pretrained rewrites the tokenizer with a 3.6 MB tokenizer.json that vocab.json and
    # merges.txt already describe; keep the folder small. Shared tokenizers are not shipped at all.
    for name in {te.tokenizer for te in family.text_encoders}:
        if name in shared:
            shutil.rmtree(out_dir / name)
        elif (out_dir / name / "vocab.json").exists():  # a BPE tokenizer; a Unigram one IS its tokenizer.json
            (out_dir / name / "tokenizer.json").unlink(missing_ok=True)
    record = {"recommended": {"guidance_scale": cfg.eval_guidance, "num_inference_steps": cfg.eval_steps,
                              "scheduler": "Euler"}}
    if shared:
        record["shared_components"] = shared
    if getattr(models[family.denoiser].config, "guidance_embeds", False):
        # A guidance input, but not guidance-distilled: CFG is true CFG against the negative prompt
        # (see families.flux).
        record["recommended"]["true_cfg"] = True
    if family.objective == "flow_matching":
        # FluxPipeline's default size (128 x the VAE factor) is not this model's.
        record["native_resolution"] = IMAGE_SIZE
    (out_dir / "lora_studio.json").write_text(json.dumps(record, indent=2) + "\n")
    return sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file() and f.name != "build_report.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Build an embedded tiny model (tiny: SD-1, tiny-sdxl: SDXL, tiny-flux: FLUX.1, tiny-sd3: SD3.5) "
                    "from a seed.")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--out", type=Path, help="output folder (default: the embedded model's own folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a few steps of every phase (seconds), for tests")
    parser.add_argument("--no-eval", action="store_true", help="skip the quality grid at the end")
    parser.add_argument("--vae-steps", type=int)
    parser.add_argument("--unet-steps", type=int)
    parser.add_argument("--refine-steps", type=int)
    parser.add_argument("--refine-from", type=Path, metavar="DIR",
                        help="run only the refine stage, on a copy of DIR (a build of the recipe's first stage)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args(argv)
    cfg = BuildConfig(seed=args.seed, reuse_vae=args.model != "tiny", **MODEL_RECIPES.get(args.model, {}))
    if args.smoke:
        cfg = BuildConfig(seed=args.seed, vae_steps=3, vae_batch=4, unet_steps=3, unet_batch=4, scenes_per_combo=1,
                          warmup_steps=1, eval_steps=2, reuse_vae=cfg.reuse_vae, refine_steps=min(cfg.refine_steps, 2))
    if args.vae_steps is not None:
        cfg.vae_steps = args.vae_steps
    if args.unet_steps is not None:
        cfg.unet_steps = args.unet_steps
    if args.refine_steps is not None:
        cfg.refine_steps = args.refine_steps
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    out = args.out or EMBEDDED_DIR / args.model
    if args.refine_from:
        report = refine_from(args.refine_from, out, cfg, log=log, run_eval=not (args.smoke or args.no_eval),
                             model=args.model)
    else:
        report = build(out, cfg, log=log, run_eval=not (args.smoke or args.no_eval), model=args.model)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
