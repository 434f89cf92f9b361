"""The scene generator draws what its caption says, and the checker reads it back."""

from __future__ import annotations

import random

import numpy as np
import pytest

from studio.app.tiny.scenes import (
    COLOURS,
    SHAPES,
    STYLES,
    Scene,
    parse_caption,
    random_scene,
    random_texture,
    read_scene,
    render,
    score,
)


def test_required_vocabulary_is_present():
    assert {"red", "green", "blue", "yellow", "white", "black"} <= set(COLOURS)
    assert {"circle", "square", "triangle"} <= set(SHAPES)
    assert {"striped", "outlined"} <= set(STYLES)
    assert COLOURS["red"][0] > 180 and COLOURS["red"][1] < 80 and COLOURS["red"][2] < 80


def test_caption_template_round_trips():
    scene = Scene(colour="red", shape="circle", background="blue")
    assert scene.caption == "a red circle on a blue background"
    assert parse_caption(scene.caption) == {"colour": "red", "shape": "circle", "background": "blue"}
    with pytest.raises(ValueError, match="does not follow"):
        parse_caption("red circle")


def test_checker_reads_plain_scenes_back():
    rng = random.Random(3)
    scenes = [random_scene(rng) for _ in range(200)]
    rates = score([read_scene(render(s)) for s in scenes], [s.to_dict() for s in scenes])
    assert rates["colour"] >= 0.99 and rates["background"] >= 0.99 and rates["shape"] >= 0.97


def test_checker_rejects_wrong_answers():
    # A blank image has no object: the checker must not invent one.
    blank = render(Scene(colour="red", shape="circle", background="blue", radius=0.0))
    reading = read_scene(blank)
    assert reading.background == "blue" and reading.colour is None and reading.shape is None


def test_styles_change_the_pixels_of_the_object_only():
    base = Scene(colour="yellow", shape="square", background="blue", cx=16, cy=16, radius=10)
    plain = np.asarray(render(base)).astype(int)
    striped = np.asarray(render(Scene(**{**base.to_dict(), "style": "striped"}))).astype(int)
    outlined = np.asarray(render(Scene(**{**base.to_dict(), "style": "outlined"}))).astype(int)
    assert np.abs(plain - striped).sum() > 0 and np.abs(plain - outlined).sum() > 0
    # Corners are background in every style.
    for img in (plain, striped, outlined):
        assert tuple(img[0, 0]) == COLOURS["blue"]
    # Stripes are horizontal: rows through the object alternate dark and yellow.
    column = striped[8:24, 16]
    assert (column.sum(1) < 150).any() and (column[:, 0] > 200).any()


def test_same_colour_for_object_and_background_is_refused():
    with pytest.raises(ValueError, match="two different colours"):
        random_scene(random.Random(0), colour="red", background="red")


def test_textures_are_varied():
    rng = random.Random(0)
    textures = [np.asarray(random_texture(rng)) for _ in range(20)]
    assert all(t.shape == (32, 32, 3) for t in textures)
    assert len({t.tobytes() for t in textures}) == 20
