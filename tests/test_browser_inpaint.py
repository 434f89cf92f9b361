"""In a real browser: paint an inpainting mask over the init image on the Generate page and generate with it.

The canvas is streamlit-drawable-canvas, a Streamlit component: only a browser runs its drawing code, so this
is where the painted strokes are shown to reach the request as a mask (the page's wiring from a drawing to the
mask is tested with AppTest in test_ui_generate.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_browser import GENERATE_TIMEOUT_S, _idle, _shot, browser, studio_server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.browser


def test_a_painted_mask_reaches_the_request(browser, studio_server, tmp_path):  # noqa: F811
    url, _, _ = studio_server
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), (250, 200, 40)).save(init)
    page = browser.new_page(viewport={"width": 1280, "height": 1600})
    try:
        page.goto(url, wait_until="domcontentloaded", timeout=30_000)
        page.locator('[data-testid="stTextArea"] textarea').first.wait_for(timeout=60_000)
        page.get_by_text("img2img and inpainting").first.click()
        uploader = page.locator('[data-testid="stFileUploader"]').filter(has_text="Init image").first
        uploader.locator('input[type="file"]').set_input_files(str(init))
        canvas = page.locator("canvas.upper-canvas").first  # fabric.js draws strokes on its upper canvas
        canvas.wait_for(timeout=60_000)
        _idle(page)
        box = canvas.bounding_box()
        assert box and box["width"] > 200  # the 32-pixel image is drawn on enlarged
        # a stroke across the top-left quarter
        page.mouse.move(box["x"] + 20, box["y"] + 20)
        page.mouse.down()
        for k in range(1, 11):
            page.mouse.move(box["x"] + 20 + 10 * k, box["y"] + 20 + 8 * k, steps=2)
        page.mouse.up()
        page.wait_for_timeout(1500)  # the component sends its drawing on mouse up; the page reruns
        _idle(page)
        for label, value in (("Steps", "4"), ("Images", "1")):
            page.locator(f'[data-testid="stNumberInput"] input[aria-label="{label}"]').fill(value)
        page.locator('[data-testid="stFormSubmitButton"] button').filter(has_text="Generate").click()
        page.wait_for_selector('[data-testid="stAlertContentSuccess"], [data-testid="stAlertContentError"], '
                               '[data-testid="stException"]', timeout=GENERATE_TIMEOUT_S * 1000)
        errors = page.locator('[data-testid="stAlertContentError"], [data-testid="stException"]')
        assert errors.count() == 0, f"the page shows an error: {errors.first.inner_text()}"
        _shot(page, "generate_inpaint")
    finally:
        page.close()
    # the stored inputs: the init image, and a mask at its size, white along the stroke and black elsewhere
    inputs = Path(tmp_path / "home" / "inputs")
    masks = [np.asarray(Image.open(p)) for p in inputs.iterdir() if Image.open(p).mode == "L"]
    assert len(masks) == 1, sorted(p.name for p in inputs.iterdir())
    mask = masks[0]
    # the stroke ran from canvas (20, 20) to (120, 100) of 320 with a 24-pixel brush: image pixels ~1 to ~13
    assert mask.shape == (32, 32) and mask[2:8, 2:8].max() == 255
    assert mask[:, 18:].max() == 0 and mask[16:, :].max() == 0  # the rest is kept
