"""Flux LoRA files in every layout found in the wild, each written here by the test's own code and
proven applied: importing it (or using the file directly) renders what adding its deltas to the
base weights by hand renders.

Layouts: kohya (``lora_unet_double_blocks_0_img_attn_qkv`` with fused q/k/v, ``single_blocks_N_linear1``
fusing q/k/v and the MLP input, ``lora_te1_`` for CLIP, ``.alpha`` tensors), BFL (``diffusion_model.``
dotted names, ``lora_A``/``lora_B``, no alpha), ComfyUI (``diffusion_model.`` with
``lora_down``/``lora_up`` and ``.alpha``), OneTrainer (``lora_transformer_`` + diffusers' names), and
peft ``transformer.`` keys with per-module alpha tensors. The fused modules are split by the tiny
model's own sizes (inner width 128, MLP 512), not FLUX.1's (3072, 12288).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from studio.core.base_models import load_fresh_pipeline
from studio.core.errors import IncompatibleAdapterError
from studio.generation.requests import GenerationRequest
from studio.generation.run import generate

PROMPT = "a red circle on a blue background"
RANK = 4
WEIGHT = 0.8
CLIP_Q = "encoder.layers.0.self_attn.q_proj"  # transformers 5 spells CLIPTextModel without text_model.

# The test's own table of BFL names -> (diffusers module, rows) in the order the BFL weight stacks them,
# for the modules its files patch; the rows of fused modules are the smoke model's sizes.
INNER, MLP = 8 * 16, 4 * 8 * 16
FUSED = {
    "double_blocks.0.img_attn.qkv": [(f"transformer_blocks.0.attn.to_{x}", INNER) for x in "qkv"],
    "double_blocks.1.txt_attn.qkv": [(f"transformer_blocks.1.attn.add_{x}_proj", INNER) for x in "qkv"],
    "double_blocks.2.img_mlp.2": [("transformer_blocks.2.ff.net.2", INNER)],
    "double_blocks.0.txt_attn.proj": [("transformer_blocks.0.attn.to_add_out", INNER)],
    "single_blocks.0.linear1": [*[(f"single_transformer_blocks.0.attn.to_{x}", INNER) for x in "qkv"],
                                ("single_transformer_blocks.0.proj_mlp", MLP)],
    "single_blocks.5.linear2": [("single_transformer_blocks.5.proj_out", INNER)],
    # BFL's final modulation is (shift, scale), diffusers' norm_out (scale, shift): the halves swap.
    "final_layer.adaLN_modulation.1": [("norm_out.linear", 2 * INNER)],
}
SWAPPED = {"final_layer.adaLN_modulation.1"}


@pytest.fixture(scope="module")
def smoke(flux_smoke):
    """The session's smoke build of tiny-flux (conftest)."""
    return flux_smoke


@pytest.fixture(scope="module")
def pipe(smoke):
    return load_fresh_pipeline(str(smoke))


def _factors(pipe, seed: int):
    """Random (A, B) per BFL module (B stacked as BFL stacks it) and one for CLIP's first q_proj."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(pipe.transformer.named_modules())
    out = {}
    for original, targets in FUSED.items():
        fan_in = modules[targets[0][0]].in_features
        assert sum(modules[t].out_features for t, _ in targets) == sum(r for _, r in targets)
        out[original] = (torch.randn(RANK, fan_in, generator=g) * 0.2,
                         torch.randn(sum(r for _, r in targets), RANK, generator=g) * 0.2)
    clip = dict(pipe.text_encoder.named_modules())[CLIP_Q]
    clip_factors = (torch.randn(RANK, clip.in_features, generator=g) * 0.3,
                    torch.randn(clip.out_features, RANK, generator=g) * 0.3)
    return out, clip_factors


def _per_module(factors):
    """BFL factors -> (A, B) of each diffusers module, as the test's table says."""
    out = {}
    for original, (a, b) in factors.items():
        if original in SWAPPED:
            b = torch.cat([b[b.shape[0] // 2:], b[: b.shape[0] // 2]])
        start = 0
        for name, rows in FUSED[original]:
            out[name] = (a, b[start:start + rows])
            start += rows
    return out


def _write(layout: str, path, factors, clip_factors, alpha: float | None):
    """The file as each tool writes it."""
    tensors = {}

    def add(prefix_key, a, b, down="lora_down.weight", up="lora_up.weight", with_alpha=True):
        tensors[f"{prefix_key}.{down}"] = a.clone()
        tensors[f"{prefix_key}.{up}"] = b.clone()
        if alpha is not None and with_alpha:
            tensors[f"{prefix_key}.alpha"] = torch.tensor(alpha)

    clip_flat = "text_model_" + CLIP_Q.replace(".", "_")
    if layout == "kohya":
        for original, (a, b) in factors.items():
            add("lora_unet_" + original.replace(".", "_"), a, b)
        add("lora_te1_" + clip_flat, *clip_factors)
    elif layout == "bfl":
        for original, (a, b) in factors.items():
            add("diffusion_model." + original, a, b, "lora_A.weight", "lora_B.weight", with_alpha=False)
    elif layout == "comfyui":
        for original, (a, b) in factors.items():
            add("diffusion_model." + original, a, b)
    elif layout == "onetrainer":
        for name, (a, b) in _per_module(factors).items():
            add("lora_transformer_" + name.replace(".", "_"), a, b)
        add("lora_te1_" + clip_flat, *clip_factors)
    elif layout == "peft-alpha":
        for name, (a, b) in _per_module(factors).items():
            add("transformer." + name, a, b, "lora_A.weight", "lora_B.weight")
        add("text_encoder." + CLIP_Q, *clip_factors, "lora_A.weight", "lora_B.weight")
    else:
        raise AssertionError(layout)
    save_file(tensors, str(path))


def _merged_by_hand(smoke, factors, clip_factors, scale: float, with_clip: bool, folder):
    merged = load_fresh_pipeline(str(smoke))
    modules = dict(merged.transformer.named_modules())
    with torch.no_grad():
        for name, (a, b) in _per_module(factors).items():
            modules[name].weight += WEIGHT * scale * (b @ a)
        if with_clip:
            a, b = clip_factors
            dict(merged.text_encoder.named_modules())[CLIP_Q].weight += WEIGHT * scale * (b @ a)
    merged.save_pretrained(folder, safe_serialization=True)
    shutil.copy(smoke / "lora_studio.json", folder / "lora_studio.json")  # the same sampling record
    return folder


def _render(base, adapters=()):
    result = generate(GenerationRequest(prompt=PROMPT, base_model=str(base), seed=4, num_inference_steps=4,
                                        guidance_scale=2.0, adapters=list(adapters)))
    return np.asarray(result.images[0], dtype=np.float32)


LAYOUTS = {  # layout -> (alpha written, whether it patches CLIP)
    "kohya": (2.0, True),
    "bfl": (None, False),
    "comfyui": (8.0, False),
    "onetrainer": (2.0, True),
    "peft-alpha": (2.0, True),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_flux_layout_imports_and_renders_what_merging_it_by_hand_renders(layout, smoke, pipe, tmp_path, reg):
    from adapters.compose import AdapterSpec, engine_for
    from adapters.formats import detect
    from adapters.ingest import import_adapter
    from studio.core.base_models import load_pipeline

    alpha, with_clip = LAYOUTS[layout]
    factors, clip_factors = _factors(pipe, seed=len(layout))
    path = tmp_path / f"{layout}.safetensors"
    _write(layout, path, factors, clip_factors, alpha)
    info = detect(path)
    assert info.architecture == "flux", info.architecture_evidence
    assert set(info.components) == ({"transformer", "text_encoder"} if with_clip else {"transformer"})

    version = import_adapter(reg, path, name=f"flux-{layout}", base=str(smoke))
    # Every diffusers module the file patches is stored, alpha kept: 12 modules from the 7 BFL ones.
    n = sum(len(t) for t in FUSED.values()) + with_clip
    stored = detect(version.path)
    assert version.family == "flux" and stored.num_modules == n and stored.format == "diffusers"
    scale = (alpha if alpha is not None else RANK) / RANK
    assert version.alpha == (alpha if alpha is not None else RANK)

    by_hand = _render(_merged_by_hand(smoke, factors, clip_factors, scale, with_clip, tmp_path / "by-hand"))
    try:
        ours = _render(smoke, [AdapterSpec(ref=f"flux-{layout}", weight=WEIGHT)])
        direct = _render(smoke, [AdapterSpec(ref=str(path), weight=WEIGHT)])  # the file itself, not imported
    finally:
        engine_for(load_pipeline(str(smoke))).unload_all()
    base = _render(smoke)
    assert np.abs(ours - base).mean() > 2  # the adapter changes the image...
    assert np.abs(ours - by_hand).max() <= 2, np.abs(ours - by_hand).max()  # ...exactly as its deltas say
    assert np.abs(direct - by_hand).max() <= 2, np.abs(direct - by_hand).max()


def test_a_kohya_flux_file_for_another_size_is_refused_with_its_modules(pipe, tmp_path):
    """A file made for FLUX.1's full size (q/k/v of 3072 each) on the tiny model: the shapes are named."""
    from adapters.formats import read_adapter

    path = tmp_path / "full.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 3072),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(3 * 3072, 4)}, str(path))
    with pytest.raises(IncompatibleAdapterError, match=r"double_blocks\.0\.img_attn\.qkv"):
        read_adapter(path, base_pipeline=pipe, family="flux")


def test_keys_that_match_no_module_are_listed_and_refused(pipe, tmp_path):
    from adapters.formats import read_adapter

    path = tmp_path / "deep.safetensors"
    tensors = {}
    for key in ("lora_unet_double_blocks_0_img_attn_proj", "lora_unet_double_blocks_7_img_attn_qkv",
                "lora_unet_single_blocks_30_linear2"):  # the tiny model has 3 double and 6 single blocks
        tensors[f"{key}.lora_down.weight"] = torch.zeros(4, INNER)
        tensors[f"{key}.lora_up.weight"] = torch.zeros(3 * INNER if key.endswith("qkv") else INNER, 4)
    save_file(tensors, str(path))
    with pytest.raises(IncompatibleAdapterError) as e:
        read_adapter(path, base_pipeline=pipe, family="flux")
    assert "2 of the 3 modules" in str(e.value)
    assert "double_blocks_7_img_attn_qkv" in str(e.value) and "single_blocks_30_linear2" in str(e.value)


def test_t5_keys_are_refused_by_name_not_dropped(pipe, tmp_path):
    """kohya's lora_te3_ (T5) keys: diffusers' Flux loader drops them silently; the studio refuses the file."""
    from adapters.formats import detect, read_adapter

    t5_q = next(n for n, _ in pipe.text_encoder_2.named_modules() if n.endswith("layer.0.SelfAttention.q"))
    width = pipe.text_encoder_2.config.d_model
    inner = dict(pipe.text_encoder_2.named_modules())[t5_q].out_features
    path = tmp_path / "t5.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(4, INNER),
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(INNER, 4),
               f"lora_te3_{t5_q.replace('.', '_')}.lora_down.weight": torch.zeros(4, width),
               f"lora_te3_{t5_q.replace('.', '_')}.lora_up.weight": torch.zeros(inner, 4)}, str(path))
    assert set(detect(path).components) == {"transformer", "text_encoder_2"}
    with pytest.raises(IncompatibleAdapterError, match=r"1 in text_encoder_2.*lora_te3_"):
        read_adapter(path, base_pipeline=pipe, family="flux")


def test_a_real_size_kohya_flux_file_is_checked_against_flux_1_dev(tmp_path):
    """Fused q/k/v of 3 x 3072 and linear1 of 3 x 3072 + 12288 rows fit FLUX.1-dev built on the meta device."""
    from adapters.formats import check_against_reference

    path = tmp_path / "real.safetensors"
    save_file({"lora_unet_double_blocks_18_img_attn_qkv.lora_down.weight": torch.zeros(4, 3072),
               "lora_unet_double_blocks_18_img_attn_qkv.lora_up.weight": torch.zeros(3 * 3072, 4),
               "lora_unet_single_blocks_37_linear1.lora_down.weight": torch.zeros(4, 3072),
               "lora_unet_single_blocks_37_linear1.lora_up.weight": torch.zeros(3 * 3072 + 12288, 4),
               "lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": torch.zeros(4, 3072),
               "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": torch.zeros(2 * 3072, 4)}, str(path))
    report = check_against_reference(path, "flux")
    assert report.num_modules == 3 + 4 + 1 and report.components == ("transformer",)


def test_flux_adapters_export_to_the_kohya_comfyui_layout_and_back(smoke, pipe, tmp_path, reg):
    """An adapter patching q/k/v of both streams and of the single blocks (not their MLP input), at two
    different alphas, written as kohya keys in BFL names: qkv and linear1 fused (linear1's MLP rows zero),
    and the re-imported file applies the same deltas."""
    from adapters.formats import detect, read_adapter
    from adapters.ingest import export_adapter, import_adapter

    g = torch.Generator().manual_seed(9)
    modules = dict(pipe.transformer.named_modules())
    names = [n for n in modules if n.endswith(("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_k_proj"))]
    tensors = {}
    for n in names:
        tensors[f"transformer.{n}.lora_A.weight"] = torch.randn(RANK, modules[n].in_features, generator=g) * 0.2
        tensors[f"transformer.{n}.lora_B.weight"] = torch.randn(modules[n].out_features, RANK, generator=g) * 0.2
        # alphas differ between modules that end up in one fused matrix: each keeps its own strength
        tensors[f"transformer.{n}.alpha"] = torch.tensor(2.0 if n.endswith("to_k") else 8.0)
    save_file(tensors, str(tmp_path / "peft.safetensors"))
    import_adapter(reg, tmp_path / "peft.safetensors", name="flux-qkv", base=str(smoke))

    out = export_adapter(reg, "flux-qkv", format="kohya", out=tmp_path / "kohya.safetensors")
    info = detect(out)
    assert info.format == "kohya" and info.architecture == "flux"
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        linear1 = f.get_tensor("lora_unet_single_blocks_0_linear1.lora_up.weight")
        assert f.get_tensor("lora_unet_single_blocks_0_linear1.lora_down.weight").shape == (3 * RANK, INNER)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in keys
    assert not any("to_q" in k for k in keys)
    assert linear1.shape == (3 * INNER + MLP, 3 * RANK) and not linear1[3 * INNER:].any()  # no MLP delta

    again = read_adapter(out, base_pipeline=pipe, family="flux")

    def delta(weights, name):
        scale = {(c, n): (a / r) for (c, n), (r, a, _) in weights.scales().items()}[("transformer", name)]
        parts = weights.modules()[("transformer", name)]
        return scale * parts["lora_B"] @ parts["lora_A"]

    original = read_adapter(tmp_path / "peft.safetensors")
    for n in names:
        assert torch.allclose(delta(again, n), delta(original, n), atol=1e-6), n
    # the fused modules' parts the adapter did not patch (linear1's MLP, the text stream's q and v) come
    # back as zero deltas; nothing else is added
    extra = {n for (_, n) in again.modules()} - set(names)
    assert extra == ({f"single_transformer_blocks.{i}.proj_mlp" for i in range(6)}
                     | {f"transformer_blocks.{i}.attn.add_{x}_proj" for i in range(3) for x in "qv"})
    assert all(not again.modules()[("transformer", n)]["lora_B"].any() for n in extra)


def test_a_flux_stack_fuses_merges_and_grids_like_its_parts(smoke, pipe, tmp_path, reg):
    """Two Flux adapters (one with CLIP) stacked with their own transformer and text-encoder strengths:
    the fused stack renders what the unfused one does, peft's exact ``cat`` merge of the two renders the
    same again, and a strength grid draws one cell per strength with the stack's own image at 0.7."""
    from adapters.compose import AdapterSpec, engine_for
    from adapters.ingest import import_adapter
    from adapters.merge import merge_adapters
    from studio.core.base_models import load_pipeline
    from studio.generation.grid import GridAxis, render_grid

    for layout, seed in (("kohya", 1), ("bfl", 2)):
        factors, clip_factors = _factors(pipe, seed=seed)
        _write(layout, tmp_path / f"{layout}.safetensors", factors, clip_factors, 4.0)
        import_adapter(reg, tmp_path / f"{layout}.safetensors", name=f"stack-{layout}", base=str(smoke))
    stack = [AdapterSpec(ref="stack-kohya", weight=0.6, text_encoders=0.9), AdapterSpec(ref="stack-bfl", weight=0.7)]
    engine = engine_for(load_pipeline(str(smoke)))
    try:
        first = _render(smoke, stack)
        fused = _render(smoke, stack)  # the same stack twice: the engine fuses it
        assert engine.is_fused
        merged = merge_adapters(reg, [("stack-kohya", 0.6), ("stack-bfl", 0.7)], method="cat", name="stack-merged")
        assert merged.family == "flux"
        engine.unload_all()
        # cat keeps both factors side by side: exact, but the text encoder takes the merge weight (0.6),
        # so the stack it equals has CLIP at 0.6 too.
        same_stack = [AdapterSpec(ref="stack-kohya", weight=0.6), AdapterSpec(ref="stack-bfl", weight=0.7)]
        by_stack = _render(smoke, same_stack)
        by_merge = _render(smoke, [AdapterSpec(ref="stack-merged", weight=1.0)])
        grid = render_grid(GenerationRequest(prompt=PROMPT, base_model=str(smoke), seed=4, num_inference_steps=4,
                                             guidance_scale=2.0, adapters=stack),
                           GridAxis("strength", (0.0, 0.7), entry=1), out_dir=tmp_path / "grid")
    finally:
        engine.unload_all()
    assert np.abs(first - fused).max() <= 2, np.abs(first - fused).max()
    assert np.abs(by_stack - by_merge).max() <= 2, np.abs(by_stack - by_merge).max()
    assert np.abs(first - _render(smoke)).mean() > 2
    from PIL import Image

    cell = np.asarray(Image.open(grid.image_paths[0][1]), dtype=np.float32)
    assert np.abs(cell - first).max() <= 2  # the 0.7 cell is the stack itself


def test_inpainting_runs_on_a_flux_model_with_an_adapter(smoke, pipe, tmp_path, reg):
    from PIL import Image

    from adapters.compose import AdapterSpec, engine_for
    from adapters.ingest import import_adapter
    from studio.core.base_models import load_pipeline
    from studio.generation.inputs import store_input_image

    factors, clip_factors = _factors(pipe, seed=11)
    _write("bfl", tmp_path / "bfl.safetensors", factors, clip_factors, None)
    import_adapter(reg, tmp_path / "bfl.safetensors", name="flux-inpaint", base=str(smoke))
    init_pixels = _render(smoke).astype(np.uint8)
    init = store_input_image(Image.fromarray(init_pixels))
    mask_pixels = np.zeros((32, 32), dtype=np.uint8)
    mask_pixels[:, 16:] = 255  # repaint the right half
    mask = store_input_image(Image.fromarray(mask_pixels))
    try:
        result = generate(GenerationRequest(prompt="a yellow square on a black background", base_model=str(smoke),
                                            seed=2, num_inference_steps=4, guidance_scale=2.0, init_image=str(init),
                                            mask_image=str(mask), strength=1.0,
                                            adapters=[AdapterSpec(ref="flux-inpaint", weight=WEIGHT)]))
    finally:
        engine_for(load_pipeline(str(smoke))).unload_all()
    out = np.asarray(result.images[0], dtype=np.float32)
    assert result.request.task == "inpaint" and out.shape == (32, 32, 3)
    assert np.array_equal(out[:, :16], init_pixels[:, :16].astype(np.float32))  # kept: the original pixels
    assert np.abs(out[:, 16:] - init_pixels[:, 16:]).mean() > 5
