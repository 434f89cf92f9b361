"""Base-model references resolve, load offline, refuse pickles and fail fast offline on Hub ids."""

from __future__ import annotations

import json
import shutil

import pytest

from studio.core.base_models import (
    clear_pipeline_cache,
    list_base_models,
    load_pipeline,
    native_resolution,
    resolve,
)
from studio.core.embedded import TINY_MODEL_DIR
from studio.core.errors import (
    BaseModelNotFoundError,
    CorruptWeightsError,
    InvalidRequestError,
    OfflineError,
    UnsafeWeightsError,
)
from studio.core.families import FAMILIES, get_family


def test_sd1_family_describes_itself():
    sd1 = get_family("sd1")
    assert sd1.pipeline_class("text2img").__name__ == "StableDiffusionPipeline"
    assert sd1.kohya_base_model_version == "sd_v1"
    assert sd1.modelspec_lora_architecture() == "stable-diffusion-v1/lora"
    assert sd1.native_resolution == 512
    assert "to_q" in sd1.target_modules["attention"] and "conv1" in sd1.target_modules["attention+conv"]
    with pytest.raises(InvalidRequestError, match="known families are flux, sd1, sd3, sdxl"):
        get_family("sd9")
    assert set(FAMILIES) == {"sd1", "sdxl", "sd3", "flux"}


def test_tiny_is_the_default_and_loads_offline():
    assert resolve(None).kind == "tiny"
    pipe = load_pipeline("tiny")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert native_resolution(pipe) == 32
    assert pipe.tokenizer.model_max_length == 77 and len(pipe.tokenizer) == 49408
    assert load_pipeline("tiny") is pipe  # cached


def test_local_diffusers_folder(tmp_path):
    folder = tmp_path / "my-model"
    shutil.copytree(TINY_MODEL_DIR, folder)
    ref = resolve(str(folder))
    assert ref.kind == "diffusers" and ref.family == "sd1"
    assert type(load_pipeline(str(folder))).__name__ == "StableDiffusionPipeline"


def test_pickles_are_refused(tmp_path):
    for suffix in (".ckpt", ".pt", ".bin", ".pth"):
        path = tmp_path / f"model{suffix}"
        path.write_bytes(b"\x80\x04not really")
        with pytest.raises(UnsafeWeightsError, match="safetensors only"):
            resolve(str(path))
    folder = tmp_path / "pickled"
    shutil.copytree(TINY_MODEL_DIR, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(UnsafeWeightsError, match="only pickle weights"):
        load_pipeline(str(folder))


def test_corrupt_weights_are_reported(tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(TINY_MODEL_DIR, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    clear_pipeline_cache()
    with pytest.raises(CorruptWeightsError, match="damaged"):
        load_pipeline(str(folder))


def test_hub_id_offline_fails_fast_with_a_local_path_hint():
    ref = resolve("someone/some-model@v2")
    assert ref.kind == "hub" and ref.location == "someone/some-model" and ref.revision == "v2"
    with pytest.raises(OfflineError, match="pass the local folder"):
        load_pipeline("someone/some-model")


def test_unknown_references(tmp_path):
    with pytest.raises(BaseModelNotFoundError, match="not found"):
        resolve("no such model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelNotFoundError, match="no model_index.json"):
        resolve(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InvalidRequestError, match="not a .safetensors checkpoint"):
        resolve(str(tmp_path / "notes.txt"))


def test_list_includes_tiny_and_models_in_home(studio_home):
    models = studio_home / "models"
    shutil.copytree(TINY_MODEL_DIR, models / "copy")
    refs = {r.ref: r for r in list_base_models()}
    assert "tiny" in refs
    assert refs[str(models / "copy")].family == "sd1"


# ---- recognising the family ------------------------------------------------------------------

# Architectures whose files the studio recognises; the tests take the family away (as for an architecture
# the studio knows but does not run) to check the refusal names it.
UNSUPPORTED = {
    "sd3": ("StableDiffusion3Pipeline", "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"),
}


SDXL_SINGLE_FILE_KEY = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"


def _unsupported(name: str, monkeypatch) -> tuple[str, str, str]:
    from studio.core.families import architectures

    monkeypatch.delitem(FAMILIES, name, raising=False)

    return (architectures.display_name(name), *UNSUPPORTED[name])


def _fake_checkpoint(path, *keys):
    """A tiny safetensors file whose tensor names are ``keys`` (recognition reads only the names)."""
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.zeros(2) for k in keys}, str(path))
    return path


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_a_folder_of_an_unsupported_family_is_refused_naming_it(tmp_path, name, monkeypatch):
    display, pipeline_class, _ = _unsupported(name, monkeypatch)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    with pytest.raises(InvalidRequestError, match=f"of the {display} family .*does not run that family yet"):
        resolve(str(folder))


def test_a_folder_of_an_unknown_pipeline_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(InvalidRequestError, match="KandinskyV22Pipeline is not a pipeline of a supported family"):
        resolve(str(folder))
    (folder / "model_index.json").write_text("{}")
    with pytest.raises(CorruptWeightsError, match="not a valid diffusers model_index.json"):
        resolve(str(folder))


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_a_single_file_of_an_unsupported_family_is_refused_naming_it(tmp_path, name, monkeypatch):
    display, _, key = _unsupported(name, monkeypatch)
    path = _fake_checkpoint(tmp_path / "model.safetensors", "model.diffusion_model.input_blocks.0.0.weight", key)
    with pytest.raises(InvalidRequestError, match=f"of the {display} family .*does not run that family yet"):
        resolve(str(path))


def test_single_files_are_recognised_by_their_tensor_names(tmp_path):
    sd1 = _fake_checkpoint(tmp_path / "sd1.safetensors", "model.diffusion_model.input_blocks.0.0.weight",
                           "cond_stage_model.transformer.text_model.final_layer_norm.weight")
    ref = resolve(str(sd1))
    assert (ref.kind, ref.family) == ("single_file", "sd1")
    lora = _fake_checkpoint(tmp_path / "lora.safetensors",
                            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight")
    with pytest.raises(InvalidRequestError, match="not a base-model checkpoint the studio recognises") as e:
        resolve(str(lora))
    assert "cond_stage_model.transformer.*" in str(e.value)  # names what was expected


def test_list_recognises_families_and_lists_what_it_cannot_run(studio_home):
    models = studio_home / "models"
    models.mkdir(parents=True)
    _fake_checkpoint(models / "a-sd1.safetensors", "cond_stage_model.transformer.text_model.final_layer_norm.weight")
    _fake_checkpoint(models / "b-lora.safetensors", "lora_unet_x.lora_down.weight")
    (models / "c-sdxl").mkdir()
    (models / "c-sdxl" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    _fake_checkpoint(models / "d-sdxl.safetensors", SDXL_SINGLE_FILE_KEY)
    (models / "notes.txt").write_text("not a model")
    rows = {r.ref: r for r in list_base_models()}
    files = ("a-sd1.safetensors", "b-lora.safetensors", "c-sdxl", "d-sdxl.safetensors")
    assert set(rows) == {"tiny", "tiny-sdxl", "tiny-flux", "tiny-sd3", *(str(models / n) for n in files)}
    assert rows["tiny"].family == "sd1"
    assert (rows[str(models / "a-sd1.safetensors")].family, rows[str(models / "a-sd1.safetensors")].kind) == (
        "sd1", "single_file")
    lora = rows[str(models / "b-lora.safetensors")]
    assert lora.family == "?" and lora.description.startswith("unsupported: ") and "recognises" in lora.description
    assert rows["tiny-sdxl"].family == "sdxl"
    for name in ("c-sdxl", "d-sdxl.safetensors"):
        row = rows[str(models / name)]
        assert row.family == "sdxl", row  # recognised from model_index.json and from the tensor names


def _hub_cache(root, repo_id: str, revision: str, index: dict | None) -> None:
    """A Hugging Face Hub cache holding ``repo_id``'s model_index.json at ``revision`` (None: the
    cache records that the file does not exist there), laid out as huggingface_hub writes it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / revision).write_text(commit)
    if index is None:
        (repo / ".no_exist" / commit).mkdir(parents=True)
        (repo / ".no_exist" / commit / "model_index.json").write_text("")
    else:
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "model_index.json").write_text(json.dumps(index))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache in tmp_path, as HF_HUB_CACHE would select (huggingface_hub reads it at import)."""
    import huggingface_hub.constants

    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


def test_a_hub_ids_family_comes_from_the_hub_cache_offline(hub_cache):
    _hub_cache(hub_cache, "someone/sd1-model", "v2", {"_class_name": "StableDiffusionPipeline"})
    ref = resolve("someone/sd1-model@v2")
    assert ref.known_family is None and ref.to_dict()["family"] is None  # resolving looked nothing up
    assert ref.family == "sd1"
    assert ref.known_family == "sd1" and ref.to_dict()["family"] == "sd1"


def test_a_hub_ids_family_is_not_guessed(hub_cache):
    ref = resolve("someone/some-model@v2")  # resolving stays offline-safe
    with pytest.raises(OfflineError, match="cannot be known offline"):
        _ = ref.family
    _hub_cache(hub_cache, "someone/no-pipeline", "main", None)
    with pytest.raises(BaseModelNotFoundError, match="not a diffusers pipeline"):
        _ = resolve("someone/no-pipeline").family
    with pytest.raises(InvalidRequestError, match="not a valid Hub id"):
        _ = resolve("someone/two..dots").family
    _hub_cache(hub_cache, "someone/xl", "main", {"_class_name": "StableDiffusionXLPipeline"})
    assert resolve("someone/xl").family == "sdxl"
    _hub_cache(hub_cache, "someone/flux", "main", {"_class_name": "FluxPipeline"})
    assert resolve("someone/flux").family == "flux"
    if "sd3" not in FAMILIES:
        _hub_cache(hub_cache, "someone/sd3", "main", {"_class_name": "StableDiffusion3Pipeline"})
        with pytest.raises(InvalidRequestError, match="SD3 family"):
            _ = resolve("someone/sd3").family


def test_model_hash_hashes_the_denoisers_weights():
    from studio.core.base_models import model_hash
    from studio.core.hashing import file_sha256

    tiny = resolve("tiny")
    denoiser = get_family(tiny.family).denoiser
    weights = sorted((TINY_MODEL_DIR / denoiser).glob("*.safetensors"))[0]
    assert model_hash(tiny) == file_sha256(weights)[:10]
    assert model_hash(resolve("someone/some-model")) == ""
