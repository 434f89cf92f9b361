"""Adapter stacks on the cached tiny pipeline: exactness, equivalence with diffusers, speed policy, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.compose import AdapterEngine, AdapterSpec, engine_for, parse_adapter_arg, resolve_adapter
from studio.core.base_models import load_fresh_pipeline, load_pipeline
from studio.core.errors import InvalidRequestError
from studio.generation.requests import GenerationRequest
from studio.generation.run import generate, generate_with_pipeline

PROMPT = "a red circle on a blue background"


def _save_lora(pipe, out_dir, *, seed, rank=4, alpha=8, text_encoder=True):
    """A random (non-identity) LoRA for the tiny model, saved as diffusers does, alpha metadata kept.

    Text-encoder layers are saved in peft key format: with transformers 5, diffusers'
    convert_state_dict_to_diffusers output for CLIPTextModel does not load back (no text_model level).
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                     init_lora_weights=False)
    pipe.unet.add_adapter(cfg, adapter_name=f"new{seed}")
    kwargs = {}
    if text_encoder:
        tcfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                          init_lora_weights=False)
        pipe.text_encoder.add_adapter(tcfg, adapter_name=f"new{seed}")
        kwargs = {"text_encoder_lora_layers": get_peft_model_state_dict(pipe.text_encoder, adapter_name=f"new{seed}"),
                  "text_encoder_lora_adapter_metadata": tcfg.to_dict()}
    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet, adapter_name=f"new{seed}"))
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=unet_layers,
                                              unet_lora_adapter_metadata=cfg.to_dict(), **kwargs)
    path = out_dir / "pytorch_lora_weights.safetensors"
    named = out_dir / f"style{seed}.safetensors"
    path.rename(named)
    return named


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    yield [_save_lora(load_fresh_pipeline("tiny"), root, seed=s, text_encoder=(s != 2)) for s in range(3)]
    # Leave the shared cached pipeline as other tests expect it: no adapter layers, exact base weights.
    engine_for(load_pipeline("tiny")).unload_all()


def _px(request) -> np.ndarray:
    return np.asarray(generate(request).images[0]).astype(int)


def _req(adapters=(), **kw):
    return GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=8, guidance_scale=2.0,
                             adapters=list(adapters), **kw)


def test_parse_adapter_arg():
    assert parse_adapter_arg("mystyle@2:0.8") == AdapterSpec("mystyle@2", 0.8)
    assert parse_adapter_arg("sha256:0123abcd") == AdapterSpec("sha256:0123abcd")
    assert parse_adapter_arg("sha256:0123abcd:-0.5") == AdapterSpec("sha256:0123abcd", -0.5)
    assert parse_adapter_arg("mystyle") == AdapterSpec("mystyle", 1.0)


def test_spec_strengths_are_spelled_by_the_family_and_read_in_any_spelling():
    from studio.core.families import get_family

    sd1 = get_family("sd1")
    spec = AdapterSpec("style@2", 0.8, denoiser=0.5, text_encoders=0.0, name="style", version=2,
                       tensor_sha256="ab" * 32)
    assert (spec.denoiser_weight, spec.text_encoder_weight) == (0.5, 0.0)
    # SD-1 recipes keep the keys they always had, so the reader of earlier studios reads new ones.
    written = spec.to_dict(sd1)
    assert written == {"ref": "style@2", "weight": 0.8, "unet": 0.5, "text_encoder": 0.0, "name": "style",
                       "version": 2, "tensor_sha256": "ab" * 32}
    assert AdapterSpec.from_dict(written) == spec
    # Without a family, the role names; they read back the same.
    assert AdapterSpec.from_dict(spec.to_dict()) == spec and "denoiser" in spec.to_dict()
    # A pinned file adapter says it has no version; null values mean the defaults.
    file_spec = AdapterSpec("/x/style.safetensors", name="style", tensor_sha256="cd" * 32)
    assert file_spec.to_dict(sd1)["version"] is None
    assert AdapterSpec.from_dict({"ref": "a", "weight": None, "unet": None}) == AdapterSpec("a")
    with pytest.raises(InvalidRequestError, match="denoiser strength twice"):
        AdapterSpec.from_dict({"ref": "a", "unet": 0.5, "denoiser": 0.4})
    for bad, message in (({"ref": "a", "unet_strength": 1}, "unknown fields"), ({"weight": 1}, "needs at least"),
                         ({"ref": "a", "version": "2"}, "version must be a whole number"),
                         ({"ref": "a", "tensor_sha256": "AB"}, "64 lowercase hex"),
                         ({"ref": "a", "weight": 10**400}, r"\[-4, 4\]"), ({"ref": 5}, "must be text")):
        with pytest.raises(InvalidRequestError, match=message) as caught:
            AdapterSpec.from_dict(bad)
        assert len(str(caught.value)) < 200


def test_all_zero_weights_give_the_base_bit_for_bit_even_after_fusing(loras):
    base = _px(_req())
    stack = [AdapterSpec(str(p), 0.8) for p in loras]
    styled = _px(_req(stack))
    again = _px(_req(stack))  # second use of the same stack: fused
    assert engine_for(load_pipeline("tiny")).is_fused
    assert np.abs(styled - base).max() > 20
    assert np.abs(styled - again).max() <= 1  # fused vs unfused: float rounding only
    zero = _px(_req([AdapterSpec(str(p), 0.0) for p in loras]))
    assert np.array_equal(zero, base)
    assert np.array_equal(_px(_req()), base)  # an empty stack after fusing restores the exact base


def test_one_adapter_equals_plain_diffusers(loras):
    ours = _px(_req([AdapterSpec(str(loras[0]), 1.0)]))
    ref_pipe = load_fresh_pipeline("tiny")
    ref_pipe.load_lora_weights(str(loras[0].parent), weight_name=loras[0].name, adapter_name="reference_style")
    ref_pipe.set_adapters(["reference_style"], adapter_weights=[1.0])
    theirs = np.asarray(generate_with_pipeline(ref_pipe, _req()).images[0]).astype(int)
    assert np.array_equal(ours, theirs)


def test_text_encoder_part_of_an_adapter_is_applied(loras):
    base = _px(_req())
    te_only = _px(_req([AdapterSpec(str(loras[0]), 1.0, denoiser=0.0)]))
    assert np.abs(te_only - base).max() > 5  # a silently dropped text-encoder LoRA would be a no-op


def test_stacks_are_order_independent(loras):
    stack = [AdapterSpec(str(p), w) for p, w in zip(loras, (0.6, -0.4, 0.9))]
    a = _px(_req(stack))
    b = _px(_req(stack[::-1]))
    assert np.abs(a - b).max() <= 1


def test_changing_weights_reads_no_file_and_loads_each_adapter_once(loras):
    pipe = load_fresh_pipeline("tiny")
    engine = AdapterEngine(pipe)
    resolved = [resolve_adapter(str(p)) for p in loras]
    for w in (0.2, 0.5, 0.5, 1.0, -1.0):
        engine.apply([AdapterSpec(str(p), w) for p in loras], resolved)
    assert engine.stats.loads == 3
    assert engine.stats.fuses == 1  # 0.5 was used twice in a row


def test_cache_bound_evicts_least_recently_used(loras):
    pipe = load_fresh_pipeline("tiny")
    engine = AdapterEngine(pipe, cache_size=2)
    resolved = [resolve_adapter(str(p)) for p in loras]
    for spec, r in zip(loras, resolved):
        engine.apply([AdapterSpec(str(spec), 1.0)], [r])
    assert engine.stats.evictions == 1
    assert len(set().union(*pipe.get_list_adapters().values())) == 2


def test_per_component_and_per_block_weights(loras):
    base = _px(_req())
    blocks = _px(_req([AdapterSpec(str(loras[1]), 1.0, blocks={"down": 0.0, "mid": 0.0, "up": 0.0},
                                   text_encoders=0.0)]))
    assert np.array_equal(blocks, base)
    some = _px(_req([AdapterSpec(str(loras[1]), 1.0, blocks={"down": 1.0, "up": {"block_0": 0.5}})]))
    assert not np.array_equal(some, base)


def test_bad_input_is_refused_and_leaves_the_pipeline_clean(loras, tmp_path):
    base = _px(_req())
    with pytest.raises(InvalidRequestError, match=r"\[-4, 4\]"):
        _req([AdapterSpec(str(loras[0]), 5.0)])
    with pytest.raises(InvalidRequestError, match="does not exist"):
        _px(_req([AdapterSpec(str(tmp_path / "missing.safetensors"), 1.0)]))
    with pytest.raises(InvalidRequestError, match="unknown parts"):
        AdapterSpec(str(loras[0]), blocks={"left": 1.0})
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(loras[0].read_bytes()[:5000])
    with pytest.raises(Exception, match="damaged|safetensors"):
        _px(_req([AdapterSpec(str(loras[0]), 1.0), AdapterSpec(str(broken), 1.0)]))
    assert np.array_equal(_px(_req()), base)  # the next request is unaffected


def test_recipe_records_adapters_and_reruns_the_same_bytes_in_a_fresh_process(loras, tmp_path):
    out = generate(_req([AdapterSpec(str(loras[0]), 0.7), AdapterSpec(str(loras[2]), -0.3)]))
    path = out.save(tmp_path / "a")[0]
    text = Image.open(path).text
    assert 'Lora hashes: "style0: ' in text["parameters"] and "style2: " in text["parameters"]
    recorded = json.loads(text["lora_studio"])["request"]["adapters"]
    assert [a["weight"] for a in recorded] == [0.7, -0.3] and all(len(a["tensor_sha256"]) == 64 for a in recorded)
    proc = subprocess.run([sys.executable, "-m", "studio.app.cli", "generate", "--recipe", str(path),
                           "--out", str(tmp_path / "b"), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout.strip().splitlines()[-1])[0]["path"]
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(again)))


def test_split_strengths_are_recorded_under_the_family_component_names(loras, tmp_path):
    from studio.generation.recipes import read_recipe

    out = generate(_req([AdapterSpec(str(loras[0]), 0.7, denoiser=0.5, text_encoders=0.0)]))
    path = out.save(tmp_path)[0]
    recorded = json.loads(Image.open(path).text["lora_studio"])["request"]["adapters"][0]
    assert (recorded["unet"], recorded["text_encoder"]) == (0.5, 0.0) and "denoiser" not in recorded
    assert read_recipe(path).adapters == out.outputs[0].request.adapters


def test_cli_adapter_flag(loras, tmp_path, capsys):
    from studio.app.cli import main

    assert main(["generate", PROMPT, "--seed", "2", "--steps", "4", "--adapter", f"{loras[1]}:0.5",
                 "--out", str(tmp_path), "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[0]
    assert "style1: " in Image.open(row["path"]).text["parameters"]


def test_unload_all_leaves_plain_modules_and_exact_base(loras):
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = load_fresh_pipeline("tiny")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    engine = AdapterEngine(pipe)
    resolved = [resolve_adapter(str(p)) for p in loras]
    stack = [AdapterSpec(str(p), 0.9) for p in loras]
    engine.apply(stack, resolved)
    engine.apply(stack, resolved)  # fused
    engine.unload_all()
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# -- DoRA, LoHa and LoKr ------------------------------------------------------------------------

METHODS = ("dora", "loha", "lokr")


def _save_method_adapter(out_dir, method, *, seed):
    """A random (non-identity) DoRA/LoHa/LoKr on the tiny UNet in the registry's canonical file format.

    Returns (path, pixels the adapter gives at strength 1 on the pipeline it was made on): the reference
    a correctly loaded adapter must reproduce.
    """
    from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from adapters.formats import ADAPTER_METADATA_KEY, read_adapter, to_diffusers

    pipe = load_fresh_pipeline("tiny")
    torch.manual_seed(seed)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    cfg = {"dora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                      use_dora=True),
           "loha": lambda: LoHaConfig(r=4, alpha=8, target_modules=targets, init_weights=False),
           "lokr": lambda: LoKrConfig(r=4, alpha=8, target_modules=targets, init_weights=False)}[method]()
    inject_adapter_in_model(cfg, pipe.unet, adapter_name=f"made_{method}")
    if method == "loha":  # peft's random LoHa factors are small and their product smaller: make it visible
        with torch.no_grad():
            for name, param in pipe.unet.named_parameters():
                if ".hada_" in name:
                    param.mul_(2.0)
    tensors = {f"unet.{k}": v.contiguous()
               for k, v in get_peft_model_state_dict(pipe.unet, adapter_name=f"made_{method}").items()}
    packed = {f"unet.{k}": sorted(v) if isinstance(v, set) else v for k, v in cfg.to_dict().items()}
    raw = out_dir / f"raw_{method}{seed}.safetensors"
    save_file(tensors, str(raw), metadata={ADAPTER_METADATA_KEY: json.dumps(packed, default=str)})
    path = to_diffusers(read_adapter(raw), out_dir / f"{method}{seed}.safetensors")  # as the importer writes it
    reference = np.asarray(generate_with_pipeline(pipe, _req()).images[0]).astype(int)
    return path, reference


@pytest.fixture(scope="module")
def method_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    return {m: _save_method_adapter(root, m, seed=10 + i) for i, m in enumerate(METHODS)}


def _engine_px(pipe, engine, specs):
    engine.apply(specs, [resolve_adapter(s.ref) for s in specs])
    return np.asarray(generate_with_pipeline(pipe, _req()).images[0]).astype(int)


def test_canonical_files_declare_their_method(method_adapters):
    from adapters.formats import detect

    for method, (path, _) in method_adapters.items():
        assert detect(path).adapter_type == method


@pytest.mark.parametrize("method", METHODS)
def test_each_method_applies_exactly_and_zero_weight_is_the_base(method_adapters, method):
    path, reference = method_adapters[method]
    pipe = load_fresh_pipeline("tiny")
    engine = AdapterEngine(pipe)
    base = _engine_px(pipe, engine, [])
    full = _engine_px(pipe, engine, [AdapterSpec(str(path), 1.0)])
    assert np.abs(full - base).max() > 5
    assert np.abs(full - reference).max() <= 1  # loaded as made: same strength, same factors
    zero = _engine_px(pipe, engine, [AdapterSpec(str(path), 0.0)])
    assert np.array_equal(zero, base)
    assert engine.stats.loads == 1


def test_mixed_stack_of_every_method_generates_fuses_and_restores_the_base(loras, method_adapters):
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = load_fresh_pipeline("tiny")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    engine = AdapterEngine(pipe)
    base = _engine_px(pipe, engine, [])
    refs = [str(loras[0])] + [str(method_adapters[m][0]) for m in METHODS]
    mixed = _engine_px(pipe, engine, [AdapterSpec(r, 0.7) for r in refs])
    assert np.abs(mixed - base).max() > 5
    assert set(pipe.get_list_adapters()["unet"]) == {e.adapter_name for e in engine._loaded.values()}
    loads = engine.stats.loads
    assert loads == 4
    fused = _engine_px(pipe, engine, [AdapterSpec(r, 0.7) for r in refs])  # same stack twice: fused
    assert engine.is_fused and np.abs(fused - mixed).max() <= 1
    for weights in ((0.2, -0.5, 1.0, 0.3), (1.0, 0.0, 0.0, -1.0)):
        changed = _engine_px(pipe, engine, [AdapterSpec(r, w) for r, w in zip(refs, weights)])
        assert not np.array_equal(changed, mixed)
    assert engine.stats.loads == loads  # weight changes read no file
    assert np.array_equal(_engine_px(pipe, engine, [AdapterSpec(r, 0.0) for r in refs]), base)
    engine.unload_all()
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_loha_and_lokr_weights_follow_set_adapters(method_adapters):
    pipe = load_fresh_pipeline("tiny")
    engine = AdapterEngine(pipe)
    refs = [str(method_adapters[m][0]) for m in ("loha", "lokr")]
    half = _engine_px(pipe, engine, [AdapterSpec(r, 0.5) for r in refs])
    loads = engine.stats.loads
    full = _engine_px(pipe, engine, [AdapterSpec(r, 1.0) for r in refs])
    again = _engine_px(pipe, engine, [AdapterSpec(r, 0.5) for r in refs])
    assert not np.array_equal(half, full)
    assert np.array_equal(half, again)
    assert engine.stats.loads == loads


def test_registry_references_generate(loras, reg):
    """Registry blobs are named by hash only; diffusers must still read them as safetensors."""
    from adapters.ingest import import_adapter

    version = import_adapter(reg, loras[0], name="stripes-test")
    assert version.path.suffix == ""  # a bare blob name: the case that once reached diffusers' pickle path
    by_ref = _px(_req([AdapterSpec("stripes-test@1", 0.8)]))
    by_path = _px(_req([AdapterSpec(str(loras[0]), 0.8)]))
    assert np.array_equal(by_ref, by_path)
    out = generate(_req([AdapterSpec("stripes-test@latest", 0.8)]))
    assert out.outputs[0].request.adapters[0].ref == "stripes-test@1"


# -- strength changes without set_adapters, family and reference errors ---------------------------------


def test_strength_change_of_a_fused_stack_rescales_exactly_and_reads_no_file(loras):
    """The fast path (exact unfuse by copy, set_scale on cached layers) gives what a fresh engine gives."""
    first = [AdapterSpec(str(p), w) for p, w in zip(loras, (0.8, 0.5, -0.3))]
    second = [AdapterSpec(s.ref, s.weight * 0.6, text_encoders=0.2) for s in first]
    resolved = [resolve_adapter(s.ref) for s in first]
    pipe = load_fresh_pipeline("tiny")
    engine = AdapterEngine(pipe)
    engine.apply(first, resolved)
    engine.apply(first, resolved)
    assert engine.is_fused
    engine.apply(second, resolved)
    assert not engine.is_fused and engine.stats.rescales == 2 and engine.stats.loads == 3
    fast = np.asarray(generate_with_pipeline(pipe, _req()).images[0]).astype(int)
    scales = {(c, q): dict(m.scaling) for c, q, m in engine._adapter_layers()}
    ref_pipe = load_fresh_pipeline("tiny")
    ref_engine = AdapterEngine(ref_pipe)
    ref_engine.apply(second, resolved)  # set_adapters path
    assert ref_engine.stats.rescales == 0
    assert scales == {(c, q): dict(m.scaling) for c, q, m in ref_engine._adapter_layers()}
    assert np.array_equal(fast, np.asarray(generate_with_pipeline(ref_pipe, _req()).images[0]).astype(int))
    # and the base weights under the layers are the exact base again after the copy-back unfuse
    clean = load_fresh_pipeline("tiny").unet.state_dict()
    unet_layers = [q for c, q in engine._snapshot if c == "unet"]
    assert unet_layers
    for qual in unet_layers:
        assert torch.equal(pipe.unet.get_submodule(qual).get_base_layer().weight, clean[f"{qual}.weight"])


def test_adapter_for_another_family_is_refused_before_touching_the_pipeline(loras, reg):
    from adapters.registry import VersionInfo
    from studio.core.errors import AdapterNotFoundError, IncompatibleAdapterError

    base = _px(_req())
    reg.register("xl-style", loras[0], VersionInfo(family="sdxl"))
    with pytest.raises(IncompatibleAdapterError, match="sdxl family .* is sd1"):
        _px(_req([AdapterSpec(str(loras[1]), 1.0), AdapterSpec("xl-style", 1.0)]))
    with pytest.raises(AdapterNotFoundError, match="no-such-style"):
        _px(_req([AdapterSpec(str(loras[1]), 1.0), AdapterSpec("no-such-style@2", 1.0)]))
    with pytest.raises(InvalidRequestError, match="non-empty dict"):
        _req([AdapterSpec(str(loras[1]), 1.0, blocks={})])
    assert np.array_equal(_px(_req()), base)  # nothing of the refused stacks stayed on the pipeline


def test_img2img_and_inpainting_apply_the_adapter_stack(loras, tmp_path):
    init = tmp_path / "init.png"
    generate(_req()).images[0].save(init)
    mask = tmp_path / "mask.png"
    m = Image.new("L", (32, 32), 0)
    m.paste(255, (0, 0, 32, 16))  # repaint the top half
    m.save(mask)
    for extra in ({"init_image": str(init), "strength": 0.6},
                  {"init_image": str(init), "mask_image": str(mask), "strength": 1.0}):
        plain = _px(_req(**extra))
        styled = _px(_req([AdapterSpec(str(loras[0]), 1.0)], **extra))
        assert np.abs(styled - plain).max() > 20
        zero = _px(_req([AdapterSpec(str(loras[0]), 0.0)], **extra))
        assert np.array_equal(zero, plain)
        if "mask_image" in extra:  # the kept half is the init image in both
            assert np.array_equal(styled[16:], np.asarray(Image.open(init)).astype(int)[16:])
    assert np.array_equal(_px(_req()), np.asarray(Image.open(init)).astype(int))  # text-to-image unaffected
