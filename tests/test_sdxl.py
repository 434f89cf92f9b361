"""SDXL end to end on the embedded ``tiny-sdxl``: the family's conditioning equals the pipeline's own,
prompts control the image, kohya files (diffusers and SGM block names, both text encoders) import and
render what merging their deltas by hand renders, and training registers an SDXL adapter.

Kohya files here are written by the tests' own code from the kohya conventions (``lora_down``/
``lora_up``/``alpha``, scale alpha / rank), never by the studio's exporter, so an error shared by the
studio's reader and writer cannot hide.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from adapters.compose import AdapterSpec, engine_for
from adapters.ingest import import_adapter
from studio.app.tiny.quality import QUALITY_PROMPTS, measure_quality
from studio.core.base_models import list_base_models, load_fresh_pipeline, load_pipeline, native_resolution, resolve
from studio.core.embedded import EMBEDDED_MODELS
from studio.core.families import get_family
from studio.core.single_file import ldm_unet_module_names
from studio.generation.requests import GenerationRequest
from studio.generation.run import generate

ROOT = Path(__file__).resolve().parents[1]
SDXL = get_family("sdxl")
PROMPT = "a red circle on a blue background"
RANK, ALPHA, STRENGTH = 4, 2.0, 0.8


@pytest.fixture(scope="module")
def xl():
    return load_fresh_pipeline("tiny-sdxl")


def _components(pipe) -> dict:
    return {name: getattr(pipe, name) for name in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")}


def test_tiny_sdxl_is_an_embedded_sdxl_pipeline_that_shares_its_tokenizers(xl):
    ref = resolve("tiny-sdxl")
    assert (ref.kind, ref.family) == ("tiny", "sdxl")
    assert {r.ref: r.family for r in list_base_models()}["tiny-sdxl"] == "sdxl"
    assert type(xl).__name__ == "StableDiffusionXLPipeline" and xl.unet.config.addition_embed_type == "text_time"
    assert (type(xl.text_encoder).__name__, type(xl.text_encoder_2).__name__) == (
        "CLIPTextModel", "CLIPTextModelWithProjection")
    assert len(xl.tokenizer) == len(xl.tokenizer_2) == 49408  # SD's real vocabulary, read from tiny/
    assert native_resolution(xl) == 32
    folder = EMBEDDED_MODELS["tiny-sdxl"]
    assert not (folder / "tokenizer").exists() and not (folder / "tokenizer_2").exists()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 15 * 10**6, size
    assert not [f for f in folder.rglob("*") if f.suffix in (".bin", ".ckpt", ".pt", ".pth")]


def test_a_copied_tiny_sdxl_folder_loads_too(tmp_path):
    import shutil

    copy = tmp_path / "my-xl"
    shutil.copytree(EMBEDDED_MODELS["tiny-sdxl"], copy)
    ref = resolve(str(copy))
    assert (ref.kind, ref.family) == ("diffusers", "sdxl")
    assert len(load_fresh_pipeline(str(copy)).tokenizer_2) == 49408


def test_shared_components_come_only_from_the_embedded_models(tmp_path):
    import shutil

    from studio.core.errors import CorruptWeightsError

    copy = tmp_path / "my-xl"
    shutil.copytree(EMBEDDED_MODELS["tiny-sdxl"], copy)
    record = json.loads((copy / "lora_studio.json").read_text())
    record["shared_components"]["tokenizer"] = "../../../etc"
    (copy / "lora_studio.json").write_text(json.dumps(record))
    with pytest.raises(CorruptWeightsError, match="not a tokenizer folder of the embedded models"):
        load_fresh_pipeline(str(copy))


def test_conditioning_hook_matches_the_pipelines_own_encoding(xl):
    prompts = [PROMPT, "", "a yellow square on a black background, zkstripes"]
    ours = SDXL.conditioning(_components(xl), prompts)
    with torch.no_grad():
        embeds, _, pooled, _ = xl.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                do_classifier_free_guidance=False)
    assert torch.equal(ours["encoder_hidden_states"], embeds)
    assert torch.equal(ours["text_embeds"], pooled)


def test_size_conditioning_is_the_pipelines_time_ids(xl):
    ours = SDXL.size_conditioning((48, 40), (8, 0), (32, 32))["time_ids"]
    theirs = xl._get_add_time_ids((48, 40), (8, 0), (32, 32), dtype=torch.float32,
                                  text_encoder_projection_dim=xl.text_encoder_2.config.projection_dim)
    assert torch.equal(ours, theirs[0])


@pytest.mark.slow
def test_prompts_control_the_sdxl_image():
    """36 images (12 prompts x 3 seeds, 20 Euler steps, the model's own CFG): the SD-1 tiny model's rates."""
    rates = measure_quality("tiny-sdxl", seeds=(1, 2, 3), steps=20)
    assert rates["images"] == len(QUALITY_PROMPTS) * 3 == 36
    assert rates["colour"] >= 0.90, rates
    assert rates["background"] >= 0.90, rates
    assert rates["shape"] >= 0.80, rates


def test_cli_generates_on_tiny_sdxl_and_the_recipe_replays(tmp_path):
    from PIL import Image

    from studio.app.cli import main
    from studio.generation.recipes import read_recipe

    out = tmp_path / "out"
    assert main(["generate", PROMPT, "--base", "tiny-sdxl", "--seed", "3", "--steps", "4", "--out", str(out)]) == 0
    first = sorted(out.glob("*.png"))
    assert len(first) == 1
    assert read_recipe(first[0]).base_model == "tiny-sdxl"
    again = tmp_path / "again"
    assert main(["generate", "--recipe", str(first[0]), "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(first[0])), np.asarray(Image.open(next(again.glob("*.png")))))


# ---- kohya files written by hand ------------------------------------------------------------------


def _kohya_targets(pipe, *, sgm_names: bool) -> dict[str, torch.nn.Module]:
    """kohya flat name -> module: the UNet's attention projections in every block, and q/k/v/out of
    both text encoders, spelt as kohya spells them (``text_model_`` root; SGM block names on request)."""
    unet = {n: m for n, m in pipe.unet.named_modules()
            if n.endswith(("to_q", "to_k", "to_v", "to_out.0")) and isinstance(m, torch.nn.Linear)}
    names = ldm_unet_module_names(pipe.unet.config, unet) if sgm_names else {n: n for n in unet}
    assert len(names) == len(unet) and any(n.startswith(("down_blocks", "input_blocks")) for n in names.values())
    out = {"lora_unet_" + names[n].replace(".", "_"): m for n, m in unet.items()}
    for prefix, encoder in (("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)):
        for n, m in encoder.named_modules():
            if n.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
                out[prefix + "text_model_" + n.removeprefix("text_model.").replace(".", "_")] = m
    return out


def _deltas(pipe, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in _kohya_targets(pipe, sgm_names=False).items():
        out[name] = (torch.randn(RANK, module.in_features, generator=g) * 0.3,
                     torch.randn(module.out_features, RANK, generator=g) * 0.3)
    return out


def _write_kohya(path: Path, pipe, deltas, *, sgm_names: bool) -> Path:
    spelled = dict(zip(_kohya_targets(pipe, sgm_names=False), _kohya_targets(pipe, sgm_names=sgm_names), strict=True))
    tensors = {}
    for name, (down, up) in deltas.items():
        flat = spelled[name]
        tensors[f"{flat}.lora_down.weight"] = down.to(torch.float16)
        tensors[f"{flat}.lora_up.weight"] = up.to(torch.float16)
        tensors[f"{flat}.alpha"] = torch.tensor(ALPHA, dtype=torch.float16)
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0", "ss_network_dim": str(RANK),
                                            "ss_network_alpha": str(ALPHA), "ss_output_name": "handmade"})
    return path


def _render(base: str, adapters=()) -> np.ndarray:
    # CFG given: a saved copy carries no lora_studio.json, so it would get the family's default instead
    result = generate(GenerationRequest(prompt=PROMPT, base_model=base, seed=5, num_inference_steps=8,
                                        guidance_scale=2.0, adapters=list(adapters)))
    return np.asarray(result.images[0], dtype=np.float32)


def test_a_kohya_sdxl_lora_renders_what_merging_it_by_hand_renders(tmp_path, reg, xl):
    deltas = _deltas(xl)
    path = _write_kohya(tmp_path / "handmade.safetensors", xl, deltas, sgm_names=True)
    version = import_adapter(reg, path, name="handmade", base="tiny-sdxl")
    assert version.family == "sdxl" and set(version.components) == {"unet", "text_encoder", "text_encoder_2"}

    # The same deltas added to a copy of the base weights by hand: W += strength * up @ down * alpha / rank.
    merged = load_fresh_pipeline("tiny-sdxl")
    modules = _kohya_targets(merged, sgm_names=False)
    with torch.no_grad():
        for name, (down, up) in deltas.items():
            w = modules[name].weight
            w += STRENGTH * (up.half().float() @ down.half().float()) * (ALPHA / RANK)
    folder = tmp_path / "merged-by-hand"
    merged.save_pretrained(folder, safe_serialization=True)

    base = _render("tiny-sdxl")
    try:
        ours = _render("tiny-sdxl", [AdapterSpec(ref="handmade", weight=STRENGTH)])
    finally:
        engine_for(load_pipeline("tiny-sdxl")).unload_all()
    by_hand = _render(str(folder))
    assert np.abs(ours - by_hand).max() <= 2, np.abs(ours - by_hand).max()  # of 255
    assert np.abs(ours - base).mean() > 10 * max(np.abs(ours - by_hand).mean(), 0.05)


def test_kohya_sdxl_files_with_sgm_block_names_import_to_the_same_adapter(tmp_path, reg, xl):
    deltas = _deltas(xl, seed=1)
    diffusers_named = _write_kohya(tmp_path / "a.safetensors", xl, deltas, sgm_names=False)
    sgm_named = _write_kohya(tmp_path / "b.safetensors", xl, deltas, sgm_names=True)
    a = import_adapter(reg, diffusers_named, name="named-diffusers", base="tiny-sdxl")
    b = import_adapter(reg, sgm_named, name="named-sgm", base="tiny-sdxl")
    assert a.tensor_sha256 == b.tensor_sha256
    assert a.family == b.family == "sdxl"


def test_a_file_that_patches_one_module_twice_is_refused(tmp_path, reg, xl):
    from studio.core.errors import UnsupportedAdapterError

    deltas = _deltas(xl, seed=2)
    both = tmp_path / "both.safetensors"
    _write_kohya(tmp_path / "a.safetensors", xl, deltas, sgm_names=False)
    _write_kohya(tmp_path / "b.safetensors", xl, deltas, sgm_names=True)
    from safetensors.torch import load_file

    tensors = {**load_file(str(tmp_path / "a.safetensors")), **load_file(str(tmp_path / "b.safetensors"))}
    save_file(tensors, str(both))
    with pytest.raises(UnsupportedAdapterError, match="twice"):
        import_adapter(reg, both, name="twice", base="tiny-sdxl")
    assert reg.list_versions().total == 0


# ---- training -------------------------------------------------------------------------------------


def test_training_on_tiny_sdxl_registers_an_sdxl_adapter_with_both_text_encoders(tmp_path, reg):
    from safetensors import safe_open

    from trainer.config import TrainConfig
    from trainer.loop import train

    toml = ROOT / "datasets" / "outlined_txt" / "train.toml"
    cfg = TrainConfig.from_toml(toml).apply_overrides([
        f"output.dir={tmp_path / 'runs'}", "validation.every_n_steps=0", "output.checkpointing_steps=0",
        "training.lr_warmup_steps=0", "training.max_train_steps=3", "validation.prompts=[]",
        "model.base_model=tiny-sdxl", "network.train_text_encoder=true", "output.name=outlined-xl"])
    result = train(cfg, console=False)
    version = reg.get(result.ref)
    assert version.family == "sdxl" and version.base_model == "tiny-sdxl"
    assert set(version.components) == {"unet", "text_encoder", "text_encoder_2"}
    with safe_open(str(result.adapter), "pt") as f:
        metadata = f.metadata()
        keys = list(f.keys())
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    # and it renders on the base it was trained for
    try:
        assert _render("tiny-sdxl", [AdapterSpec(ref=result.ref)]).shape == (32, 32, 3)
    finally:
        engine_for(load_pipeline("tiny-sdxl")).unload_all()


# ---- real-size files against the full-size architecture (meta device, no weights) --------------------


def _real_size_kohya(path: Path, *, cross_attention_dim: int = 2048, te2_width: int = 1280) -> Path:
    """A rank-4 kohya SDXL LoRA of real SDXL 1.0 shapes on a few modules, SGM block names included
    (input_blocks.4.1 is down_blocks.1.attentions.0; middle_block.1 the mid transformer)."""
    def pair(name, fan_in, fan_out):
        return {f"{name}.lora_down.weight": torch.zeros(4, fan_in, dtype=torch.float16),
                f"{name}.lora_up.weight": torch.zeros(fan_out, 4, dtype=torch.float16),
                f"{name}.alpha": torch.tensor(4.0)}
    tensors = {
        **pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", cross_attention_dim, 640),
        **pair("lora_unet_middle_block_1_transformer_blocks_9_attn1_to_q", 1280, 1280),
        **pair("lora_unet_output_blocks_0_1_proj_in", 1280, 1280),
        **pair("lora_unet_down_blocks_2_attentions_1_transformer_blocks_3_attn2_to_v", cross_attention_dim, 1280),
        **pair("lora_te1_text_model_encoder_layers_11_self_attn_q_proj", 768, 768),
        **pair("lora_te2_text_model_encoder_layers_31_mlp_fc1", te2_width, 5120),
    }
    save_file(tensors, str(path))
    return path


def test_a_real_size_sdxl_lora_is_checked_against_the_full_size_architecture(tmp_path):
    from adapters.formats import check_against_reference
    from studio.core.errors import IncompatibleAdapterError

    report = check_against_reference(_real_size_kohya(tmp_path / "xl.safetensors"), "sdxl")
    assert report.num_modules == 6 and report.components == ("unet", "text_encoder", "text_encoder_2")
    assert report.resolved[("unet", "input_blocks_4_1_transformer_blocks_0_attn2_to_k")] == \
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    assert report.resolved[("unet", "middle_block_1_transformer_blocks_9_attn1_to_q")] == \
        "mid_block.attentions.0.transformer_blocks.9.attn1.to_q"
    # an SD-1 width on the cross-attention is named for what it is
    with pytest.raises(IncompatibleAdapterError, match="cross-attention dim 768 .*SD-1"):
        check_against_reference(_real_size_kohya(tmp_path / "sd1ish.safetensors", cross_attention_dim=768), "sdxl")
    with pytest.raises(IncompatibleAdapterError, match="other shapes"):
        check_against_reference(_real_size_kohya(tmp_path / "narrow.safetensors", te2_width=1024), "sdxl")


def test_cli_checks_a_file_against_a_family(tmp_path, capsys):
    from studio.app.cli import main

    path = _real_size_kohya(tmp_path / "xl.safetensors")
    assert main(["adapters", "check", str(path), "--family", "sdxl"]) == 0
    assert "fits the full-size Stable Diffusion XL: all 6 modules (4 in unet, 1 in text_encoder, 1 in " \
           "text_encoder_2)" in capsys.readouterr().out
    assert main(["adapters", "check", str(path), "--family", "sd1"]) == 2
    assert "made for SDXL" in capsys.readouterr().err


# ---- precision ----------------------------------------------------------------------------------------


def test_precision_is_chosen_per_request_and_recorded_in_the_recipe(tmp_path):
    from PIL import Image

    from studio.app.cli import main
    from studio.core.base_models import pipeline_dtypes
    from studio.core.errors import InvalidRequestError

    auto, bf16 = tmp_path / "auto", tmp_path / "bf16"
    assert main(["generate", PROMPT, "--base", "tiny-sdxl", "--seed", "3", "--steps", "3", "--out", str(auto)]) == 0
    assert main(["generate", PROMPT, "--base", "tiny-sdxl", "--seed", "3", "--steps", "3", "--out", str(bf16),
                 "--precision", "bfloat16"]) == 0

    def payload(folder):
        png = next(folder.glob("*.png"))
        return png, json.loads(Image.open(png).info["lora_studio"])

    png, recorded = payload(auto)
    assert recorded["request"]["precision"] == "auto"  # on a CPU: float32 everywhere
    assert recorded["dtypes"] == {c: "float32" for c in ("text_encoder", "text_encoder_2", "unet", "vae")}
    png16, recorded16 = payload(bf16)
    assert recorded16["request"]["precision"] == "bfloat16"
    assert set(recorded16["dtypes"].values()) == {"bfloat16"}
    # a bfloat16 run is its own image, and its recipe replays it exactly
    assert not np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(png16)))
    again = tmp_path / "again"
    assert main(["generate", "--recipe", str(png16), "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(png16)), np.asarray(Image.open(next(again.glob("*.png")))))
    with pytest.raises(InvalidRequestError, match="precision must be one of auto, float32, float16, bfloat16"):
        GenerationRequest(prompt=PROMPT, precision="float8")
    # SDXL's VAE in float16 is decoded in float32 by the pipeline (its config's force_upcast): recorded so
    half = load_fresh_pipeline("tiny-sdxl", "float16")
    assert half.vae.config.force_upcast and pipeline_dtypes(half)["vae"] == "float32 (upcast from float16)"
    assert pipeline_dtypes(half)["unet"] == "float16"


# ---- single files (SGM layout) --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xl_file(tmp_path_factory):
    from studio.core.base_models import export_single_file

    return export_single_file("tiny-sdxl", tmp_path_factory.mktemp("xl-export") / "tiny-sdxl.safetensors")


def test_tiny_sdxl_exports_to_the_sgm_layout_and_loads_back_exactly(xl_file, xl):
    from safetensors import safe_open

    with safe_open(str(xl_file), "pt") as f:
        keys = set(f.keys())
        metadata = f.metadata()
    assert metadata["lora_studio.format"] == "sdxl-sgm-single-file"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    for key in ("model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.input_blocks.0.0.weight",
                "first_stage_model.decoder.conv_out.weight",
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
                "conditioner.embedders.1.model.text_projection", "conditioner.embedders.1.model.positional_embedding"):
        assert key in keys, key
    ref = resolve(str(xl_file))
    assert (ref.kind, ref.family) == ("single_file", "sdxl")
    back = load_fresh_pipeline(str(xl_file))
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(xl, component).state_dict(), getattr(back, component).state_dict()
        assert ours.keys() == theirs.keys(), component
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), component
    assert back.tokenizer_2.pad_token == xl.tokenizer_2.pad_token  # recorded by the export
    assert np.array_equal(_render("tiny-sdxl"), _render(str(xl_file)))


def test_an_sdxl_file_from_elsewhere_uses_sdxl_1_0s_configs_and_says_what_does_not_fit(tmp_path, xl_file):
    from safetensors.torch import load_file

    from studio.core.errors import CorruptWeightsError

    plain = tmp_path / "from-civitai.safetensors"  # the same tensors, without the studio's metadata
    save_file(load_file(str(xl_file)), str(plain))
    assert resolve(str(plain)).family == "sdxl"
    with pytest.raises(CorruptWeightsError, match="not a Stable Diffusion XL checkpoint the studio can read|does not "
                                                  "match its config"):
        load_fresh_pipeline(str(plain))


# ---- the runtime: img2img, inpainting, per-role strengths, grids, merges, kohya export, cards --------------


@pytest.fixture
def handmade(tmp_path, reg, xl):
    """A kohya SDXL LoRA on the UNet and both text encoders, imported against tiny-sdxl."""
    path = _write_kohya(tmp_path / "handmade.safetensors", xl, _deltas(xl, seed=3), sgm_names=False)
    yield import_adapter(reg, path, name="handmade", base="tiny-sdxl")
    engine_for(load_pipeline("tiny-sdxl")).unload_all()


def _image(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.float32)


def test_img2img_and_inpainting_run_on_tiny_sdxl_with_an_adapter(handmade):
    from PIL import Image

    from studio.generation.inputs import store_input_image

    init_pixels = _render("tiny-sdxl").astype(np.uint8)
    init = store_input_image(Image.fromarray(init_pixels))
    mask_pixels = np.zeros((32, 32), dtype=np.uint8)
    mask_pixels[:, 16:] = 255  # repaint the right half
    mask = store_input_image(Image.fromarray(mask_pixels))
    stack = [AdapterSpec(ref="handmade", weight=STRENGTH)]
    common = dict(prompt="a yellow square on a black background", base_model="tiny-sdxl", seed=2,
                  num_inference_steps=8, guidance_scale=2.0, adapters=stack)
    img2img = generate(GenerationRequest(**common, init_image=str(init), strength=0.7))
    assert img2img.request.task == "img2img" and _image(img2img).shape == (32, 32, 3)
    assert np.abs(_image(img2img) - init_pixels).mean() > 5
    inpaint = generate(GenerationRequest(**common, init_image=str(init), mask_image=str(mask), strength=1.0))
    out = _image(inpaint)
    assert np.array_equal(out[:, :16], init_pixels[:, :16].astype(np.float32))  # kept: the original pixels
    assert np.abs(out[:, 16:] - init_pixels[:, 16:]).mean() > 5


def test_per_role_strengths_reach_the_unet_and_both_text_encoders(handmade):
    base = _render("tiny-sdxl")
    assert np.array_equal(_render("tiny-sdxl", [AdapterSpec(ref="handmade", denoiser=0.0, text_encoders=0.0)]), base)
    text_only = _render("tiny-sdxl", [AdapterSpec(ref="handmade", denoiser=0.0, text_encoders=1.0)])
    unet_only = _render("tiny-sdxl", [AdapterSpec(ref="handmade", denoiser=1.0, text_encoders=0.0)])
    both = _render("tiny-sdxl", [AdapterSpec(ref="handmade", weight=1.0)])
    for image in (text_only, unet_only):
        assert np.abs(image - base).mean() > 1 and np.abs(image - both).mean() > 1


def test_grids_merges_and_kohya_export_on_sdxl(tmp_path, reg, handmade, xl):
    from safetensors import safe_open

    from adapters.ingest import export_adapter
    from adapters.merge import merge_adapters
    from studio.generation.grid import GridAxis, render_grid

    request = GenerationRequest(prompt=PROMPT, base_model="tiny-sdxl", seed=5, num_inference_steps=8,
                                guidance_scale=2.0, adapters=[AdapterSpec(ref="handmade")])
    grid = render_grid(request, GridAxis.parse("strength=0,1"), None, tmp_path / "grid")
    from PIL import Image

    cells = [np.asarray(Image.open(p), dtype=np.float32) for p in grid.image_paths[0]]
    assert np.array_equal(cells[0], _render("tiny-sdxl")) and not np.array_equal(cells[0], cells[1])

    other = import_adapter(reg, _write_kohya(tmp_path / "other.safetensors", xl, _deltas(xl, seed=4), sgm_names=True),
                           name="other", base="tiny-sdxl")
    merged = merge_adapters(reg, [(handmade.ref, 0.5), (other.ref, 0.5)], method="cat", name="merged")
    assert merged.family == "sdxl" and set(merged.components) == {"unet", "text_encoder", "text_encoder_2"}
    assert _render("tiny-sdxl", [AdapterSpec(ref=merged.ref)]).shape == (32, 32, 3)

    out = export_adapter(reg, handmade.ref, format="kohya", out=tmp_path / "exported.safetensors")
    with safe_open(str(out), "pt") as f:
        prefixes = {k.split("_", 2)[1] for k in f.keys()}
        metadata = f.metadata()
    assert prefixes == {"unet", "te1", "te2"}
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    again = import_adapter(reg, out, name="again", base="tiny-sdxl")
    assert again.tensor_sha256 == handmade.tensor_sha256


def test_an_sdxl_card_names_its_family(tmp_path, reg, handmade):
    from studio.app import hub

    hub.publish_version(reg, handmade.ref, "someone/handmade-xl", dry_run_dir=tmp_path / "embedded")
    text = (tmp_path / "embedded" / "README.md").read_text()
    assert "stable-diffusion-xl" in text and "template:sd-lora" in text
    assert "the tiny SDXL model embedded in LoRA Studio" in text
    assert 'load_fresh_pipeline("tiny-sdxl")  # a diffusers StableDiffusionXLPipeline' in text
    hub.publish_version(reg, handmade.ref, "someone/handmade-xl", dry_run_dir=tmp_path / "hub",
                        base_model="stabilityai/stable-diffusion-xl-base-1.0")
    front = (tmp_path / "hub" / "README.md").read_text().split("\n---\n")[0]
    assert "base_model: stabilityai/stable-diffusion-xl-base-1.0" in front


def test_a_load_that_drops_modules_is_refused_and_undone(handmade, monkeypatch):
    """The proof of application: a loader that silently skips keys (as diffusers does with Flux's T5
    keys) leaves modules without the adapter's layers; the studio counts them and refuses."""
    from diffusers import StableDiffusionXLPipeline

    from adapters.compose import landed_modules
    from studio.core.errors import IncompatibleAdapterError

    original = StableDiffusionXLPipeline.lora_state_dict.__func__

    def dropping(cls, *args, **kwargs):
        state_dict, *rest = original(cls, *args, **kwargs)
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("text_encoder_2.")}
        return (state_dict, *rest)

    monkeypatch.setattr(StableDiffusionXLPipeline, "lora_state_dict", classmethod(dropping))
    pipe = load_pipeline("tiny-sdxl")
    with pytest.raises(IncompatibleAdapterError, match=r"only \d+ of the \d+ modules it patches took its layers"):
        generate(GenerationRequest(prompt=PROMPT, base_model="tiny-sdxl", seed=1, num_inference_steps=2,
                                   adapters=[AdapterSpec(ref="handmade")]))
    assert not any(landed_modules(pipe, name) for name in pipe.get_list_adapters().get("unet", []))
    assert engine_for(pipe).loaded_names == []
