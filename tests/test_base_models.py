"""Base-model references resolve, load offline, refuse pickles and fail fast offline on Hub ids."""

from __future__ import annotations

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
    with pytest.raises(InvalidRequestError, match="known families are sd1"):
        get_family("sd9")
    assert set(FAMILIES) == {"sd1"}


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
