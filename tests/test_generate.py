"""Generation: request validation, the seed rule, recipes that re-run bit for bit, samplers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from studio.errors import InvalidRequestError, RecipeError
from studio.generate import (
    RECIPE_KEY,
    SCHEDULERS,
    GenerationRequest,
    generate,
    read_recipe,
)

PROMPT = "a red circle on a blue background"


def _px(image) -> np.ndarray:
    return np.asarray(image)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"width": 30}, "multiple of 8"),
        ({"height": 4}, "multiple of 8"),
        ({"num_inference_steps": 0}, "steps must be"),
        ({"num_images": 0}, "number of images"),
        ({"seed": -1}, "seed must be"),
        ({"guidance_scale": -1.0}, "guidance scale"),
        ({"scheduler": "Eulerish"}, "choose one of 'Euler'"),
    ],
)
def test_bad_requests_name_the_problem(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        GenerationRequest(prompt=PROMPT, **kwargs)


def test_image_i_of_a_batch_equals_seed_plus_i_alone():
    batch = generate(GenerationRequest(prompt=PROMPT, seed=10, num_images=3, num_inference_steps=8))
    assert batch.seeds == [10, 11, 12]
    alone = generate(GenerationRequest(prompt=PROMPT, seed=12, num_images=1, num_inference_steps=8))
    assert np.array_equal(_px(batch.images[2]), _px(alone.images[0]))
    assert not np.array_equal(_px(batch.images[0]), _px(batch.images[1]))


def test_native_size_and_random_seed_are_resolved_and_recorded():
    result = generate(GenerationRequest(prompt=PROMPT, num_inference_steps=4))
    assert result.images[0].size == (32, 32)
    assert result.request.seed is not None and result.outputs[0].request.width == 32


def test_other_sizes_work():
    result = generate(GenerationRequest(prompt=PROMPT, seed=1, width=64, height=48, num_inference_steps=4))
    assert result.images[0].size == (64, 48)


def test_recipe_round_trip_is_bit_exact(tmp_path):
    result = generate(GenerationRequest(prompt=PROMPT, negative_prompt="green", seed=7, num_images=2,
                                        num_inference_steps=10, scheduler="Euler a", guidance_scale=5.5))
    paths = result.save(tmp_path)
    request = read_recipe(paths[1])
    assert request.seed == 8 and request.num_images == 1 and request.scheduler == "Euler a"
    again = generate(request)
    assert np.array_equal(_px(again.images[0]), _px(Image.open(paths[1]).convert("RGB")))


def test_png_carries_a1111_parameters(tmp_path):
    result = generate(GenerationRequest(prompt=PROMPT, negative_prompt="blurry", seed=3, num_inference_steps=5))
    path = result.save(tmp_path)[0]
    text = Image.open(path).text
    lines = text["parameters"].splitlines()
    assert lines[0] == PROMPT
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith("Steps: 5, Sampler: Euler, CFG scale: 2, Seed: 3, Size: 32x32, Model hash: ")
    assert lines[2].endswith("Model: tiny")
    payload = json.loads(text[RECIPE_KEY])
    assert payload["request"]["prompt"] == PROMPT and "torch" in payload["versions"]


def test_unicode_prompt_survives_the_recipe(tmp_path):
    prompt = "a red circle on a blue background, ünïcödé ✓"
    path = generate(GenerationRequest(prompt=prompt, seed=1, num_inference_steps=2)).save(tmp_path)[0]
    assert read_recipe(path).prompt == prompt


def test_save_never_overwrites(tmp_path):
    result = generate(GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=2))
    first = result.save(tmp_path, stem="x")[0]
    second = result.save(tmp_path, stem="x")[0]
    assert first != second and first.exists() and second.exists()
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_sampler_runs_and_prompt_changes_output(name):
    out = generate(GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=4, scheduler=name))
    assert out.images[0].size == (32, 32)


def test_prompt_and_seed_change_the_image():
    a = generate(GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=6)).images[0]
    b = generate(GenerationRequest(prompt="a yellow square on a black background", seed=1,
                                   num_inference_steps=6)).images[0]
    c = generate(GenerationRequest(prompt=PROMPT, seed=2, num_inference_steps=6)).images[0]
    assert not np.array_equal(_px(a), _px(b)) and not np.array_equal(_px(a), _px(c))


def test_progress_is_reported_per_step():
    seen = []
    generate(GenerationRequest(prompt=PROMPT, seed=1, num_images=2, num_inference_steps=3),
             progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 6) for i in range(1, 7)]


def test_read_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        read_recipe(tmp_path / "missing.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(RecipeError, match="not a readable image"):
        read_recipe(tmp_path / "notes.txt")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    with pytest.raises(RecipeError, match="not a PNG"):
        read_recipe(tmp_path / "photo.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(RecipeError, match="no LoRA Studio recipe"):
        read_recipe(tmp_path / "plain.png")
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(RECIPE_KEY, "{not json")
    Image.new("RGB", (8, 8)).save(tmp_path / "damaged.png", pnginfo=info)
    with pytest.raises(RecipeError, match="damaged"):
        read_recipe(tmp_path / "damaged.png")
