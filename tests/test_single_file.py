"""Single-file export: the LDM/A1111 layout, an exact round trip through diffusers' loader, clear errors."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from studio.app.cli import main
from studio.core.base_models import export_single_file, load_fresh_pipeline, load_pipeline
from studio.core.embedded import TINY_MODEL_DIR
from studio.core.errors import CorruptWeightsError, InvalidRequestError, UnsafeWeightsError
from studio.core.families import get_family
from studio.core.single_file import (
    CONFIGS_KEY,
    FORMAT_KEY,
    read_metadata,
    to_single_file,
)
from studio.generation.requests import GenerationRequest
from studio.generation.run import generate

PROMPT = "a red circle on a blue background"
LAYOUT = get_family("sd1").single_file


@pytest.fixture(scope="session")
def source(tmp_path_factory) -> str:
    """A tiny SD-1 base-model reference: the embedded model, or a smoke build where it has no weights."""
    if (TINY_MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors").exists():
        return "tiny"
    from studio.app.tiny.build import BuildConfig, build

    out = tmp_path_factory.mktemp("tiny-smoke")
    cfg = BuildConfig(vae_steps=3, vae_batch=4, unet_steps=3, unet_batch=4, scenes_per_combo=1, warmup_steps=1,
                      eval_steps=2)
    build(out, cfg, log=lambda _msg: None, run_eval=False)
    return str(out)


@pytest.fixture(scope="session")
def exported(source, tmp_path_factory):
    return export_single_file(source, tmp_path_factory.mktemp("export") / "model.safetensors")


def _keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def test_export_writes_one_ldm_layout_file(exported):
    assert stat.S_IMODE(os.stat(exported).st_mode) == 0o644
    assert os.listdir(exported.parent) == ["model.safetensors"]  # no temp file left behind
    metadata = read_metadata(exported)
    # The format name files already written carry: it must never change.
    assert metadata[FORMAT_KEY] == LAYOUT.format == "sd1-ldm-single-file" and metadata["format"] == "pt"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"
    configs = json.loads(metadata[CONFIGS_KEY])
    assert set(configs) == {"unet", "vae", "text_encoder", "scheduler", "_pipeline"}
    assert configs["_pipeline"] == {"requires_safety_checker": False}
    assert json.loads(metadata["lora_studio.tokenizers"]) == {"tokenizer": {"pad_token": "<|endoftext|>"}}

    from safetensors import safe_open

    keys = _keys(exported)
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in keys)
    for key in (
        "model.diffusion_model.time_embed.0.weight",
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.2.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.1.2.conv.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.0.downsample.conv.weight",
        "first_stage_model.decoder.up.0.block.0.norm1.weight",
        "first_stage_model.decoder.up.2.upsample.conv.weight",
        "first_stage_model.encoder.norm_out.weight",
        "first_stage_model.quant_conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in keys, key
    with safe_open(str(exported), framework="pt") as f:
        for part in ("encoder", "decoder"):
            for name in ("q", "k", "v", "proj_out"):
                shape = f.get_slice(f"first_stage_model.{part}.mid.attn_1.{name}.weight").get_shape()
                assert len(shape) == 4 and shape[2:] == [1, 1] and shape[0] == shape[1]


def test_single_file_loads_back_exactly(source, exported):
    import torch

    original, loaded = load_fresh_pipeline(source), load_pipeline(str(exported))
    assert loaded is not original
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(original, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # The tiny model is not SD-1.5 shaped: these come from the configs the file carries.
    assert loaded.vae.config.scaling_factor == original.vae.config.scaling_factor
    assert loaded.unet.config.block_out_channels == original.unet.config.block_out_channels
    assert type(loaded.scheduler) is type(original.scheduler)
    assert dict(loaded.scheduler.config) == dict(original.scheduler.config)


def test_single_file_generates_the_same_pixels(source, exported):
    images = [
        generate(GenerationRequest(prompt=PROMPT, base_model=base, seed=1, num_inference_steps=4, guidance_scale=2.0))
        .images[0]
        for base in (source, str(exported))
    ]
    assert np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_sd15_shaped_models_get_the_layout_diffusers_reads():
    """Real SD-1.5 shapes (4 blocks, a DownBlock2D/UpBlock2D, 2 layers), mapped without any weights."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        CHECKPOINT_KEY_NAMES,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    configs = LAYOUT.config_dir
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads((configs / "unet" / "config.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((configs / "vae" / "config.json").read_text()))
    unet_sd, vae_sd = unet.state_dict(), vae.state_dict()
    ldm_unet = to_single_file(LAYOUT, "unet", unet_sd, unet.config)
    ldm_vae = to_single_file(LAYOUT, "vae", vae_sd, vae.config)
    # The key counts and landmarks of an original SD-1.5 checkpoint.
    assert len(ldm_unet) == 686 and len(ldm_vae) == 248
    assert CHECKPOINT_KEY_NAMES["v1"] in ldm_unet
    samplers = sorted(k for k in ldm_unet if k.endswith(("op.weight", "conv.weight")))
    assert samplers == [
        f"model.diffusion_model.{k}.weight"
        for k in ("input_blocks.3.0.op", "input_blocks.6.0.op", "input_blocks.9.0.op",
                  "output_blocks.2.1.conv", "output_blocks.5.2.conv", "output_blocks.8.2.conv")
    ]
    assert "model.diffusion_model.input_blocks.11.0.out_layers.3.weight" in ldm_unet
    assert "first_stage_model.decoder.up.3.block.2.conv2.weight" in ldm_vae
    assert "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight" in ldm_vae
    # diffusers' own conversion takes every tensor back to where it came from.
    back = convert_ldm_unet_checkpoint(ldm_unet, dict(unet.config))
    assert back.keys() == unet_sd.keys() and all(back[k] is unet_sd[k] for k in unet_sd)
    vae_back = convert_ldm_vae_checkpoint(ldm_vae, dict(vae.config))
    assert vae_back.keys() == vae_sd.keys() and all(vae_back[k].shape == vae_sd[k].shape for k in vae_sd)


def test_damaged_files_fail_clearly(tmp_path, exported):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a weights file at all")
    truncated = tmp_path / "truncated.safetensors"
    data = exported.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for path in (garbage, truncated):
        with pytest.raises(CorruptWeightsError, match="cannot be read as safetensors"):
            load_pipeline(str(path))


def test_damaged_or_hostile_embedded_configs_are_refused(tmp_path, exported):
    import torch
    from safetensors.torch import save_file

    configs = json.loads(read_metadata(exported)[CONFIGS_KEY])
    cases = {
        "not-json": "{not json",
        "missing": json.dumps({"unet": configs["unet"]}),
        "scheduler": json.dumps({**configs, "scheduler": {**configs["scheduler"], "_class_name": "os"}}),
        "unet": json.dumps({**configs, "unet": {**configs["unet"], "_class_name": "SD3Transformer2DModel"}}),
    }
    cases["format"] = (json.dumps(configs), "sdxl-ldm-single-file")
    for name, raw in cases.items():
        raw, written_as = raw if isinstance(raw, tuple) else (raw, LAYOUT.format)
        path = tmp_path / f"{name}.safetensors"
        # One SD-1 text-encoder tensor: enough for the file to be recognised as SD-1 and reach its configs.
        save_file({"cond_stage_model.transformer.text_model.x": torch.zeros(1)}, str(path),
                  metadata={CONFIGS_KEY: raw, FORMAT_KEY: written_as})
        with pytest.raises(CorruptWeightsError, match="damaged model configs"):
            load_pipeline(str(path))


def test_files_without_configs_use_sd15s_and_say_what_does_not_fit(tmp_path, exported):
    from safetensors.torch import load_file, save_file

    plain = tmp_path / "plain.safetensors"  # what a tiny checkpoint from another tool would look like
    save_file(load_file(str(exported)), str(plain), metadata={"format": "pt"})
    with pytest.raises(CorruptWeightsError, match="not a Stable Diffusion 1.x checkpoint the studio can read"):
        load_pipeline(str(plain))


def test_pickles_and_other_targets_are_refused(tmp_path, source):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04not really")
    with pytest.raises(UnsafeWeightsError, match="safetensors only"):
        load_pipeline(str(ckpt))
    with pytest.raises(InvalidRequestError, match="must end in .safetensors"):
        export_single_file(source, tmp_path / "out.ckpt")
    with pytest.raises(InvalidRequestError, match="dtype must be one of"):
        export_single_file(source, tmp_path / "out.safetensors", dtype="int8")
    with pytest.raises(InvalidRequestError, match="object has no single-file layout"):
        export_single_file(object(), tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_export(tmp_path, source, exported, capsys):
    out = tmp_path / "cli" / "model.safetensors"
    assert main(["base-models", "export", source, str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(_keys(out)) == sorted(_keys(exported))

    assert main(["base-models", "export", source, str(out)]) == 2
    assert "already exists: pass --force" in capsys.readouterr().err

    assert main(["base-models", "export", source, str(out), "--force", "--dtype", "float16", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row == {"path": str(out), "size_bytes": out.stat().st_size}
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert str(f.get_slice("model.diffusion_model.out.2.weight").get_dtype()) == "F16"
