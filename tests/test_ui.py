"""The Streamlit studio through AppTest: the Generate page makes images and reports bad input."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest
from ui_support import wait_for_jobs

ROOT = Path(__file__).resolve().parent.parent
PAGE = str(ROOT / "studio" / "app" / "ui" / "generate_page.py")


def _page() -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=120)
    return at.run()


def _generate(at: AppTest):
    return next(b for b in at.button if b.label == "Generate")


def test_frame_loads_the_generate_page():
    at = AppTest.from_file(str(ROOT / "app_streamlit.py"), default_timeout=120).run()
    assert not at.exception
    assert at.title[0].value == "Generate"


def test_generate_shows_images_with_recipes():
    at = _page()
    at.text_area(key="prompt").input("a yellow triangle on a green background")
    at.text_input(key="seed").input("4")
    at.number_input(key="steps").set_value(4)
    at.number_input(key="num_images").set_value(2)
    wait_for_jobs(_generate(at).click().run())
    assert not at.exception and not at.error
    assert len(at.get("image")) == 2
    assert "seed 4" in at.success[0].value
    assert any("Steps: 4, Sampler: Euler" in c.value for c in at.code)


def test_bad_input_is_an_error_message_not_a_traceback():
    at = _page()
    at.text_input(key="seed").input("lucky")
    wait_for_jobs(_generate(at).click().run())
    assert not at.exception and "not a whole number" in at.error[0].value

    at = _page()
    at.number_input(key="width").set_value(36)
    wait_for_jobs(_generate(at).click().run())
    assert not at.exception and "multiple of 8" in at.error[0].value

    at = _page()
    at.text_input(key="base").input("owner/model")
    wait_for_jobs(_generate(at).click().run())
    assert not at.exception and "offline" in at.error[0].value
