"""A1111's prompt syntax and infotext: ``<lora:NAME:W>`` tags join the stack (resolved in the registry by
name, alias, hash or imported file name), the studio's PNGs carry the tags, and a PNG whose only
metadata is A1111's ``parameters`` text re-runs through ``--recipe``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file

from studio.core.errors import AdapterNotFoundError, InvalidRequestError
from studio.core.hashing import hash_weights
from studio.generation.prompt_tags import expand_prompt_tags, parse_tags, stack_tags
from studio.generation.recipes import read_recipe
from studio.generation.requests import GenerationRequest

PROMPT = "a red circle on a blue background"


@pytest.mark.parametrize(("prompt", "cleaned", "expected"), [
    (f"{PROMPT} <lora:stripes>", PROMPT, [("stripes", 1.0, 1.0)]),
    (f"<lora:stripes:0.8> {PROMPT}", PROMPT, [("stripes", 0.8, 0.8)]),
    # A1111's order: the first number is the text encoder's (and the UNet's default), the second the UNet's
    (f"{PROMPT}, <lora:a:0.5:1.25>, <LoRA:b:te=0.3:unet=0.9>", f"{PROMPT}, ,",
     [("a", 0.5, 1.25), ("b", 0.3, 0.9)]),
    (f"{PROMPT} <lyco:my style v2:0.7:unet=0>", PROMPT, [("my style v2", 0.7, 0.0)]),
    (f"{PROMPT} <lora:a:te=0.4>", PROMPT, [("a", 0.4, 0.4)]),
    ("<3 a circle, x:y <note:not a network>", "<3 a circle, x:y <note:not a network>", []),
])
def test_tags_read_as_a1111_reads_them(prompt, cleaned, expected):
    text, tags = parse_tags(prompt)
    assert text == cleaned
    assert [(t.name, t.te, t.unet) for t in tags] == expected


@pytest.mark.parametrize(("prompt", "message"), [
    ("x <lora:a:strong>", "'strong' is not a number"),
    ("x <lora::0.5>", "names no adapter"),
    ("x <lora:a:0.5:dyn=16>", "dynamic-rank"),
    ("x <lora:a:1:1:8>", "dynamic-rank"),
    ("x <lora:a:clip=1>", "unknown option 'clip'"),
    ("x <lora:a:nan>", "finite"),
    ("x <hypernet:anime:1>", "does not load hypernetworks"),
])
def test_bad_tags_are_named(prompt, message):
    with pytest.raises(InvalidRequestError, match=message):
        parse_tags(prompt)


def test_stack_tags_write_what_parse_tags_read():
    from adapters.compose import AdapterSpec

    stack = [AdapterSpec("a@1", 0.8, name="a"), AdapterSpec("b@2", 0.5, denoiser=1.25, name="b"),
             AdapterSpec("c@1", 1.0, text_encoders=0.0, name="c")]
    text = stack_tags(stack)
    assert text == "<lora:a:0.8> <lora:b:0.5:1.25> <lora:c:0:1>"
    assert [(t.name, t.te, t.unet) for t in parse_tags(text)[1]] == [("a", 0.8, 0.8), ("b", 0.5, 1.25),
                                                                     ("c", 0.0, 1.0)]


# ---- resolution in the registry and generation ---------------------------------------------------------


@pytest.fixture(scope="module")
def kohya_file(tmp_path_factory, tiny_pipe):
    """A kohya-layout LoRA for the tiny model (the registry stores its canonical conversion, so the
    original file's hashes differ from the stored file's)."""
    modules = dict(tiny_pipe.unet.named_modules())
    tensors = {}
    generator = torch.Generator().manual_seed(0)
    for name in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                 "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"):
        layer = modules[name]
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, layer.in_features, generator=generator) * 0.3
        tensors[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, 4, generator=generator) * 0.3
        tensors[f"{key}.alpha"] = torch.tensor(4.0)
    path = tmp_path_factory.mktemp("civitai") / "Neon_Style-v2.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


@pytest.fixture
def imported(reg, kohya_file):
    from adapters.ingest import import_adapter

    return import_adapter(reg, kohya_file, name="neon")


def test_names_resolve_by_reference_hash_and_imported_file_name(reg, imported, kohya_file):
    original = hash_weights(kohya_file)[1]
    assert original.sha256 != imported.weights_sha256  # stored: the canonical conversion
    reg.set_alias(imported.ref, "prod")
    for text, short in [("neon", None), ("neon@1", None), ("neon@prod", None), ("Neon_Style-v2", None),
                        (original.autov2, None), (original.a1111_legacy, None), (imported.autov2, None),
                        ("whatever the image called it", original.tensor_sha256[:12])]:
        assert reg.find_network(text, short).ref == "neon@1", text
    with pytest.raises(AdapterNotFoundError, match="close matches: Neon_Style-v2") as e:
        reg.find_network("Neon_Style-v1")
    assert "Neon_Style-v2" in e.value.candidates


def test_a_tag_equals_the_adapter_flag_bit_for_bit_and_pngs_carry_the_tags(imported, tmp_path, capsys):
    from studio.app.cli import main

    common = ["--seed", "4", "--steps", "6", "--guidance", "2"]
    _fresh_stack_state()
    assert main(["generate", f"{PROMPT} <lora:neon:0.8>", *common, "--out", str(tmp_path / "tag")]) == 0
    _fresh_stack_state()
    assert main(["generate", PROMPT, "--adapter", "neon:0.8", *common, "--out", str(tmp_path / "flag")]) == 0
    assert main(["generate", PROMPT, *common, "--out", str(tmp_path / "base")]) == 0
    tagged, flagged, base = (next((tmp_path / d).glob("*.png")) for d in ("tag", "flag", "base"))
    pixels = [np.asarray(Image.open(p).convert("RGB")) for p in (tagged, flagged, base)]
    assert np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[0], pixels[2])
    recipe = read_recipe(tagged)  # the studio's own chunk: the cleaned prompt and the resolved stack
    assert recipe.prompt == PROMPT and [(a.ref, a.weight) for a in recipe.adapters] == [("neon@1", 0.8)]
    assert Image.open(tagged).text["parameters"].splitlines()[0] == f"{PROMPT} <lora:neon:0.8>"


def test_an_unknown_tag_is_a_clear_error(imported):
    with pytest.raises(AdapterNotFoundError, match="'neonn'.*close matches: neon"):
        expand_prompt_tags(GenerationRequest(prompt=f"{PROMPT} <lora:neonn:1>"))
    with pytest.raises(InvalidRequestError, match="negative prompt"):
        expand_prompt_tags(GenerationRequest(prompt=PROMPT, negative_prompt="<lora:neon:-1>"))


def _fresh_stack_state():
    """A stack used twice in a row is fused into the weights (a 1/255 rounding away from the unfused run):
    each compared run starts from the same, unfused state, as a fresh process would."""
    from adapters.compose import engine_for
    from studio.core.base_models import load_pipeline

    engine_for(load_pipeline("tiny")).unload_all()


def _a1111_png(path, parameters: str):
    info = PngInfo()
    info.add_text("parameters", parameters)
    Image.new("RGB", (32, 32), "gray").save(path, pnginfo=info)
    return path


def test_an_a1111_png_reruns_with_its_lora_at_its_weight(imported, kohya_file, tmp_path, capsys):
    from studio.app.cli import main

    short = hash_weights(kohya_file)[1].tensor_sha256[:12]
    png = _a1111_png(tmp_path / "civitai.png", (
        f"{PROMPT}, <lora:Neon Style:0.7>\nNegative prompt: green\n"
        f"Steps: 6, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 2, Seed: 11, Size: 32x32, "
        f'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, Lora hashes: "Neon Style: {short}", '
        f"Version: v1.10.1"))
    notes: list[str] = []
    request = read_recipe(png, notes=notes)
    assert (request.prompt, request.negative_prompt) == (f"{PROMPT},", "green")
    assert (request.num_inference_steps, request.scheduler, request.guidance_scale, request.seed) == (
        6, "DPM++ 2M Karras", 2.0, 11)
    assert (request.width, request.height, request.base_model) == (32, 32, "tiny")
    assert [(a.ref, a.weight) for a in request.adapters] == [("neon@1", 0.7)]
    assert any("v1-5-pruned-emaonly" in n for n in notes) and any(n.startswith("Clip skip") for n in notes)

    _fresh_stack_state()
    assert main(["generate", "--recipe", str(png), "--out", str(tmp_path / "rerun")]) == 0
    assert "note: Clip skip" in capsys.readouterr().err
    _fresh_stack_state()
    assert main(["generate", f"{PROMPT},", "--negative", "green", "--adapter", "neon:0.7", "--seed", "11",
                 "--steps", "6", "--guidance", "2", "--scheduler", "DPM++ 2M Karras",
                 "--out", str(tmp_path / "direct")]) == 0
    rerun, direct = (np.asarray(Image.open(next((tmp_path / d).glob("*.png")))) for d in ("rerun", "direct"))
    assert np.array_equal(rerun, direct)


def test_a1111_parameters_that_cannot_be_mapped_are_listed(imported, tmp_path):
    notes: list[str] = []
    png = _a1111_png(tmp_path / "x.png", (f"{PROMPT}\nSteps: 4, Sampler: DPM++ 3M SDE, CFG scale: 3, Seed: 1, "
                                          f'Size: 32x32, Hires upscale: 2, Lora hashes: "other: 0123456789ab"'))
    request = read_recipe(png, notes=notes)
    assert request.scheduler == "Euler" and request.adapters == []
    assert any("DPM++ 3M SDE" in n for n in notes) and any(n.startswith("Hires upscale") for n in notes)
    assert any("'other'" in n and "not applied" in n for n in notes)
    with pytest.raises(Exception, match="not a number"):
        read_recipe(_a1111_png(tmp_path / "y.png", f"{PROMPT}\nSteps: many, Sampler: Euler, CFG scale: 3, Seed: 1"))
