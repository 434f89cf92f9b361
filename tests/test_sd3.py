"""Stable Diffusion 3/3.5 as a family: conditioning equal to StableDiffusion3Pipeline's own, the build
recipe's smoke run, generation, flow-matching training registering an SD3 adapter, and SD3 LoRA files
in kohya's layout (Stability's joint_blocks names, fused q/k/v split by the model's sizes) proven
applied: the case diffusers 0.42 loads with a warning and no effect.

These run on a smoke build of ``tiny-sd3`` (seconds): they check the plumbing, not image quality.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from studio.core.base_models import load_fresh_pipeline, resolve
from studio.core.families import get_family
from studio.generation.requests import GenerationRequest
from studio.generation.run import generate

SD3 = get_family("sd3")
PROMPT = "a red circle on a blue background"
RANK, WEIGHT = 4, 0.8
INNER = 8 * 16  # the smoke transformer's width: 8 heads of 16


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from studio.app.tiny.build import main

    out = tmp_path_factory.mktemp("sd3-smoke") / "tiny-sd3"
    main(["--model", "tiny-sd3", "--smoke", "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def pipe(smoke):
    return load_fresh_pipeline(str(smoke))


def test_the_smoke_build_is_an_sd35_pipeline_under_15_mb(smoke, pipe):
    ref = resolve(str(smoke))
    assert (ref.kind, ref.family) == ("diffusers", "sd3")
    config = pipe.transformer.config
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and config.qk_norm == "rms_norm"
    assert tuple(config.dual_attention_layers) == (0,) and type(pipe.text_encoder_3).__name__ == "T5EncoderModel"
    assert pipe.vae.config.shift_factor == 0.0
    record = json.loads((smoke / "lora_studio.json").read_text())
    assert "true_cfg" not in record["recommended"]  # no guidance input: classic CFG
    report = json.loads((smoke / "build_report.json").read_text())  # the recipe's refine stage ran on the saved model
    assert report["config"]["refine_steps"] == 2 and report["refine_seconds"] > 0
    size = sum(f.stat().st_size for f in smoke.rglob("*") if f.is_file())
    assert size <= 15 * 10**6, size


def test_conditioning_matches_the_pipelines_own(pipe):
    prompts = [PROMPT, "", "a yellow square on a black background, zkstripes"]
    components = {n: getattr(pipe, n) for n in ("tokenizer", "tokenizer_2", "tokenizer_3", "text_encoder",
                                                 "text_encoder_2", "text_encoder_3")}
    with torch.no_grad():
        ours = SD3.conditioning(components, prompts)
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, prompt_3=None, device="cpu",
                                                  do_classifier_free_guidance=False, max_sequence_length=77)
    assert torch.equal(ours["encoder_hidden_states"], embeds) and torch.equal(ours["pooled_projections"], pooled)
    with torch.no_grad():  # a set T5 length: 77 CLIP tokens, then 16 of T5, as the pipeline's option gives
        short = SD3.conditioning(components, prompts, max_sequence_length=16)
        embeds, _, _, _ = pipe.encode_prompt(prompts, prompt_2=None, prompt_3=None, device="cpu",
                                             do_classifier_free_guidance=False, max_sequence_length=16)
    assert short["encoder_hidden_states"].shape[1] == 77 + 16 and torch.equal(short["encoder_hidden_states"], embeds)
    assert SD3.t5_length(pipe.tokenizer_3, 400) == 256  # never past the pipeline's own limit
    with pytest.raises(ValueError, match="no T5"):
        get_family("sd1").conditioning(components, prompts, max_sequence_length=16)


def test_flow_matching_training_registers_an_sd3_adapter_with_clip_loras(smoke, tmp_path, reg):
    from safetensors import safe_open

    from studio.core.errors import ConfigError
    from trainer.config import TrainConfig
    from trainer.loop import train

    toml = Path(__file__).resolve().parents[1] / "datasets" / "outlined_txt" / "train.toml"
    cfg = TrainConfig.from_toml(toml).apply_overrides([
        f"output.dir={tmp_path / 'runs'}", "validation.every_n_steps=0", "output.checkpointing_steps=0",
        "training.lr_warmup_steps=0", "training.max_train_steps=2", "validation.prompts=[]",
        f"model.base_model={smoke}", "output.name=outlined-sd3", "network.target_modules=attention",
        "network.train_text_encoder=true", "training.loss_weighting=sigma_sqrt", "model.max_sequence_length=24"])
    with pytest.raises(ConfigError, match="Stable Diffusion 1.x has no T5 encoder: leave it 0"):
        train(cfg.apply_overrides(["model.base_model=tiny"]), console=False)
    result = train(cfg, console=False)
    assert result.status == "done" and math.isfinite(result.final_loss)
    version = reg.get(result.ref)
    assert version.family == "sd3"
    assert tuple(version.components) == ("text_encoder", "text_encoder_2", "transformer")
    with safe_open(str(result.adapter), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["ss_base_model_version"] == "sd3"
    assert any(k.startswith("transformer.transformer_blocks.0.attn.add_k_proj") for k in keys)


# The test's own table: Stability names -> (diffusers module, rows) in the order the fused weight stacks them.
FUSED = {
    "joint_blocks.0.x_block.attn.qkv": [(f"transformer_blocks.0.attn.to_{x}", INNER) for x in "qkv"],
    "joint_blocks.0.x_block.attn2.qkv": [(f"transformer_blocks.0.attn2.to_{x}", INNER) for x in "qkv"],
    "joint_blocks.1.context_block.attn.qkv": [(f"transformer_blocks.1.attn.add_{x}_proj", INNER) for x in "qkv"],
    "joint_blocks.2.x_block.mlp.fc1": [("transformer_blocks.2.ff.net.0.proj", 4 * INNER)],
    "joint_blocks.1.context_block.attn.proj": [("transformer_blocks.1.attn.to_add_out", INNER)],
    # the last block's context modulation and the final layer's: (shift, scale) -> diffusers' (scale, shift)
    "joint_blocks.3.context_block.adaLN_modulation.1": [("transformer_blocks.3.norm1_context.linear", 2 * INNER)],
    "final_layer.adaLN_modulation.1": [("norm_out.linear", 2 * INNER)],
}
SWAPPED = {"joint_blocks.3.context_block.adaLN_modulation.1", "final_layer.adaLN_modulation.1"}
CLIP_Q = "encoder.layers.0.self_attn.q_proj"


def test_an_sd3_lora_in_kohya_layout_renders_what_merging_it_by_hand_renders(smoke, pipe, tmp_path, reg):
    from adapters.compose import AdapterSpec, engine_for
    from adapters.formats import detect
    from adapters.ingest import import_adapter
    from studio.core.base_models import load_pipeline

    g = torch.Generator().manual_seed(3)
    modules = dict(pipe.transformer.named_modules())
    tensors, deltas = {}, {}
    alpha = 2.0
    for original, targets in FUSED.items():
        a = torch.randn(RANK, modules[targets[0][0]].in_features, generator=g) * 0.2
        b = torch.randn(sum(r for _, r in targets), RANK, generator=g) * 0.2
        assert b.shape[0] == sum(modules[t].out_features for t, _ in targets)
        key = "lora_unet_" + original.replace(".", "_")
        tensors.update({f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(alpha)})
        if original in SWAPPED:
            b = torch.cat([b[b.shape[0] // 2:], b[: b.shape[0] // 2]])
        start = 0
        for name, rows in targets:
            deltas[("transformer", name)] = b[start:start + rows] @ a
            start += rows
    for prefix, component in (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        name, q = next((n, m) for n, m in getattr(pipe, component).named_modules() if n.endswith(CLIP_Q))
        a = torch.randn(RANK, q.in_features, generator=g) * 0.3
        b = torch.randn(q.out_features, RANK, generator=g) * 0.3
        key = prefix + "text_model_" + CLIP_Q.replace(".", "_")  # kohya spells CLIP from transformers 4's root
        tensors.update({f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(alpha)})
        deltas[(component, name)] = b @ a
    path = tmp_path / "kohya-sd3.safetensors"
    save_file(tensors, str(path))
    info = detect(path)
    assert info.architecture == "sd3" and set(info.components) == {"transformer", "text_encoder", "text_encoder_2"}
    version = import_adapter(reg, path, name="sd3-kohya", base=str(smoke))
    assert version.family == "sd3" and detect(version.path).num_modules == len(deltas)

    merged = load_fresh_pipeline(str(smoke))
    with torch.no_grad():
        for (component, name), delta in deltas.items():
            dict(getattr(merged, component).named_modules())[name].weight += WEIGHT * alpha / RANK * delta
    folder = tmp_path / "by-hand"
    merged.save_pretrained(folder, safe_serialization=True)
    shutil.copy(smoke / "lora_studio.json", folder / "lora_studio.json")

    def render(base, adapters=()):
        result = generate(GenerationRequest(prompt=PROMPT, base_model=str(base), seed=4, num_inference_steps=4,
                                            guidance_scale=2.0, adapters=list(adapters)))
        return np.asarray(result.images[0], dtype=np.float32)

    try:
        ours = render(smoke, [AdapterSpec(ref="sd3-kohya", weight=WEIGHT)])
        direct = render(smoke, [AdapterSpec(ref=str(path), weight=WEIGHT)])
    finally:
        engine_for(load_pipeline(str(smoke))).unload_all()
    by_hand, base = render(folder), render(smoke)
    assert np.abs(ours - base).mean() > 2
    assert np.abs(ours - by_hand).max() <= 2, np.abs(ours - by_hand).max()
    assert np.abs(direct - by_hand).max() <= 2, np.abs(direct - by_hand).max()

    # Exported back to the kohya/ComfyUI layout: the same Stability names, the same deltas.
    from adapters.formats import read_adapter
    from adapters.ingest import export_adapter

    out = export_adapter(reg, "sd3-kohya", format="kohya", out=tmp_path / "again.safetensors")
    again = read_adapter(out, base_pipeline=pipe, family="sd3")
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        assert {k.partition(".")[0] for k in f.keys()} == {k.partition(".")[0] for k in tensors}
    scales = again.scales()
    for (component, name), delta in deltas.items():
        parts = again.modules()[(component, name)]
        rank, alpha_back, _ = scales[(component, name)]
        assert torch.allclose(alpha_back / rank * parts["lora_B"] @ parts["lora_A"], alpha / RANK * delta, atol=1e-6)


def test_a_real_size_kohya_sd35_file_is_checked_against_sd35_medium(tmp_path):
    """Fused q/k/v of 3 x 1536 (24 heads of 64), the dual attention of block 12, the last block's context
    modulation (2 x 1536): SD3.5 Medium built on the meta device; block 13 has no attn2."""
    from adapters.formats import check_against_reference
    from studio.core.errors import IncompatibleAdapterError

    def pair(key, fan_in, rows):
        return {f"{key}.lora_down.weight": torch.zeros(4, fan_in), f"{key}.lora_up.weight": torch.zeros(rows, 4)}

    save_file({**pair("lora_unet_joint_blocks_23_x_block_attn_qkv", 1536, 3 * 1536),
               **pair("lora_unet_joint_blocks_12_x_block_attn2_qkv", 1536, 3 * 1536),
               **pair("lora_unet_joint_blocks_23_context_block_adaLN_modulation_1", 1536, 2 * 1536)},
              str(tmp_path / "real.safetensors"))
    report = check_against_reference(tmp_path / "real.safetensors", "sd3")
    assert report.num_modules == 3 + 3 + 1
    save_file(pair("lora_unet_joint_blocks_13_x_block_attn2_qkv", 1536, 3 * 1536), str(tmp_path / "no.safetensors"))
    with pytest.raises(IncompatibleAdapterError, match="joint_blocks_13_x_block_attn2_qkv"):
        check_against_reference(tmp_path / "no.safetensors", "sd3")


def test_sd3_cards_carry_the_community_license(smoke, pipe, tmp_path, reg):
    from adapters.ingest import import_adapter
    from studio.app import hub

    q = dict(pipe.transformer.named_modules())["transformer_blocks.0.attn.to_q"]
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(RANK, q.in_features),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(q.out_features, RANK)},
              str(tmp_path / "lora.safetensors"))
    version = import_adapter(reg, tmp_path / "lora.safetensors", name="sd3-card", base=str(smoke))
    base = "stabilityai/stable-diffusion-3.5-medium"
    hub.publish_version(reg, version.ref, "someone/sd3-card", dry_run_dir=tmp_path / "card", base_model=base)
    front = (tmp_path / "card" / "README.md").read_text().split("\n---\n")[0]
    assert "license_name: stabilityai-ai-community" in front and f"base_model: {base}" in front and "- sd3" in front


def test_preconditioned_outputs_are_the_flow_loss_weighted_by_sigma_squared(smoke, tmp_path):
    """diffusers' SD3 script takes the loss on x = noisy - s * prediction; the studio's option must be exactly
    the flow loss times s^2 per sample, on the same batch."""
    from trainer.config import TrainConfig
    from trainer.loop import Trainer

    toml = Path(__file__).resolve().parents[1] / "datasets" / "outlined_txt" / "train.toml"
    common = [f"output.dir={tmp_path / 'runs'}", f"model.base_model={smoke}", "output.name=precondition",
              "network.target_modules=attention", "validation.prompts=[]"]
    losses = {}
    for flag in (False, True):
        cfg = TrainConfig.from_toml(toml).apply_overrides([*common, f"training.precondition_outputs={flag}"])
        trainer = Trainer(cfg.resolved(), run_dir=tmp_path / f"run-{flag}", register=False, console=False)
        trainer._setup()
        samples = [trainer.train_set[i] for i in range(2)]
        sigmas = torch.tensor([0.3, 0.8])
        with torch.no_grad():
            losses[flag] = trainer._loss(samples, torch.Generator().manual_seed(0), reduce=False,
                                         timesteps=sigmas * 1000)
    assert torch.allclose(losses[True], losses[False] * sigmas**2, rtol=1e-4)


# ---- the embedded tiny-sd3 --------------------------------------------------------------------------------


def test_tiny_sd3_is_embedded_small_and_listed():
    from studio.core.base_models import list_base_models
    from studio.core.embedded import EMBEDDED_MODELS

    ref = resolve("tiny-sd3")
    assert (ref.kind, ref.family) == ("tiny", "sd3")
    assert {r.ref: r.family for r in list_base_models()}["tiny-sd3"] == "sd3"
    folder = EMBEDDED_MODELS["tiny-sd3"]
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 15 * 10**6, size
    report = json.loads((folder / "build_report.json").read_text())
    assert report["model"] == "tiny-sd3" and report["config"]["seed"] == 0
    assert report["quality"]["shape"] >= 0.80 and report["quality_4_steps"]["shape"] >= 0.80
    assert report["config"]["refine_steps"] > 0 and report["refine_seconds"] > 0


def test_cli_generates_on_tiny_sd3_and_the_recipe_replays(tmp_path):
    from PIL import Image

    from studio.app.cli import main

    out = tmp_path / "out"
    assert main(["generate", PROMPT, "--base", "tiny-sd3", "--seed", "3", "--steps", "4", "--out", str(out)]) == 0
    first = next(out.glob("*.png"))
    assert Image.open(first).size == (32, 32)
    again = tmp_path / "again"
    assert main(["generate", "--recipe", str(first), "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(next(again.glob("*.png")))))


@pytest.mark.slow
def test_prompts_control_the_sd3_images():
    """36 images (12 prompts x 3 seeds, 20 flow-Euler steps, CFG 3 from its lora_studio.json) at the SD-1
    tiny model's bars: measured colour 100%, background 100%, shape 86% (each miss a square drawn with
    corners soft enough to read as a circle)."""
    from studio.app.tiny.quality import QUALITY_PROMPTS, measure_quality

    rates = measure_quality("tiny-sd3", seeds=(1, 2, 3), steps=20)
    assert rates["images"] == len(QUALITY_PROMPTS) * 3 == 36
    assert rates["colour"] >= 0.90, rates
    assert rates["background"] >= 0.90, rates
    assert rates["shape"] >= 0.80, rates
