"""Generation: request validation, the seed rule, recipes that re-run bit for bit, samplers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from studio.core.errors import InvalidRequestError, RecipeError
from studio.generation.recipes import RECIPE_KEY, read_recipe
from studio.generation.requests import SCHEDULERS, GenerationRequest
from studio.generation.run import generate

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


def test_image_i_of_a_batch_uses_seed_plus_i_and_replays_from_its_batch(tmp_path):
    batch = generate(GenerationRequest(prompt=PROMPT, seed=10, num_images=5, num_inference_steps=8, batch_size=2))
    assert batch.seeds == [10, 11, 12, 13, 14]
    # Batches [10, 11], [12, 13], [14]: each image's recipe names its batch's size and its row.
    assert [(o.request.batch_size, o.request.batch_index) for o in batch.outputs] == [(2, 0), (2, 1), (2, 0),
                                                                                     (2, 1), (1, 0)]
    assert "Seed: 13," in batch.outputs[3].parameters  # A1111's Seed is the image's own seed
    paths = batch.save(tmp_path)
    for i in (1, 2, 4):
        again = generate(read_recipe(paths[i]))
        assert again.seeds == [10 + i] and len(again.images) == 1
        assert np.array_equal(_px(again.images[0]), _px(batch.images[i]))
    # The batch's size changes the numbers (kernels sum in another order), not the picture.
    alone = generate(GenerationRequest(prompt=PROMPT, seed=11, num_inference_steps=8, batch_size=1))
    difference = np.abs(_px(alone.images[0]).astype(int) - _px(batch.images[1]))
    assert difference.max() <= 8 and difference.mean() < 0.5
    assert not np.array_equal(_px(batch.images[0]), _px(batch.images[1]))


def test_a_recipe_made_one_image_at_a_time_still_replays(tmp_path):
    one = generate(GenerationRequest(prompt=PROMPT, seed=21, num_inference_steps=6, batch_size=1))
    path = one.save(tmp_path)[0]
    recipe = json.loads(Image.open(path).info[RECIPE_KEY])
    del recipe["request"]["batch_size"], recipe["request"]["batch_index"]  # as recipes were written before
    old = _recipe_png(tmp_path / "old.png", json.dumps(recipe))
    request = read_recipe(old)
    assert request.batch_size is None and request.batch_index is None
    assert np.array_equal(_px(generate(request).images[0]), _px(one.images[0]))


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch size must be between 1 and 16"),
    ({"batch_size": 17}, "batch size must be between 1 and 16"),
    ({"batch_index": 0}, "batch index must be a row"),
    ({"batch_size": 4, "batch_index": 4}, "batch index must be a row"),
    ({"batch_size": 4, "batch_index": 1, "num_images": 2}, "needs num_images 1"),
])
def test_bad_batch_fields_name_the_problem(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        GenerationRequest(prompt=PROMPT, **kwargs)


def test_the_batch_size_follows_free_memory(monkeypatch):
    import psutil

    from studio.core.base_models import load_pipeline
    from studio.generation.run import batch_size_for

    pipe = load_pipeline("tiny")
    request = GenerationRequest(prompt=PROMPT, width=64, height=64)
    free = type("Free", (), {"available": 24 << 30})
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free)
    assert batch_size_for(pipe, request) == 16  # capped
    per_image = 8 * pipe.vae.config.block_out_channels[0] * 64 * 64 * 4
    free.available = 6 * per_image  # half of it holds 3 images
    assert batch_size_for(pipe, request) == 3
    free.available = 0
    assert batch_size_for(pipe, request) == 1
    assert batch_size_for(pipe, GenerationRequest(prompt=PROMPT, batch_size=5)) == 5


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
    generate(GenerationRequest(prompt=PROMPT, seed=1, num_images=2, num_inference_steps=3, batch_size=1),
             progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 6) for i in range(1, 7)]
    seen.clear()  # in one batch of 2, each step advances both images: progress counts image-steps
    generate(GenerationRequest(prompt=PROMPT, seed=1, num_images=2, num_inference_steps=3),
             progress=lambda done, total: seen.append((done, total)))
    assert seen == [(2, 6), (4, 6), (6, 6)]


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
    with pytest.raises(RecipeError, match="carries no recipe"):
        read_recipe(tmp_path / "plain.png")
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(RECIPE_KEY, "{not json")
    Image.new("RGB", (8, 8)).save(tmp_path / "damaged.png", pnginfo=info)
    with pytest.raises(RecipeError, match="damaged"):
        read_recipe(tmp_path / "damaged.png")


# -- img2img and inpainting ----------------------------------------------------------------------


@pytest.fixture
def init_png(tmp_path):
    path = tmp_path / "init.png"
    generate(GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=8)).images[0].save(path)
    return path


def _mask(tmp_path, box=(8, 8, 24, 24)):
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, box)
    path = tmp_path / "mask.png"
    mask.save(path)
    return path


def _diff(a, b) -> float:
    return float(np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).mean())


def test_img2img_follows_the_init_image_more_at_lower_strength(tmp_path):
    # the init image shows another scene than the prompt asks for: img2img keeps some of it
    init_png = tmp_path / "square.png"
    generate(GenerationRequest(prompt="a yellow square on a black background", seed=1,
                               num_inference_steps=8)).images[0].save(init_png)
    init = Image.open(init_png).convert("RGB")
    t2i = generate(GenerationRequest(prompt=PROMPT, seed=2, num_inference_steps=8)).images[0]

    def i2i(strength):
        return generate(GenerationRequest(prompt=PROMPT, seed=2, num_inference_steps=8, init_image=str(init_png),
                                          strength=strength)).images[0]

    low, high = _diff(i2i(0.25), init), _diff(i2i(0.75), init)
    assert low < high < _diff(t2i, init)
    assert low < 0.7 * _diff(t2i, init)
    other = init_png.with_name("other.png")
    t2i.save(other)
    moved = generate(GenerationRequest(prompt=PROMPT, seed=2, num_inference_steps=8, init_image=str(other),
                                       strength=0.25)).images[0]
    assert _diff(moved, t2i) < _diff(moved, init)  # another init image: the result follows that one


def test_inpainting_keeps_the_unmasked_region_and_repaints_the_masked_one(init_png, tmp_path):
    mask_path = _mask(tmp_path)
    init = np.asarray(Image.open(init_png).convert("RGB")).astype(int)
    result = generate(GenerationRequest(prompt="a yellow square on a black background", seed=3,
                                        num_inference_steps=8, init_image=str(init_png), mask_image=str(mask_path),
                                        strength=1.0))
    out = np.asarray(result.images[0]).astype(int)
    keep = np.ones((32, 32), bool)
    keep[8:24, 8:24] = False
    assert np.array_equal(out[keep], init[keep])
    assert np.abs(out[~keep] - init[~keep]).mean() > 20
    assert result.outputs[0].request.task == "inpaint"


def test_img2img_and_inpaint_recipes_rerun_exactly_after_the_originals_are_gone(init_png, tmp_path):
    mask_path = _mask(tmp_path, box=(0, 0, 16, 32))
    for mask in (None, mask_path):
        result = generate(GenerationRequest(prompt=PROMPT, seed=5, num_inference_steps=6, init_image=str(init_png),
                                            mask_image=str(mask) if mask else None, strength=0.6))
        saved = result.save(tmp_path / "out")[0]
        text = Image.open(saved).text
        assert "Denoising strength: 0.6" in text["parameters"]
        recipe = read_recipe(saved)
        assert recipe.init_image_sha256 and recipe.strength == 0.6
        assert (recipe.mask_image_sha256 is not None) == (mask is not None)
        again = generate(recipe).images[0]
        assert np.array_equal(np.asarray(again), np.asarray(Image.open(saved).convert("RGB")))
    init_png.unlink()
    mask_path.unlink()
    assert np.array_equal(np.asarray(generate(read_recipe(saved)).images[0]),
                          np.asarray(Image.open(saved).convert("RGB")))


def test_a_changed_init_image_is_refused_when_its_copy_is_gone(init_png, tmp_path):
    from studio.generation.inputs import inputs_dir

    result = generate(GenerationRequest(prompt=PROMPT, seed=5, num_inference_steps=4, init_image=str(init_png),
                                        strength=0.5))
    recipe = result.outputs[0].request
    for stored in inputs_dir().iterdir():
        stored.unlink()
    Image.new("RGB", (32, 32), "white").save(init_png)
    with pytest.raises(RecipeError, match="changed since"):
        generate(GenerationRequest(**{**recipe.to_dict(), "init_image": str(init_png)}))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"strength": 0.5}, "pass --init-image"),
        ({"mask_image": "m.png"}, "a mask needs an init image"),
        ({"init_image": "i.png", "strength": 0.0}, r"strength must be a number in \(0, 1\]"),
        ({"init_image": "i.png", "strength": 1.5}, r"strength must be a number in \(0, 1\]"),
        ({"init_image": "i.png", "strength": 0.1, "num_inference_steps": 4}, "run no denoising step"),
    ],
)
def test_bad_img2img_requests_name_the_problem(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        GenerationRequest(prompt=PROMPT, **kwargs)


def test_unreadable_init_image_and_black_mask_are_refused(init_png, tmp_path):
    from studio.core.errors import InputFileNotFoundError

    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    with pytest.raises(InvalidRequestError, match="not a readable image"):
        generate(GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=4, init_image=str(notes)))
    with pytest.raises(InputFileNotFoundError, match="does not exist"):
        generate(GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=4, init_image=str(tmp_path / "no.png")))
    black = tmp_path / "black.png"
    Image.new("L", (32, 32), 0).save(black)
    with pytest.raises(InvalidRequestError, match="all black"):
        generate(GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=4, init_image=str(init_png),
                                   mask_image=str(black)))


def test_cli_img2img_and_inpaint(init_png, tmp_path, capsys):
    from studio.app.cli import main

    mask = _mask(tmp_path)
    assert main(["generate", PROMPT, "--seed", "4", "--steps", "6", "--init-image", str(init_png), "--strength", "0.5",
                 "--mask", str(mask), "--out", str(tmp_path / "out"), "--json"]) == 0
    path = json.loads(capsys.readouterr().out.strip().splitlines()[-1])[0]["path"]
    recipe = read_recipe(path)
    assert recipe.task == "inpaint" and recipe.strength == 0.5 and recipe.mask_image_sha256
    assert main(["generate", PROMPT, "--strength", "0.5", "--out", str(tmp_path)]) == 2
    assert "pass --init-image" in capsys.readouterr().err


# -- recipes from PNGs nobody vouches for (issue 11, findings 5 and 9) ---------------------------


def _request_dict(**overrides) -> dict:
    """A complete, resolved single-image request as a recipe records it."""
    request = GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=4, width=32, height=32,
                                guidance_scale=2.0).to_dict()
    return {**request, **overrides}


def _recipe_png(path, text: str, size=(8, 8)):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(RECIPE_KEY, text)
    Image.new("RGB", size).save(path, pnginfo=info)
    return path


def _recipe_with(tmp_path, **overrides):
    return _recipe_png(tmp_path / "recipe.png", json.dumps({"version": 1, "request": _request_dict(**overrides)}))


def _claim_size(path, width: int, height: int):
    """Rewrite a PNG's IHDR to claim ``width`` x ``height`` (with a valid CRC); the pixels stay 8x8."""
    import struct
    import zlib

    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_recipes_keep_the_sd1_spelling_of_per_role_strengths(tmp_path):
    from studio.core.families import get_family
    from studio.generation.recipes import recipe_payload

    # Recipes written before the strengths had role names load; what the studio writes for SD-1 keeps their keys.
    entry = {"ref": "style@1", "weight": 0.8, "unet": 0.5, "text_encoder": 0.0, "name": "style", "version": 1,
             "tensor_sha256": "ab" * 32}
    request = read_recipe(_recipe_with(tmp_path, adapters=[entry]))
    spec = request.adapters[0]
    assert (spec.denoiser, spec.text_encoders, spec.version) == (0.5, 0.0, 1)
    assert recipe_payload(request, family=get_family("sd1"))["request"]["adapters"] == [entry]
    with pytest.raises(RecipeError, match="'adapters' entry 1: .*strength twice"):
        read_recipe(_recipe_with(tmp_path, adapters=[{**entry, "denoiser": 0.4}]))


def test_a_recipe_asks_for_one_image(tmp_path):
    with pytest.raises(RecipeError, match="num_images.*1"):
        read_recipe(_recipe_with(tmp_path, num_images=64))


@pytest.mark.parametrize("field_name, value", [
    ("base_model", 5), ("negative_prompt", ["blurry"]), ("prompt", {"text": "x"}), ("scheduler", ["Euler"]),
    ("num_inference_steps", "20"), ("num_inference_steps", True), ("num_inference_steps", 20.0),
    ("width", "32"), ("height", 32.5), ("seed", True), ("guidance_scale", "7"), ("guidance_scale", False),
    ("adapters", {"ref": "x"}), ("adapters", ["x"]), ("init_image", 5), ("strength", "0.5"),
    ("mask_image", ["m.png"]), ("init_image_sha256", 5), ("num_images", True),
    ("adapters", [{"ref": "x", "weight": 1.0, "tensor_sha256": 7}]), ("adapters", [{"ref": "x", "version": "1"}]),
    ("adapters", [{"ref": "x", "weight": 10 ** 400}]),
])
def test_every_recipe_field_is_type_checked(tmp_path, field_name, value):
    with pytest.raises(RecipeError) as caught:
        read_recipe(_recipe_with(tmp_path, **{field_name: value}))
    message = str(caught.value)
    assert field_name in message and "\n" not in message


def test_a_deeply_nested_recipe_is_a_one_line_error(tmp_path):
    path = _recipe_png(tmp_path / "deep.png", "[" * 100_000 + "]" * 100_000)
    with pytest.raises(RecipeError, match="nests deeper") as caught:
        read_recipe(path)
    assert "\n" not in str(caught.value)


def test_an_oversized_recipe_chunk_is_refused_before_parsing(tmp_path):
    path = _recipe_with(tmp_path, prompt="x" * 2_000_000)
    with pytest.raises(RecipeError, match="too large"):
        read_recipe(path)


def test_a_recipe_png_claiming_a_huge_size_is_refused(tmp_path):
    path = _claim_size(_recipe_with(tmp_path), 100_000, 100_000)
    with pytest.raises(RecipeError, match="100000x100000") as caught:
        read_recipe(path)
    assert "\n" not in str(caught.value)
    # between Pillow's warning and error thresholds, too: no DecompressionBombWarning on stderr
    import warnings

    path = _claim_size(_recipe_with(tmp_path), 10_000, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RecipeError, match="10000x10000"):
            read_recipe(path)


def test_a_recipe_takes_input_images_from_the_inputs_store_only(init_png, tmp_path):
    import hashlib

    sha = hashlib.sha256(init_png.read_bytes()).hexdigest()
    # any other local file, even with its true hash pinned, is refused without being read
    with pytest.raises(RecipeError, match="inputs store"):
        read_recipe(_recipe_with(tmp_path, init_image=str(init_png), init_image_sha256=sha, strength=0.5))
    with pytest.raises(RecipeError, match="init_image_sha256"):
        read_recipe(_recipe_with(tmp_path, init_image="/etc/hostname", strength=0.5))
    named_like_a_stored_input = str(tmp_path / f"{sha}.png")
    with pytest.raises(RecipeError, match="not in the inputs store"):
        read_recipe(_recipe_with(tmp_path, init_image=named_like_a_stored_input, init_image_sha256=sha, strength=0.5))
    # once stored, the recipe names the local stored copy whatever folder it was written in
    from studio.generation.inputs import store_input_image

    stored = store_input_image(init_png)
    recipe = read_recipe(_recipe_with(tmp_path, init_image=named_like_a_stored_input, init_image_sha256=sha,
                                      strength=0.5))
    assert recipe.init_image == str(stored) and recipe.init_image_sha256 == sha


def test_recipe_cost_and_its_bound():
    from studio.core.errors import RecipeTooCostlyError
    from studio.generation.recipes import MAX_RECIPE_COST, check_recipe_cost, recipe_cost

    normal = GenerationRequest(prompt=PROMPT, num_inference_steps=50, width=1024, height=1024, seed=1)
    costly = GenerationRequest(prompt=PROMPT, num_inference_steps=1000, width=4096, height=4096, seed=1)
    assert recipe_cost(normal) == 50 * 1024 * 1024
    assert recipe_cost(GenerationRequest(prompt=PROMPT, num_images=3, width=64, height=32)) == 3 * 20 * 64 * 32
    assert recipe_cost(normal) <= MAX_RECIPE_COST < recipe_cost(costly)
    # An image of a batch of 16 replays by rebuilding the batch: it costs 16 images.
    replay = GenerationRequest(prompt=PROMPT, num_inference_steps=50, width=1024, height=1024, seed=5, batch_size=16,
                               batch_index=5)
    assert recipe_cost(replay) == 16 * 50 * 1024 * 1024 > MAX_RECIPE_COST
    with pytest.raises(RecipeTooCostlyError, match="16 image.*the batch its image was made in"):
        check_recipe_cost(replay, confirmed=False)
    check_recipe_cost(normal, confirmed=False)
    with pytest.raises(RecipeTooCostlyError, match="--yes"):
        check_recipe_cost(costly, confirmed=False)
    check_recipe_cost(costly, confirmed=True)


def _bomb_png(path, width=10_000, height=10_000):
    Image.new("RGB", (8, 8), "white").save(path)
    return _claim_size(path, width, height)


def test_input_images_are_size_checked_and_decoded_with_a_pixel_bound(tmp_path, monkeypatch, init_png):
    import warnings

    from studio.generation import inputs as gen

    bomb = _bomb_png(tmp_path / "bomb.png")  # 100 M pixels: above Pillow's warning, below its error
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InvalidRequestError, match="10000x10000"):
            gen.store_input_image(bomb)
        with pytest.raises(InvalidRequestError, match="10000x10000"):
            gen.store_input_image(bomb.read_bytes())
    # a file placed straight into the store is bounded when it is decoded, too
    import hashlib

    sha = hashlib.sha256(bomb.read_bytes()).hexdigest()
    gen.inputs_dir().mkdir(parents=True, exist_ok=True)
    planted = gen.inputs_dir() / f"{sha}.png"
    planted.write_bytes(bomb.read_bytes())
    with pytest.raises(InvalidRequestError, match="10000x10000"):
        generate(GenerationRequest(prompt=PROMPT, seed=1, num_inference_steps=4, init_image=str(planted),
                                   init_image_sha256=sha))
    # the file size is checked before a byte is read
    monkeypatch.setattr(gen, "MAX_INPUT_BYTES", 100)
    with pytest.raises(InvalidRequestError, match="bytes"):
        gen.store_input_image(init_png)


def test_a_home_folder_of_no_user_is_a_clear_error(tmp_path):
    from studio.core.errors import InputFileNotFoundError
    from studio.generation.inputs import store_input_image

    with pytest.raises(RecipeError, match="names no user's home folder"):
        read_recipe(_recipe_with(tmp_path, base_model="~no-such-user-here/model"))
    with pytest.raises(InvalidRequestError, match="names no user's home folder"):
        GenerationRequest(prompt=PROMPT, init_image="~no-such-user-here/x.png")
    with pytest.raises(InputFileNotFoundError, match="names no user's home folder"):
        store_input_image("~no-such-user-here/x.png")
