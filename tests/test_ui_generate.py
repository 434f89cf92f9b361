"""The Generate page through AppTest: an adapter stack from the catalog (strengths, split strengths,
order, removal, trigger words), images whose recipes list the stack, a random seed that is shown,
the gallery, and recipes loaded back from a PNG."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest
from ui_support import register, save_lora, wait_for_jobs

ROOT = Path(__file__).resolve().parent.parent
PAGE = str(ROOT / "studio" / "app" / "ui" / "generate_page.py")


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    from adapters.compose import engine_for
    from studio.core.base_models import load_pipeline

    root = tmp_path_factory.mktemp("loras")
    yield [save_lora(root, seed=s) for s in range(2)]
    engine_for(load_pipeline("tiny")).unload_all()  # leave the shared pipeline clean for other tests


def _page() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=180).run()


def _button(at, label):
    return next(b for b in at.button if b.label == label)


def _add(at, ref):
    at.selectbox(key="stack_pick").set_value(ref).run()
    at.button(key="stack_add").click().run()
    assert not at.exception


def test_stack_two_adapters_generate_and_recipe_lists_both(reg, lora_files):
    register(reg, "striped", lora_files[0], trigger_words=["zkstripes"])
    register(reg, "outlined", lora_files[1], trigger_words=["zkoutline"])
    at = _page()
    _add(at, "striped@1")
    _add(at, "outlined@1")
    ids = [s["id"] for s in at.session_state["stack"]]
    assert [s["ref"] for s in at.session_state["stack"]] == ["striped@1", "outlined@1"]
    at.slider(key=f"w-{ids[0]}").set_value(0.8).run()
    at.checkbox(key=f"split-{ids[1]}").check().run()
    at.slider(key=f"wu-{ids[1]}").set_value(0.5).run()
    at.slider(key=f"wt-{ids[1]}").set_value(0.0).run()
    _button(at, "zkstripes").click().run()
    assert at.text_area(key="prompt").value == "zkstripes, a red circle on a blue background"
    at.number_input(key="steps").set_value(3)
    at.number_input(key="num_images").set_value(2)
    at.text_input(key="seed").input("11")
    wait_for_jobs(_button(at, "Generate").click().run())
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "2 image(s)" in at.success[0].value and "seed 11" in at.success[0].value
    result = at.session_state["last_result"]
    adapters = result.outputs[0].request.adapters
    assert [(a.name, a.version, a.weight) for a in adapters] == [("striped", 1, 0.8), ("outlined", 1, 1.0)]
    assert adapters[1].denoiser == 0.5 and adapters[1].text_encoders == 0.0
    assert any("striped@1:0.8" in m.value and "outlined@1:1" in m.value for m in at.markdown)
    assert any('Lora hashes: "striped: ' in c.value and "outlined: " in c.value for c in at.code)

    # The downloaded PNG carries the recipe; loading it back restores settings and the stack.
    png = at.get("download_button")[0]
    data = result.outputs[0]
    from studio.app.ui.common import png_bytes

    payload = png_bytes(data.image, data.pnginfo())
    fresh = _page()
    fresh.file_uploader(key="recipe_png").set_value(("img.png", payload, "image/png"))
    fresh.button(key="recipe_apply").click().run()
    assert not fresh.exception and "loaded the recipe of seed 11" in fresh.success[0].value
    assert fresh.text_area(key="prompt").value.startswith("zkstripes, ")
    assert fresh.text_input(key="seed").value == "11" and fresh.number_input(key="steps").value == 3
    stack = fresh.session_state["stack"]
    assert [s["ref"] for s in stack] == ["striped@1", "outlined@1"]
    assert fresh.slider(key=f"w-{stack[0]['id']}").value == 0.8
    assert fresh.session_state[f"wu-{stack[1]['id']}"] == 0.5
    assert png is not None


def test_reorder_remove_and_random_seed(reg, lora_files):
    register(reg, "striped", lora_files[0])
    register(reg, "outlined", lora_files[1])
    at = _page()
    _add(at, "striped@1")
    _add(at, "outlined@1")
    first = at.session_state["stack"][0]["id"]
    at.button(key=f"down-{first}").click().run()
    assert [s["ref"] for s in at.session_state["stack"]] == ["outlined@1", "striped@1"]
    at.button(key=f"rm-{first}").click().run()
    assert [s["ref"] for s in at.session_state["stack"]] == ["outlined@1"]
    at.button(key="stack_add").click().run()  # nothing chosen
    assert "choose an adapter" in at.warning[0].value
    _add(at, "outlined@1")
    assert "already in the stack" in at.warning[0].value

    at.button(key="seed_random").click().run()
    seed = at.text_input(key="seed").value
    assert seed.isdigit()
    at.number_input(key="steps").set_value(2)
    at.number_input(key="num_images").set_value(1)
    wait_for_jobs(_button(at, "Generate").click().run())
    assert not at.exception and f"seed {seed}" in at.success[0].value
    # A second run adds to the gallery (newest first) instead of replacing it.
    at.text_input(key="seed").input("3")
    wait_for_jobs(_button(at, "Generate").click().run())
    assert [c for img in at.get("image") for c in img.captions][:2] == ["seed 3", f"seed {seed}"]


def test_bad_stack_and_bad_recipe_are_messages(reg, lora_files, tmp_path):
    at = _page()
    at.session_state["stack"] = [{"id": "x1", "ref": "missing@4", "trigger_words": []}]
    at.number_input(key="steps").set_value(2)
    wait_for_jobs(_button(at, "Generate").click().run())
    assert not at.exception and "missing" in at.error[0].value

    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    at = _page()
    at.file_uploader(key="recipe_png").set_value(("plain.png", plain.read_bytes(), "image/png"))
    at.button(key="recipe_apply").click().run()
    assert not at.exception and "carries no recipe" in at.error[0].value
    at.button(key="recipe_apply").click().run()
    assert json.dumps(at.text_area(key="prompt").value)  # the form kept its values


def test_img2img_grid_and_merge(reg, lora_files, tmp_path):
    register(reg, "striped", lora_files[0])
    register(reg, "outlined", lora_files[1])
    at = _page()
    _add(at, "striped@1")
    _add(at, "outlined@1")
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (255, 255, 0)).save(init)
    at.file_uploader(key="init_upload").set_value(("init.png", init.read_bytes(), "image/png"))
    at.slider(key="strength").set_value(0.5)
    at.number_input(key="steps").set_value(4)
    at.number_input(key="num_images").set_value(1)
    wait_for_jobs(_button(at, "Generate").click().run())
    assert not at.exception and not at.error, [e.value for e in at.error]
    request = at.session_state["last_result"].outputs[0].request
    assert request.strength == 0.5 and request.init_image and request.init_image_sha256

    at.text_input(key="grid_x_values").input("0, 1")
    at.selectbox(key="grid_y_kind").set_value("seed")
    at.text_input(key="grid_y_values").input("1, 2")
    at.button(key="grid_go").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert Path(at.session_state["grid_path"]).is_file()
    at.text_input(key="grid_x_values").input("zero")
    at.button(key="grid_go").click().run()
    assert not at.exception and "'zero'" in at.error[0].value  # GridAxis.parse names the bad value

    at.text_input(key="merge_name").input("blend")
    at.selectbox(key="merge_method").set_value("cat")
    at.button(key="merge_go").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("merged into blend@1" in s.value for s in at.success)
    assert [p.ref for p in reg.get("blend").parents] == ["striped@1", "outlined@1"]


# ---- recipes loaded back: limits, inputs, malformed files; the library's caches and parsers -------


def _recipe_png(**fields) -> bytes:
    """A PNG carrying a recipe chunk with ``fields`` over a small text-to-image request."""
    import io

    from PIL.PngImagePlugin import PngInfo

    from studio.generation.recipes import RECIPE_KEY

    request = {"prompt": "a blue square on a red background", "seed": 5, "num_inference_steps": 3, **fields}
    info = PngInfo()
    info.add_text(RECIPE_KEY, json.dumps({"version": 1, "request": request}))
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _load_recipe(at, payload: bytes):
    at.file_uploader(key="recipe_png").set_value(("recipe.png", payload, "image/png"))
    at.button(key="recipe_apply").click().run()
    assert not at.exception, at.exception
    return at


def test_recipe_values_the_form_cannot_hold_are_refused_not_clamped(studio_home):
    for fields, words in (({"num_inference_steps": 200}, ("200", "150")),
                          ({"guidance_scale": 40.0}, ("40", "30")),
                          ({"width": 2056, "height": 64}, ("2056", "2048"))):
        at = _load_recipe(_page(), _recipe_png(**fields))
        assert not at.success, (fields, [s.value for s in at.success])
        assert any(all(w in e.value for w in words) for e in at.error), (fields, [e.value for e in at.error])
        # Nothing of the refused recipe reached the form.
        assert at.number_input(key="steps").value == 20 and at.text_input(key="seed").value == "1"
        assert at.text_area(key="prompt").value == "a red circle on a blue background"


def test_recipe_restores_init_image_mask_and_strength(studio_home):
    from studio.generation.inputs import store_input_image

    init = store_input_image(_png_bytes(Image.new("RGB", (32, 32), (255, 255, 0))))
    mask_image = Image.new("L", (32, 32), 0)
    mask_image.paste(255, (8, 8, 24, 24))
    mask = store_input_image(_png_bytes(mask_image))
    at = _load_recipe(_page(), _recipe_png(init_image=str(init), init_image_sha256=init.stem, mask_image=str(mask),
                                           mask_image_sha256=mask.stem, strength=0.4, width=32, height=32))
    assert not at.error and "loaded the recipe of seed 5" in at.success[0].value, [e.value for e in at.error]
    assert at.slider(key="strength").value == 0.4
    assert any("init image" in c for img in at.get("image") for c in img.captions)
    wait_for_jobs(_button(at, "Generate").click().run())
    assert not at.exception and not at.error, [e.value for e in at.error]
    request = at.session_state["last_result"].outputs[0].request
    assert (request.task, request.strength) == ("inpaint", 0.4)
    assert (request.init_image_sha256, request.mask_image_sha256) == (init.stem, mask.stem)

    # "Clear" goes back to text-to-image.
    at.button(key="recipe_inputs_clear").click().run()
    wait_for_jobs(_button(at, "Generate").click().run())
    assert not at.exception and at.session_state["last_result"].outputs[0].request.task == "text2img"


def test_recipe_inputs_outside_the_data_roots_are_refused(studio_home, tmp_path, monkeypatch):
    monkeypatch.delenv("LORA_STUDIO_DATA_ROOTS", raising=False)
    from studio.core.settings import reload_settings

    reload_settings()
    private = tmp_path / "private.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(private)
    at = _load_recipe(_page(), _recipe_png(init_image=str(private), strength=0.5))
    # Refused by the page's data-roots check, or earlier by read_recipe (inputs come from the inputs store).
    assert not at.success and len(at.error) == 1 and not at.session_state["recipe_init"], \
        [e.value for e in at.error]
    assert at.slider(key="strength").value == 0.75


def test_malformed_recipe_pngs_are_one_line_errors(studio_home):
    import io
    import struct
    import zlib

    from PIL.PngImagePlugin import PngInfo

    from studio.generation.recipes import RECIPE_KEY

    info = PngInfo()
    info.add_text(RECIPE_KEY, "[" * 100_000 + "]" * 100_000)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    nested = buf.getvalue()
    # A valid 8x8 PNG whose header claims 100000 x 100000 pixels (a decompression bomb), CRC fixed.
    ihdr = bytearray(nested[8:33])
    ihdr[8:16] = struct.pack(">II", 100_000, 100_000)
    ihdr[21:25] = struct.pack(">I", zlib.crc32(bytes(ihdr[4:21])))
    bomb = nested[:8] + bytes(ihdr) + nested[33:]
    for payload in (nested, bomb):
        at = _load_recipe(_page(), payload)
        assert not at.success and len(at.error) == 1 and "\n" not in at.error[0].value.strip(), \
            [e.value for e in at.error]
        assert "Traceback" not in at.error[0].value


def test_generate_asks_the_library_for_the_pipeline_every_time(studio_home, monkeypatch):
    # The library's LRU (studio.core.base_models.load_pipeline, 2 pipelines) is the only cache: a page
    # cache of its own kept every base model ever typed in memory. The queue's worker asks it per job.
    from studio.generation import run

    asked = []
    original = run.load_pipeline

    def spy(ref=None, precision="auto"):
        asked.append((ref, precision))
        return original(ref, precision)

    monkeypatch.setattr(run, "load_pipeline", spy)
    at = _page()
    at.number_input(key="steps").set_value(2)
    at.number_input(key="num_images").set_value(1)
    wait_for_jobs(_button(at, "Generate").click().run())
    wait_for_jobs(_button(at, "Generate").click().run())
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert asked == [("tiny", "auto"), ("tiny", "auto")]


def test_uploaded_inputs_are_checked_and_stored_by_the_library(studio_home):
    at = _page()
    at.file_uploader(key="init_upload").set_value(("init.png", b"not an image at all", "image/png"))
    at.number_input(key="steps").set_value(2)
    wait_for_jobs(_button(at, "Generate").click().run())
    assert not at.exception and any("not a readable image" in e.value for e in at.error), \
        [e.value for e in at.error]
    assert not (studio_home / "outputs" / "inputs").exists() and not (studio_home / "inputs").exists()

    at.file_uploader(key="init_upload").set_value(
        ("init.png", _png_bytes(Image.new("RGB", (32, 32), (0, 255, 0))), "image/png"))
    at.number_input(key="num_images").set_value(1)
    wait_for_jobs(_button(at, "Generate").click().run())
    assert not at.exception and not at.error, [e.value for e in at.error]
    stored = Path(at.session_state["last_result"].outputs[0].request.init_image)
    assert stored.parent == studio_home / "inputs" and not (studio_home / "outputs" / "inputs").exists()


def test_grid_axes_are_parsed_by_the_library(studio_home):
    at = _page()
    at.number_input(key="steps").set_value(2)
    at.selectbox(key="grid_x_kind").set_value("seed")
    at.text_input(key="grid_x_values").input("1, , 2")  # GridAxis.parse refuses an empty value
    at.button(key="grid_go").click().run()
    assert not at.exception and any("empty value" in e.value for e in at.error), [e.value for e in at.error]
    assert "grid_path" not in at.session_state  # no grid was rendered from the dropped value


def _png_bytes(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_costly_recipe_asks_for_a_confirmation(studio_home, monkeypatch):
    import studio.generation.recipes

    monkeypatch.setattr(studio.generation.recipes, "MAX_RECIPE_COST", 1000)  # any real recipe is costly now
    at = _load_recipe(_page(), _recipe_png(num_inference_steps=7, width=32, height=32))
    assert not at.success and any("pixel-steps" in w.value for w in at.warning), [w.value for w in at.warning]
    assert at.number_input(key="steps").value == 20  # nothing loaded yet
    at.button(key="recipe_confirm").click().run()
    assert not at.exception and "loaded the recipe of seed 5" in at.success[0].value
    assert at.number_input(key="steps").value == 7 and at.number_input(key="width").value == 32


def _texts(at, kind: str) -> list[str]:
    return [getattr(e, "value", "") if kind != "progress" else e.proto.text for e in at.get(kind)]


def test_two_sessions_see_their_position_and_progress_and_get_their_own_images(studio_home):
    # alice's long request runs; bob's waits behind it and says so; alice cancels hers; bob gets his
    alice, bob = _page(), _page()
    alice.number_input(key="steps").set_value(150)
    alice.number_input(key="num_images").set_value(1)
    alice.number_input(key="width").set_value(128)
    alice.number_input(key="height").set_value(128)
    _button(alice, "Generate").click().run()
    deadline = time.monotonic() + 120
    while not any("**Running**" in m for m in _texts(alice, "markdown")):
        assert time.monotonic() < deadline and not alice.exception, _texts(alice, "markdown")
        time.sleep(0.05)
        alice.run()
    bob.text_area(key="prompt").input("a green square on a red background")
    bob.text_input(key="seed").input("2")
    bob.number_input(key="steps").set_value(3)
    _button(bob, "Generate").click().run()
    assert not bob.exception
    assert any("**Queued** (next)" in m for m in _texts(bob, "markdown")), _texts(bob, "markdown")
    assert _texts(bob, "progress") == ["Image 1 of 2 (seed 2): waiting", "Image 2 of 2 (seed 3): waiting"]
    deadline = time.monotonic() + 120
    while not any(": step " in t and not t.endswith(": step 0/150") for t in _texts(alice, "progress")):
        assert time.monotonic() < deadline, _texts(alice, "progress")
        time.sleep(0.1)
        alice.run()
    assert any("**Running**" in m for m in _texts(alice, "markdown"))
    next(b for b in alice.button if b.label == "Cancel").click().run()
    wait_for_jobs(alice)
    assert any("cancelled: 1 image(s)" in i.value for i in alice.info) and "last_result" not in alice.session_state
    wait_for_jobs(bob)
    result = bob.session_state["last_result"]
    assert result.seeds == [2, 3] and result.request.prompt.startswith("a green square")
    assert len(bob.get("image")) == 2 and not bob.error


def test_a_mask_painted_over_the_init_image_is_sent_with_it(studio_home, monkeypatch, tmp_path):
    import types

    import numpy as np
    import streamlit_drawable_canvas

    from studio.generation.inputs import mask_from_drawing

    drawn = {}

    def canvas(**kw):  # the component's part (strokes in a browser) stands in: the left half painted
        drawn.update(kw)
        data = np.zeros((kw["height"], kw["width"], 4), np.uint8)
        data[:, : kw["width"] // 2] = (255, 255, 255, 255)
        return types.SimpleNamespace(image_data=data)

    monkeypatch.setattr(streamlit_drawable_canvas, "st_canvas", canvas)
    at = _page()
    assert not drawn  # no init image: no canvas
    init = tmp_path / "init.png"
    Image.new("RGB", (48, 32), (255, 255, 0)).save(init)
    at.file_uploader(key="init_upload").set_value(("init.png", init.read_bytes(), "image/png")).run()
    assert (drawn["width"], drawn["height"]) == (320, 213) and drawn["background_image"].size == (48, 32)
    at.number_input(key="steps").set_value(2)
    at.number_input(key="num_images").set_value(1)
    wait_for_jobs(_button(at, "Generate").click().run())
    assert not at.exception and not at.error, [e.value for e in at.error]
    request = at.session_state["last_result"].outputs[0].request
    mask = np.asarray(Image.open(request.mask_image))
    assert mask.shape == (32, 48) and request.mask_image_sha256
    assert mask[:, :23].min() == 255 and mask[:, 25:].max() == 0  # painted = repaint, at the init image's size
    # an uploaded mask replaces the drawing
    upload = tmp_path / "mask.png"
    Image.new("L", (48, 32), 255).save(upload)
    at.file_uploader(key="mask_upload").set_value(("mask.png", upload.read_bytes(), "image/png"))
    wait_for_jobs(_button(at, "Generate").click().run())
    assert np.asarray(Image.open(at.session_state["last_result"].outputs[0].request.mask_image)).min() == 255
    # nothing painted: no mask; a wrong array is a message
    assert mask_from_drawing(np.zeros((8, 8, 4), np.uint8), (32, 32)) is None
    with pytest.raises(Exception, match="RGBA"):
        mask_from_drawing(np.zeros((8, 8)), (32, 32))
