"""Adapter formats: detection, validation against the base, import into the registry, export.

Real LoRAs are made on the embedded tiny SD-1 model with peft (``init_lora_weights=False``, so they
change images) and saved the ways other tools save them: diffusers' training-script path (old
diffusers keys + peft config), bare peft keys without metadata, and kohya keys from diffusers'
``convert_state_dict_to_kohya`` with its two known traps fixed by hand. Images are compared as float
arrays from a fixed seed: an adapter that reloads at another strength (alpha lost) shows up as a
different image, which a control test confirms.

Adapter work uses fresh pipelines, never the cached shared one. The bad-file corpus is built by
``tests/bad_files/make_corpus.py`` into ``tmp_path``.
"""

from __future__ import annotations

import importlib.util
import json
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from adapters import formats
from adapters.ingest import default_name, export_adapter, import_adapter
from adapters.registry import Registry
from studio.core import errors, filesafety
from studio.core.errors import (
    CorruptWeightsError,
    IncompatibleAdapterError,
    InvalidNameError,
    InvalidRequestError,
    UnsupportedAdapterError,
)
from studio.core.hashing import tensor_sha256

HERE = Path(__file__).resolve().parent
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
PROMPT = "a red circle on a blue background"
ATOL = 1e-5  # reloads measured bit-identical here; fused/unfused drift is ~2e-6 (FIELD-NOTES)


def _corpus_module():
    spec = importlib.util.spec_from_file_location("make_corpus", HERE / "bad_files" / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_corpus = _corpus_module()




def fresh_pipeline():
    """A private tiny pipeline in float32 (transformers 5 would load the text encoder in its config's float16)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from studio.core.embedded import TINY_MODEL_DIR

    pipe = StableDiffusionPipeline.from_pretrained(TINY_MODEL_DIR, safety_checker=None, requires_safety_checker=False,
                                                   dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, prompt: str = PROMPT):
    import torch

    return pipe(prompt, num_inference_steps=2, guidance_scale=2.0, height=32, width=32,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def image_with(pipe, path, adapter_name: str):
    """Load a LoRA file the way users do (load_lora_weights + set_adapters), render, then remove it."""
    pipe.load_lora_weights(str(path), adapter_name=adapter_name)
    pipe.set_adapters([adapter_name])
    try:
        return render(pipe)
    finally:
        pipe.delete_adapters(adapter_name)


def max_diff(a, b) -> float:
    return float(abs(a - b).max())


def save_peft_file(path: Path, pipe, configs: dict, *, metadata: bool = True) -> Path:
    """peft keys with component prefixes; the configs packed as diffusers packs them ("unet.r")."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    tensors, packed = {}, {}
    for component, config in configs.items():
        for key, value in get_peft_model_state_dict(getattr(pipe, component)).items():
            tensors[f"{component}.{key}"] = value.contiguous()
        for key, value in config.to_dict().items():
            packed[f"{component}.{key}"] = sorted(value) if isinstance(value, set) else value
    md = {"format": "pt"}
    if metadata:
        md[formats.ADAPTER_METADATA_KEY] = json.dumps(packed, default=str)
    save_file(tensors, str(path), metadata=md)
    return path


def tiny_lora_file(path: Path, metadata: dict | None = None) -> Path:
    """A small valid LoRA for the tiny model (one module), for metadata-only tests."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    module = f"unet.{make_corpus.TINY_Q}"
    save_file({f"{module}.lora_A.weight": torch.randn(4, 64, generator=g),
               f"{module}.lora_B.weight": torch.randn(64, 4, generator=g)}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One real LoRA (UNet r=4 alpha=8, text encoder r=4 alpha=2) saved three ways, with its images."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("made")
    pipe = fresh_pipeline()
    base_image = render(pipe)
    torch.manual_seed(0)
    ucfg = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, init_lora_weights=False)
    tcfg = LoraConfig(r=4, lora_alpha=2, target_modules=TE_TARGETS, init_lora_weights=False)
    pipe.unet.add_adapter(ucfg)
    pipe.text_encoder.add_adapter(tcfg)
    reference = render(pipe)
    unet_sd = get_peft_model_state_dict(pipe.unet)
    te_sd = get_peft_model_state_dict(pipe.text_encoder)

    # 1. diffusers' training-script save path (FIELD-NOTES), then metadata other tools add, written back
    StableDiffusionPipeline.save_lora_weights(
        folder / "diffusers", unet_lora_layers=convert_state_dict_to_diffusers(unet_sd),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(te_sd),
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict())
    legacy = folder / "diffusers" / formats.DIFFUSERS_WEIGHT_NAME
    with safe_open(str(legacy), "pt") as f:
        metadata = dict(f.metadata())
    metadata.update({
        "ss_output_name": "zzstyle", "modelspec.trigger_phrase": "zzstyle, red circle", "modelspec.author": "tests",
        "ss_tag_frequency": json.dumps({"10_zzstyle": {"zzstyle": 10, "circle": 7}}), "ss_seed": "1234",
    })
    save_file(load_file(str(legacy)), str(legacy), metadata=metadata)

    # 2. bare peft keys, no metadata: alpha is unknown to every loader
    plain = folder / "peft_plain.safetensors"
    save_file({**{f"unet.{k}": v.contiguous() for k, v in unet_sd.items()},
               **{f"text_encoder.{k}": v.contiguous() for k, v in te_sd.items()}}, str(plain))

    # 3. kohya keys as a third-party tool would write them: diffusers' converter, its traps fixed by hand
    kohya_sd = convert_state_dict_to_kohya({**{f"unet.{k}": v for k, v in unet_sd.items()},
                                            **{f"text_encoder.{k}": v for k, v in te_sd.items()}})
    external = {}
    for key, value in kohya_sd.items():
        key = key.replace("lora_te1_", "lora_te_text_model_")  # transformers 5 spelling -> the usual SD-1 one
        if key.endswith(".alpha"):  # it writes alpha = rank; the int64 dtype it uses is kept
            value = torch.tensor(2 if key.startswith("lora_te_") else 8, dtype=value.dtype)
        external[key] = value.contiguous()
    kohya = folder / "external_kohya.safetensors"
    save_file(external, str(kohya), metadata={"ss_output_name": "zzstyle_kohya", "ss_network_dim": "4"})
    return SimpleNamespace(folder=folder, legacy=legacy, plain=plain, kohya=kohya, base_image=base_image,
                           reference=reference, unet_sd=unet_sd, te_sd=te_sd)


@pytest.fixture(scope="module")
def viewer():
    """A fresh pipeline that test files are loaded into (one at a time, deleted after each image)."""
    return fresh_pipeline()


# --------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------


def test_detect_diffusers_training_script_file(made):
    info = formats.detect(made.legacy.parent)  # the folder save_lora_weights wrote is accepted too
    assert (info.format, info.key_style, info.adapter_type) == ("diffusers", "legacy", "lora")
    assert (info.rank, info.alpha, info.alpha_source) == (4, 8.0, "metadata")
    # the text encoder's alpha 2 is a pattern over the common alpha 8
    assert set(info.alpha_pattern.values()) == {2.0} and len(info.alpha_pattern) == 8
    assert all(k.startswith("text_encoder.") for k in info.alpha_pattern)
    assert info.components == ["unet", "text_encoder"]
    assert info.target_modules == sorted(UNET_TARGETS + TE_TARGETS)
    assert info.num_modules == 64 and info.num_tensors == 128
    assert info.trigger_words == ["zzstyle", "red circle"]
    assert (info.trigger_words_source, info.trigger_words_suggested) == ("modelspec.trigger_phrase", False)
    assert info.metadata["ss_seed"] == "1234" and formats.ADAPTER_METADATA_KEY in info.metadata
    assert info.title == "zzstyle" and info.warnings == []
    assert info.architecture is None  # tiny widths (64) name no known model


def test_detect_without_metadata_defaults_alpha_to_rank_and_says_so(made):
    info = formats.detect(made.plain)
    assert (info.format, info.key_style) == ("diffusers", "peft")
    assert (info.rank, info.alpha, info.alpha_source) == (4, 4.0, "default (alpha = rank)")
    assert any("alpha defaults to the rank" in w for w in info.warnings)


def test_detect_kohya_reads_alpha_tensors(made):
    info = formats.detect(made.kohya)
    assert (info.format, info.key_style, info.adapter_type) == ("kohya", "kohya", "lora")
    assert (info.rank, info.alpha, info.alpha_source) == (4, 8.0, "alpha tensors")
    assert set(info.alpha_pattern.values()) == {2.0}
    assert info.target_modules == sorted(UNET_TARGETS + TE_TARGETS)  # leaf names guessed without a model
    assert info.components == ["unet", "text_encoder"]


def test_detect_kohya_without_alpha_tensors_warns(tmp_path):
    import torch
    from safetensors.torch import save_file

    flat = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{flat}.lora_down.weight": torch.ones(4, 64), f"{flat}.lora_up.weight": torch.ones(64, 4)},
              str(tmp_path / "k.safetensors"), metadata={"ss_network_alpha": "1.0"})
    info = formats.detect(tmp_path / "k.safetensors")
    assert (info.alpha, info.alpha_source) == (4.0, "default (alpha = rank)")
    assert any("ss_network_alpha says 1.0" in w for w in info.warnings)


@pytest.mark.parametrize("metadata, words, source, suggested", [
    ({"modelspec.trigger_phrase": "zz, two words", "ssmd_keywords": "other"}, ["zz", "two words"],
     "modelspec.trigger_phrase", False),
    ({"ssmd_keywords": "kw1,  kw2 ,kw1"}, ["kw1", "kw2"], "ssmd_keywords", False),
    ({"ss_tag_frequency": json.dumps({"5_a": {"rare": 1, "common": 9, "mid": 4}, "2_b": {"rare": 9, "x": 2,
                                                                                          "y": 1, "z": 1}})},
     ["rare", "common", "mid", "x", "y"], "ss_tag_frequency", True),
    ({"ss_tag_frequency": "not json"}, [], None, False),
], ids=["modelspec-first", "ssmd-keywords", "tag-frequency-suggested", "damaged-tags"])
def test_trigger_words_precedence(tmp_path, metadata, words, source, suggested):
    info = formats.detect(tiny_lora_file(tmp_path / "t.safetensors", metadata))
    assert (info.trigger_words, info.trigger_words_source, info.trigger_words_suggested) == (words, source, suggested)


def test_validate_against_reports_matches(made, tiny_pipe):
    from safetensors.torch import load_file

    report = formats.validate_against(tiny_pipe, load_file(str(made.kohya)), "sd1", base_name="tiny")
    assert report.num_modules == 64 and report.components == ("unet", "text_encoder")
    # shapes alone are enough, and SD-1.5 shapes are refused with the widths named
    k2 = f"unet.{make_corpus.TINY_K2}"
    sd15 = {f"{k2}.lora_A.weight": (4, 768), f"{k2}.lora_B.weight": (320, 4)}
    with pytest.raises(IncompatibleAdapterError, match=r"cross-attention dim 768 \(SD-1\.x\); the base 'tiny' has 64"):
        formats.validate_against(tiny_pipe, sd15, "sd1", base_name="tiny")


# --------------------------------------------------------------------------------------------
# import and export round trips
# --------------------------------------------------------------------------------------------


def test_import_export_kohya_import_round_trip(made, viewer, reg, tmp_path):
    from safetensors.torch import load_file

    assert max_diff(made.reference, made.base_image) > 1e-2  # the adapter changes the image
    v1 = import_adapter(reg, made.legacy)
    assert v1.ref == "zzstyle@1"  # named from ss_output_name
    assert (v1.rank, v1.alpha, v1.family, v1.origin, v1.weights_format) == (4, 8.0, "sd1", "imported", "peft")
    assert v1.trigger_words == ("zzstyle", "red circle") and v1.author == "tests"
    assert v1.components == ("unet", "text_encoder") and v1.target_modules == tuple(sorted(UNET_TARGETS + TE_TARGETS))
    assert v1.source["format"] == "diffusers" and v1.source["key_style"] == "legacy"
    stored = v1.safetensors_metadata
    assert stored["ss_seed"] == "1234" and stored["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert formats.detect(v1.path).key_style == "peft"  # canonical: peft keys, whatever came in
    assert max_diff(image_with(viewer, v1.path, "stored"), made.reference) <= ATOL

    kohya = export_adapter(reg, "zzstyle", format="kohya", out=tmp_path / "out" / "k.safetensors")
    tensors = load_file(str(kohya))
    te_alpha = "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"
    unet_alpha = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"
    assert float(tensors[te_alpha]) == 2.0 and float(tensors[unet_alpha]) == 8.0
    assert not any(k.startswith("lora_te1_") for k in tensors)
    info = formats.detect(kohya)
    md = info.metadata
    assert (info.format, info.rank, info.alpha, info.trigger_words) == ("kohya", 4, 8.0, ["zzstyle", "red circle"])
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "4"
    assert md["ss_network_alpha"] == "8.0" and md["ss_base_model_version"] == "sd_v1"
    assert md["ss_output_name"] == md["modelspec.title"] == "zzstyle"
    assert md["modelspec.sai_model_spec"] == "1.0.1" and md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(md["ss_tag_frequency"]) == {"10_zzstyle": {"zzstyle": 10, "circle": 7}}
    assert md["sshs_model_hash"] == tensor_sha256(kohya) and md["modelspec.hash_sha256"] == "0x" + md["sshs_model_hash"]
    assert formats.ADAPTER_METADATA_KEY not in md  # diffusers refuses kohya alphas + adapter metadata together
    assert max_diff(image_with(viewer, kohya, "kohya_export"), made.reference) <= ATOL

    # the same tensors come back: under the same name as the same version, under another name equal
    assert import_adapter(reg, kohya).ref == "zzstyle@1"
    v2 = import_adapter(reg, kohya, name="zzstyle_again")
    assert v2.tensor_sha256 == v1.tensor_sha256 and (v2.alpha, v2.trigger_words) == (8.0, v1.trigger_words)
    a, b = load_file(str(v1.path)), load_file(str(v2.path))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)

    diffusers_out = export_adapter(reg, "zzstyle_again", format="diffusers", out=tmp_path / "out")
    assert diffusers_out.name == "zzstyle_again_v1.safetensors"
    config = json.loads(formats.detect(diffusers_out).metadata[formats.ADAPTER_METADATA_KEY])
    assert (config["unet.r"], config["unet.lora_alpha"], config["text_encoder.lora_alpha"]) == (4, 8, 2)
    assert max_diff(image_with(viewer, diffusers_out, "diffusers_export"), made.reference) <= ATOL
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["k.safetensors", "zzstyle_again_v1.safetensors"]
    assert stat.S_IMODE(kohya.stat().st_mode) == 0o644
    assert max_diff(render(viewer), made.base_image) <= ATOL  # every test adapter was removed again


def test_alpha_lost_is_visible(made, viewer, reg, tmp_path):
    """Control: the same kohya file with alpha = rank (diffusers' converter) gives another image,
    so the equalities above do prove that alpha survived."""
    import torch
    from safetensors.torch import load_file, save_file

    import_adapter(reg, made.legacy)
    kohya = export_adapter(reg, "zzstyle", format="kohya", out=tmp_path / "k.safetensors")
    tensors = {k: (torch.tensor(4.0) if k.endswith(".alpha") else v) for k, v in load_file(str(kohya)).items()}
    save_file(tensors, str(tmp_path / "alpha_is_rank.safetensors"))
    assert max_diff(image_with(viewer, tmp_path / "alpha_is_rank.safetensors", "halved"), made.reference) > 1e-3


def test_third_party_kohya_imports_to_the_same_adapter(made, viewer, reg):
    v = import_adapter(reg, made.kohya)
    assert v.ref == "zzstyle_kohya@1" and (v.rank, v.alpha) == (4, 8.0) and v.source["format"] == "kohya"
    assert max_diff(image_with(viewer, v.path, "from_kohya"), made.reference) <= ATOL
    # what diffusers itself makes of the kohya file agrees
    assert max_diff(image_with(viewer, made.kohya, "diffusers_reads_kohya"), made.reference) <= ATOL
    legacy = import_adapter(reg, made.legacy, name="zzstyle_kohya")  # same tensors, same alphas: same version
    assert legacy.ref == v.ref


def test_same_tensors_with_another_alpha_are_refused(made, reg):
    plain = import_adapter(reg, made.plain, name="style")
    assert (plain.alpha, plain.rank) == (4.0, 4)
    before = reg.list_versions(limit=None)
    with pytest.raises(InvalidRequestError, match=r"style@1 already holds these tensors with alpha 4.*alpha 8"):
        import_adapter(reg, made.legacy, name="style")
    assert reg.list_versions(limit=None) == before


def test_dora_round_trips_in_both_layouts(reg, tmp_path, viewer):
    import torch
    from peft import LoraConfig

    pipe = fresh_pipeline()
    torch.manual_seed(1)
    ucfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "conv1"], init_lora_weights=False,
                      use_dora=True)
    tcfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False, use_dora=True)
    pipe.unet.add_adapter(ucfg)
    pipe.text_encoder.add_adapter(tcfg)
    reference = render(pipe)
    path = save_peft_file(tmp_path / "dora.safetensors", pipe, {"unet": ucfg, "text_encoder": tcfg})
    assert formats.detect(path).adapter_type == "dora"
    v = import_adapter(reg, path, name="dora_style")
    assert (v.adapter_type, v.rank, v.alpha) == ("dora", 4, 8.0)
    # text-encoder magnitudes are stored with '.weight', or diffusers re-initialises them (FIELD-NOTES)
    assert any(k.startswith("text_encoder.") and k.endswith("lora_magnitude_vector.weight")
               for k in filesafety.check_safetensors(v.path).tensors)
    out = export_adapter(reg, "dora_style", format="diffusers", out=tmp_path / "dora_out.safetensors")
    assert max_diff(image_with(viewer, out, "dora"), reference) <= ATOL
    # kohya/LyCORIS layout: dora_scale per output channel, which A1111 and ComfyUI read and the studio
    # reads back into the same peft DoRA
    kohya = export_adapter(reg, "dora_style", format="kohya", out=tmp_path / "dora_kohya.safetensors")
    scales = {k: t.shape for k, t in filesafety.check_safetensors(kohya).tensors.items() if k.endswith(".dora_scale")}
    assert scales["lora_unet_down_blocks_0_resnets_0_conv1.dora_scale"][1:] == (1, 1, 1)
    assert len(scales) == len([k for k in filesafety.check_safetensors(v.path).tensors if "magnitude" in k])
    from safetensors.torch import load_file

    back = import_adapter(reg, kohya, name="dora_back")
    assert (back.adapter_type, back.rank, back.alpha) == ("dora", 4, 8.0)
    ours, theirs = load_file(str(v.path)), load_file(str(back.path))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with pytest.raises(UnsupportedAdapterError, match="DoRA adapters on FLUX.1 export to the diffusers"):
        formats.check_kohya_exportable("dora", "flux")


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_loha_lokr_import_and_export_to_their_own_format(method, reg, tmp_path):
    import torch
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    pipe = fresh_pipeline()
    torch.manual_seed(2)
    config_class = LoHaConfig if method == "loha" else LoKrConfig
    config = config_class(r=4, alpha=8, target_modules=["to_q", "to_out.0", "conv1"], init_weights=False)
    inject_adapter_in_model(config, pipe.unet, adapter_name="default")
    reference = render(pipe)
    path = save_peft_file(tmp_path / f"{method}.safetensors", pipe, {"unet": config})
    info = formats.detect(path)
    assert (info.adapter_type, info.rank, info.alpha, info.alpha_source) == (method, 4, 8.0, "metadata")
    v = import_adapter(reg, path, name=f"{method}_style")
    assert (v.adapter_type, v.rank, v.alpha, v.components) == (method, 4, 8.0, ("unet",))
    out = export_adapter(reg, v.ref, format="diffusers", out=tmp_path / f"{method}_out.safetensors")
    assert load_file(str(out)).keys() == load_file(str(path)).keys()  # stored as-is, peft keys

    def rendered(out):  # reload the way FIELD-NOTES found exact for each method
        check = fresh_pipeline()
        if method == "lokr":
            # use_safetensors=True: without it diffusers reads the file with no metadata and re-guesses the config
            check.unet.load_lora_adapter(str(out), prefix="unet", adapter_name="m", use_safetensors=True)
        else:
            packed = json.loads(formats.detect(out).metadata[formats.ADAPTER_METADATA_KEY])
            loaded = LoHaConfig(**{k.removeprefix("unet."): v for k, v in packed.items() if k.startswith("unet.")})
            inject_adapter_in_model(loaded, check.unet, adapter_name="m")
            result = set_peft_model_state_dict(
                check.unet, {k.removeprefix("unet."): t for k, t in load_file(str(out)).items()}, adapter_name="m")
            assert not result.unexpected_keys
        return render(check)

    assert max_diff(rendered(out), reference) <= ATOL
    # kohya: LyCORIS's keys (A1111, ComfyUI); imported back, the same images (LoKr's scale folded into w1
    # where both factors are full, which LyCORIS runs at scale 1)
    kohya = export_adapter(reg, v.ref, format="kohya", out=tmp_path / "k.safetensors")
    keys = load_file(str(kohya)).keys()
    part = "hada_w1_a" if method == "loha" else "lokr_w1"
    assert any(k.startswith("lora_unet_") and k.endswith(part) for k in keys)
    assert any(k.endswith(".alpha") for k in keys)
    back = import_adapter(reg, kohya, name=f"{method}_back")
    again = export_adapter(reg, back.ref, format="diffusers", out=tmp_path / f"{method}_back.safetensors")
    assert max_diff(rendered(again), reference) <= ATOL


# --------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus.build_corpus(tmp_path_factory.mktemp("bad_files"))


def _snapshot(registry: Registry):
    return registry.list_versions(limit=None), sorted(registry.store)


@pytest.mark.parametrize("name", sorted(make_corpus.CORPUS))
def test_bad_file_is_refused_and_registry_unchanged(name, corpus, reg, made):
    import_adapter(reg, made.plain, name="existing")  # a registry that is not empty
    before = _snapshot(reg)
    error_name, fragments = make_corpus.CORPUS[name]
    with pytest.raises(getattr(errors, error_name)) as caught:
        import_adapter(reg, corpus[name], name="bad")
    message = str(caught.value).lower()
    for fragment in fragments:
        assert fragment.lower() in message, message
    assert _snapshot(reg) == before


@pytest.mark.parametrize("bad", ["../x", "a/b", ".hidden", "-x", "a b", "x@1", ""])
def test_bad_names_are_refused_before_reading(bad, made, reg):
    before = _snapshot(reg)
    with pytest.raises(InvalidNameError):
        import_adapter(reg, made.legacy, name=bad)
    assert _snapshot(reg) == before


def test_default_name_falls_back_and_explains(tmp_path):
    path = tiny_lora_file(tmp_path / "good_stem.safetensors", {"ss_output_name": "my lora v2"})
    assert default_name(formats.detect(path)) == "good_stem"
    path = tiny_lora_file(tmp_path / "bad stem!.safetensors", {"modelspec.title": "also bad/"})
    with pytest.raises(InvalidNameError, match=r"'also bad/' \(from modelspec.title\).*--name also_bad"):
        default_name(formats.detect(path))


def test_suggested_trigger_words_are_not_recorded(tmp_path, reg):
    tags = json.dumps({"1_x": {"zzq": 3, "circle": 1}})
    v = import_adapter(reg, tiny_lora_file(tmp_path / "tagged.safetensors", {"ss_tag_frequency": tags}))
    assert v.trigger_words == () and v.name == "tagged"
    v = import_adapter(reg, tmp_path / "tagged.safetensors", name="tagged2", trigger_words=["zzq"], tags=["shapes"])
    assert v.trigger_words == ("zzq",) and v.tags == ("shapes",)


def test_export_refuses_to_overwrite_without_force(made, reg, tmp_path):
    import_adapter(reg, made.legacy)
    target = tmp_path / "k.safetensors"
    target.write_bytes(b"keep me")
    with pytest.raises(InvalidRequestError, match="already exists"):
        export_adapter(reg, "zzstyle", format="kohya", out=target)
    assert target.read_bytes() == b"keep me"
    export_adapter(reg, "zzstyle", format="kohya", out=target, force=True)
    assert formats.detect(target).format == "kohya"


def test_corrupt_file_errors_name_the_problem_in_detect(corpus):
    with pytest.raises(CorruptWeightsError, match="header length 1000000000 does not fit a 10-byte file"):
        formats.detect(corpus["oversized_header.safetensors"])


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------


def test_cli_import_and_export(made, corpus, tmp_path, capsys, studio_home):
    from studio.app.cli import main

    rc = main(["adapters", "import", str(made.kohya), "--name", "cli_style", "--trigger", "zz", "zz two",
               "--tag", "shapes", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["ref"] == "cli_style@1" and out["trigger_words"] == ["zz", "zz two"]
    assert out["tags"] == ["shapes"] and out["import"]["format"] == "kohya"
    assert out["import"]["already_registered"] is False

    assert main(["adapters", "import", str(made.kohya), "--name", "cli_style"]) == 0
    assert capsys.readouterr().out.startswith("already registered as cli_style@1 (kohya LoRA, rank 4, alpha 8")

    target = tmp_path / "cli.safetensors"
    assert main(["adapters", "export", "cli_style@1", "--format", "diffusers", "--out", str(target), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported == {"path": str(target), "format": "diffusers", "size_bytes": target.stat().st_size}
    assert formats.detect(target).trigger_words == ["zz", "zz two"]

    assert main(["adapters", "import", str(corpus["pickle.ckpt"])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pickle" in err and err.count("\n") == 1
    assert main(["adapters", "export", "cli_style", "--format", "kohya", "--out", str(target)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_export_metadata_follows_the_record(made, reg, tmp_path):
    """Trigger words cleared at import are not resurrected from the source file's metadata."""
    v = import_adapter(reg, made.legacy, name="cleared", trigger_words=[], description="plain")
    assert v.trigger_words == () and v.description == "plain"
    info = formats.detect(export_adapter(reg, v.ref, format="kohya", out=tmp_path / "k.safetensors"))
    assert "modelspec.trigger_phrase" not in info.metadata and info.metadata["modelspec.description"] == "plain"
    assert info.trigger_words_suggested and info.trigger_words == ["zzstyle", "circle"]  # only A1111-style hints


# --------------------------------------------------------------------------------------------
# the one header check in front of every user's safetensors file (issue 11)
# --------------------------------------------------------------------------------------------


HEADER_CORPUS = ["deep_header.safetensors", "boolean_shape.safetensors", "huge_dimension.safetensors",
                 "lone_surrogate.safetensors", "metadata_not_object.safetensors"]


@pytest.mark.parametrize("name", HEADER_CORPUS)
def test_registry_refuses_files_the_safetensors_library_cannot_open(name, corpus, reg):
    from adapters.registry import VersionInfo

    with pytest.raises(CorruptWeightsError, match="cannot be read as safetensors"):
        reg.register("raw", corpus[name], VersionInfo(family="sd1"))
    versions, blobs = _snapshot(reg)
    assert versions.total == 0 and blobs == []


@pytest.mark.parametrize("name", HEADER_CORPUS)
def test_base_model_files_get_the_same_header_check(name, corpus, tmp_path):
    from studio.core.filesafety import check_safetensors as _check_safetensors

    fragments = make_corpus.CORPUS[name][1]
    with pytest.raises(CorruptWeightsError) as caught:
        _check_safetensors(corpus[name])
    assert all(f in str(caught.value).lower() for f in fragments), caught.value


def test_every_corpus_file_the_check_passes_opens_in_safetensors(corpus):
    """The header check is at least as strict as the library: what it lets through, the library reads."""
    from safetensors.torch import load_file

    passed = []
    for name, path in sorted(corpus.items()):
        try:
            filesafety.check_safetensors(path)
        except errors.StudioError:
            continue
        load_file(str(path))
        passed.append(name)
    assert "no_tensors.safetensors" in passed and "deep_header.safetensors" not in passed


def test_damaged_json_in_metadata_is_ignored_with_a_warning(tmp_path):
    deep = "[" * 50_000 + "]" * 50_000
    info = formats.detect(tiny_lora_file(tmp_path / "deep.safetensors", {"lora_adapter_metadata": deep}))
    assert any("is not JSON and was ignored" in w for w in info.warnings)
    for counts in ('{"1_x": {"zzq": 1e400}}', '{"1_x": {"zzq": NaN}}', '{"1_x": ' + deep + "}"):
        info = formats.detect(tiny_lora_file(tmp_path / "tags.safetensors", {"ss_tag_frequency": counts}))
        assert info.trigger_words == []


def test_cli_import_of_a_hostile_header_is_one_line(corpus, capsys):
    from studio.app.cli import main

    for name in ("deep_header.safetensors", "boolean_shape.safetensors"):
        assert main(["adapters", "import", str(corpus[name])]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "cannot be read as safetensors" in err and err.count("\n") == 1
