"""FLUX.1 as a family: the offline T5 tokenizer, the conditioning, packing and position ids equal to
FluxPipeline's own, the build recipe's flow-matching smoke run, generation with true CFG, and
flow-matching training (noise-level sampling, shift, loss weighting) registering a Flux adapter.

These run on a smoke build of ``tiny-flux`` (seconds): what they check is the plumbing, not image quality.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from studio.core.base_models import load_fresh_pipeline, native_resolution, resolve
from studio.core.families import get_family
from studio.generation.requests import GenerationRequest
from studio.generation.run import generate

FLUX = get_family("flux")
PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def smoke(flux_smoke):
    """The session's smoke build of tiny-flux (conftest)."""
    return flux_smoke


@pytest.fixture(scope="module")
def pipe(smoke):
    return load_fresh_pipeline(str(smoke))


def test_the_t5_tokenizer_is_built_offline_with_t5s_conventions(tmp_path):
    from transformers import AutoTokenizer

    from studio.app.tiny.tokenizer import build_t5_tokenizer

    tok = AutoTokenizer.from_pretrained(build_t5_tokenizer(tmp_path / "t5"), local_files_only=True)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2) and tok.model_max_length == 77
    pieces = tok.convert_ids_to_tokens(tok("a red circle on a blue background, zkstripes").input_ids)
    assert pieces == ["▁a", "▁red", "▁circle", "▁on", "▁a", "▁blue", "▁background", ",", "▁zkstripes", "</s>"]
    # an unknown word is spelt out, never <unk>: a new trigger word still reaches the model
    assert tok.convert_ids_to_tokens(tok("Zorblax").input_ids) == ["▁Z", "o", "r", "b", "l", "a", "x", "</s>"]
    assert len(set(tok.get_vocab())) == len(tok)


def test_the_smoke_build_is_a_flux_pipeline_with_its_own_size_and_true_cfg(smoke, pipe):
    ref = resolve(str(smoke))
    assert (ref.kind, ref.family) == ("diffusers", "flux")
    assert type(pipe).__name__ == "FluxPipeline" and pipe.transformer.config.guidance_embeds
    assert type(pipe.text_encoder_2).__name__ == "T5EncoderModel" and len(pipe.tokenizer) == 49408
    assert native_resolution(pipe) == 32 and pipe.vae.config.shift_factor == 0.0
    record = json.loads((smoke / "lora_studio.json").read_text())
    assert record["recommended"]["true_cfg"] is True and record["shared_components"] == {"tokenizer": "tiny/tokenizer"}
    assert not (smoke / "tokenizer").exists() and (smoke / "tokenizer_2" / "tokenizer.json").exists()


def test_conditioning_packing_and_ids_match_the_pipelines_own(pipe):
    from studio.core.families.flux import image_ids

    prompts = [PROMPT, "", "a yellow square on a black background, zkstripes"]
    components = {n: getattr(pipe, n) for n in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")}
    with torch.no_grad():
        ours = FLUX.conditioning(components, prompts)
        embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device="cpu", max_sequence_length=77)
    assert torch.equal(ours["encoder_hidden_states"], embeds) and torch.equal(ours["pooled_projections"], pooled)
    latents = torch.randn(2, 4, 8, 8)
    packed = FLUX.pack_latents(latents)
    assert torch.equal(packed, pipe._pack_latents(latents, 2, 4, 8, 8))
    assert torch.equal(FLUX.unpack_latents(packed, 8, 8), latents)
    assert torch.equal(FLUX.unpack_latents(packed, 8, 8), pipe._unpack_latents(packed, 32, 32, pipe.vae_scale_factor))
    assert torch.equal(image_ids(8, 8), pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32))


def test_generation_uses_true_cfg_where_the_model_says_and_flow_samplers_only(smoke):
    base = dict(prompt=PROMPT, base_model=str(smoke), seed=1, num_inference_steps=3)
    one = generate(GenerationRequest(**base, guidance_scale=1.0)).images[0]
    two = generate(GenerationRequest(**base, guidance_scale=3.0)).images[0]
    again = generate(GenerationRequest(**base, guidance_scale=3.0)).images[0]
    assert one.size == (32, 32)
    assert list(two.getdata()) == list(again.getdata()) and list(one.getdata()) != list(two.getdata())
    from studio.core.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="FLUX.1 samples with 'Euler'"):
        generate(GenerationRequest(**base, scheduler="DPM++ 2M"))


def test_sampling_options_follow_the_model_record(pipe):
    distilled = FLUX.sampling_options(pipe, 3.5, "", {})
    assert distilled == {"max_sequence_length": 77, "guidance_scale": 3.5, "negative_prompt": None}
    true_cfg = FLUX.sampling_options(pipe, 2.0, "blurry", {"true_cfg": True})
    assert true_cfg == {"max_sequence_length": 77, "guidance_scale": 1.0, "true_cfg_scale": 2.0,
                        "negative_prompt": "blurry"}


def test_flow_matching_noise_levels_and_weights():
    from trainer.loop import _flow_loss_weight, _resolution_shift

    config = {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096,
              "base_shift": 0.5, "max_shift": 1.15}
    # 1024 px FLUX.1: 128 x 128 latents = 4096 tokens -> mu = 1.15; 512 px: 1024 tokens -> mu = 0.63
    assert _resolution_shift(config, (128, 128)) == pytest.approx(math.exp(1.15))
    assert _resolution_shift(config, (64, 64)) == pytest.approx(math.exp(0.5 + 768 * 0.65 / 3840))
    assert _resolution_shift({"shift": 3.0}, (8, 8)) == 3.0
    sigmas = torch.tensor([0.25, 0.5])
    assert torch.allclose(_flow_loss_weight("sigma_sqrt", sigmas), torch.tensor([16.0, 4.0]))
    assert torch.allclose(_flow_loss_weight("cosmap", sigmas), 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2)))
    assert torch.equal(_flow_loss_weight("none", sigmas), torch.ones(2))


def test_flow_matching_training_registers_a_flux_adapter(smoke, tmp_path, reg):
    from pathlib import Path

    from safetensors import safe_open

    from studio.core.errors import ConfigError
    from trainer.config import TrainConfig
    from trainer.loop import train

    toml = Path(__file__).resolve().parents[1] / "datasets" / "outlined_txt" / "train.toml"
    common = [f"output.dir={tmp_path / 'runs'}", "validation.every_n_steps=0", "output.checkpointing_steps=0",
              "training.lr_warmup_steps=0", "training.max_train_steps=3", "validation.prompts=[]",
              f"model.base_model={smoke}", "output.name=outlined-flux"]
    with pytest.raises(ConfigError, match="FLUX.1 has no target preset 'attention\\+conv'"):
        train(TrainConfig.from_toml(toml).apply_overrides(common), console=False)
    with pytest.raises(ConfigError, match="flow-matching model"):
        train(TrainConfig.from_toml(toml).apply_overrides(
            [*common, "network.target_modules=attention", "training.min_snr_gamma=5"]), console=False)
    cfg = TrainConfig.from_toml(toml).apply_overrides([*common, "network.target_modules=attention+mlp",
                                                       "training.loss_weighting=cosmap"])
    result = train(cfg, console=False)
    assert result.status == "done" and result.final_loss is not None and math.isfinite(result.final_loss)
    version = reg.get(result.ref)
    assert version.family == "flux" and tuple(version.components) == ("transformer",)
    with safe_open(str(result.adapter), "pt") as f:
        keys = list(f.keys())
        metadata = f.metadata()
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert any(".ff.net.0.proj." in k for k in keys) and any("single_transformer_blocks" in k for k in keys)
    assert metadata["ss_base_model_version"] == "flux1"


def test_a_real_size_flux_lora_is_checked_against_flux_1_dev_built_without_weights(tmp_path):
    from safetensors.torch import save_file

    from adapters.formats import check_against_reference
    from studio.core.base_models import reference_architecture
    from studio.core.errors import IncompatibleAdapterError

    full = reference_architecture("flux")
    assert 11.8e9 < sum(p.numel() for p in full.transformer.parameters()) < 12.0e9  # FLUX.1-dev: 11.9 B
    path = tmp_path / "flux.safetensors"

    def pair(name, fan_in, fan_out):
        return {f"{name}.lora_A.weight": torch.zeros(4, fan_in), f"{name}.lora_B.weight": torch.zeros(fan_out, 4)}

    save_file({**pair("transformer.transformer_blocks.18.attn.add_q_proj", 3072, 3072),
               **pair("transformer.single_transformer_blocks.37.proj_mlp", 3072, 12288),
               **pair("transformer.transformer_blocks.0.ff.net.0.proj", 3072, 12288)}, str(path))
    report = check_against_reference(path, "flux")
    assert report.num_modules == 3 and report.components == ("transformer",)
    save_file(pair("transformer.transformer_blocks.19.attn.to_q", 3072, 3072), str(tmp_path / "deep.safetensors"))
    with pytest.raises(IncompatibleAdapterError, match="none of the 1 module.s. this adapter patches exist"):
        check_against_reference(tmp_path / "deep.safetensors", "flux")  # FLUX.1 has 19 double blocks: 0..18


# ---- adapters on Flux: a peft file without alpha (ai-toolkit, SimpleTuner), proven applied ---------------


def _peft_flux_file(path, pipe, *, seed: int = 0, rank: int = 4):
    """transformer.<module>.lora_A/lora_B on every attention projection of both streams and the MLPs,
    no alpha anywhere (ai-toolkit's convention: alpha = rank, scale 1)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, module in pipe.transformer.named_modules():
        if name.endswith(("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "ff.net.2", "proj_mlp")):
            deltas[name] = (torch.randn(rank, module.in_features, generator=g) * 0.3,
                            torch.randn(module.out_features, rank, generator=g) * 0.3)
    tensors = {}
    for name, (a, b) in deltas.items():
        tensors[f"transformer.{name}.lora_A.weight"] = a
        tensors[f"transformer.{name}.lora_B.weight"] = b
    save_file(tensors, str(path))
    return deltas


def test_a_peft_flux_lora_without_alpha_renders_what_merging_it_by_hand_renders(smoke, pipe, tmp_path, reg):
    import shutil

    import numpy as np

    from adapters.compose import AdapterSpec, engine_for
    from adapters.ingest import import_adapter
    from studio.core.base_models import load_pipeline

    deltas = _peft_flux_file(tmp_path / "lora.safetensors", pipe)
    version = import_adapter(reg, tmp_path / "lora.safetensors", name="flux-style", base=str(smoke))
    assert version.family == "flux" and version.alpha == version.rank == 4

    merged = load_fresh_pipeline(str(smoke))
    modules = dict(merged.transformer.named_modules())
    with torch.no_grad():
        for name, (a, b) in deltas.items():
            modules[name].weight += 0.7 * (b @ a)  # alpha = rank: scale 1
    folder = tmp_path / "merged-by-hand"
    merged.save_pretrained(folder, safe_serialization=True)
    shutil.copy(smoke / "lora_studio.json", folder / "lora_studio.json")  # the same sampling record (true CFG)

    def render(base, adapters=()):
        result = generate(GenerationRequest(prompt=PROMPT, base_model=str(base), seed=4, num_inference_steps=4,
                                            guidance_scale=2.0, adapters=list(adapters)))
        return np.asarray(result.images[0], dtype=np.float32)

    try:
        ours = render(smoke, [AdapterSpec(ref="flux-style", weight=0.7)])
    finally:
        engine_for(load_pipeline(str(smoke))).unload_all()
    by_hand, base = render(folder), render(smoke)
    assert np.abs(ours - by_hand).max() <= 2, np.abs(ours - by_hand).max()
    assert np.abs(ours - base).mean() > 2


def test_flux_cards_carry_the_base_models_license(smoke, pipe, tmp_path, reg):
    from adapters.ingest import import_adapter
    from studio.app import hub

    _peft_flux_file(tmp_path / "lora.safetensors", pipe, seed=1)
    version = import_adapter(reg, tmp_path / "lora.safetensors", name="flux-card", base=str(smoke))
    for base, expected in (("black-forest-labs/FLUX.1-dev", "license_name: flux-1-dev-non-commercial-license"),
                           ("black-forest-labs/FLUX.1-schnell", "license: apache-2.0")):
        out = tmp_path / base.rpartition("/")[2]
        hub.publish_version(reg, version.ref, "someone/flux-card", dry_run_dir=out, base_model=base)
        front = (out / "README.md").read_text().split("\n---\n")[0]
        assert expected in front and f"base_model: {base}" in front and "- flux" in front
    out = tmp_path / "mit"
    hub.publish_version(reg, version.ref, "someone/flux-card", dry_run_dir=out,
                        base_model="black-forest-labs/FLUX.1-dev", license="mit")
    assert "license: mit" in (out / "README.md").read_text()  # what the user says wins


# ---- the embedded tiny-flux -------------------------------------------------------------------------------


def test_tiny_flux_is_embedded_small_and_listed():
    from studio.core.base_models import list_base_models
    from studio.core.embedded import EMBEDDED_MODELS

    ref = resolve("tiny-flux")
    assert (ref.kind, ref.family) == ("tiny", "flux")
    assert {r.ref: r.family for r in list_base_models()}["tiny-flux"] == "flux"
    folder = EMBEDDED_MODELS["tiny-flux"]
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 15 * 10**6, size
    report = json.loads((folder / "build_report.json").read_text())
    assert report["model"] == "tiny-flux" and report["config"]["seed"] == 0


def test_cli_generates_on_tiny_flux_and_the_recipe_replays(tmp_path):
    import numpy as np
    from PIL import Image

    from studio.app.cli import main

    out = tmp_path / "out"
    assert main(["generate", PROMPT, "--base", "tiny-flux", "--seed", "3", "--steps", "4", "--out", str(out)]) == 0
    first = next(out.glob("*.png"))
    assert Image.open(first).size == (32, 32)
    again = tmp_path / "again"
    assert main(["generate", "--recipe", str(first), "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(next(again.glob("*.png")))))


def test_img2img_runs_on_a_flux_model(smoke):
    import numpy as np
    from PIL import Image

    from studio.generation.inputs import store_input_image

    base = dict(prompt=PROMPT, base_model=str(smoke), seed=2, num_inference_steps=4, guidance_scale=2.0)
    init = generate(GenerationRequest(**base)).images[0]
    stored = store_input_image(init)
    result = generate(GenerationRequest(**base, init_image=str(stored), strength=0.6))
    assert result.request.task == "img2img" and result.images[0].size == (32, 32)
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(init))
    assert isinstance(Image.open(stored), Image.Image)


@pytest.mark.slow
def test_prompts_control_the_flux_images():
    """36 images (12 prompts x 3 seeds, 20 flow-Euler steps, true CFG 3 from its lora_studio.json): colour,
    background and shape at the SD-1 tiny model's bars (measured 100/100/86%)."""
    from studio.app.tiny.quality import QUALITY_PROMPTS, measure_quality

    rates = measure_quality("tiny-flux", seeds=(1, 2, 3), steps=20)
    assert rates["images"] == len(QUALITY_PROMPTS) * 3 == 36
    assert rates["colour"] >= 0.90, rates
    assert rates["background"] >= 0.90, rates
    assert rates["shape"] >= 0.80, rates
