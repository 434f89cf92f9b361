"""Procedural scenes for the embedded tiny model, and the checker that grades them.

A scene is one flat-coloured shape on a flat background, optionally drawn in a style (horizontal
stripes across the object, or a thick dark outline around it). The same generator makes the tiny
base model's training set (plain scenes), the VAE's texture set, and the sample style datasets
under ``datasets/``. The checker measures what a generated image shows (object colour, background
colour, shape) from pixel statistics alone, so prompt adherence can be asserted in tests.

This module needs only numpy and PIL: no torch, no diffusers.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

# Conventional RGB values, so "red" looks red to a person as well as to the checker.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
STYLES: tuple[str, ...] = ("plain", "striped", "outlined")
CAPTION_TEMPLATE = "a {colour} {shape} on a {background} background"

# Stripes and outlines must stay coarse enough for the latent grid: at 32 px with a 4x VAE the
# latents are 8x8, one latent cell per 4 px, so a stripe period of 8 px is two cells (one dark, one
# coloured) and an outline of 3 px covers most of a cell.
STRIPE_PERIOD = 8
OUTLINE_WIDTH = 3
DARK = (25, 25, 25)
LIGHT_STRIPE = (235, 235, 235)


@dataclass(frozen=True)
class Scene:
    """One scene: what is drawn and where (centre and radius in pixels)."""

    colour: str
    shape: str
    background: str
    style: str = "plain"
    cx: float = 16.0
    cy: float = 16.0
    radius: float = 9.0

    @property
    def caption(self) -> str:
        return CAPTION_TEMPLATE.format(colour=self.colour, shape=self.shape, background=self.background)

    def to_dict(self) -> dict:
        return asdict(self)


def random_scene(rng: random.Random, size: int = 32, style: str = "plain", **fixed: str) -> Scene:
    """A scene with random colours, shape and placement; ``fixed`` pins colour/shape/background.

    The object radius is 22-34% of the side and the centre keeps the whole object inside the image,
    so every scene shows its full shape (the checker depends on it).
    """
    colour = fixed.get("colour") or rng.choice(list(COLOURS))
    background = fixed.get("background") or rng.choice([c for c in COLOURS if c != colour])
    if background == colour:
        raise ValueError(f"object and background colour are both {colour!r}: pick two different colours")
    shape = fixed.get("shape") or rng.choice(SHAPES)
    radius = size * rng.uniform(0.22, 0.34)
    margin = radius + 1
    cx = rng.uniform(margin, size - margin)
    cy = rng.uniform(margin, size - margin)
    return Scene(colour=colour, shape=shape, background=background, style=style, cx=cx, cy=cy, radius=radius)


def _shape_polygon(scene: Scene, scale: float) -> list[tuple[float, float]] | None:
    cx, cy, r = scene.cx * scale, scene.cy * scale, scene.radius * scale
    if scene.shape == "square":
        # Side 1.6r: the same visual weight as a circle of radius r.
        h = 0.8 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if scene.shape == "triangle":
        # Equilateral, pointing up, inscribed in the circle of radius r (centred on its centroid).
        return [
            (cx + r * math.cos(math.radians(a)), cy - r * math.sin(math.radians(a)))
            for a in (90, 210, 330)
        ]
    return None


def _draw_shape(draw: ImageDraw.ImageDraw, scene: Scene, scale: float, fill, grow: float = 0.0) -> None:
    if scene.shape == "circle":
        cx, cy, r = scene.cx * scale, scene.cy * scale, (scene.radius + grow) * scale
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        return
    poly = _shape_polygon(Scene(**{**scene.to_dict(), "radius": scene.radius + grow}), scale)
    draw.polygon(poly, fill=fill)


def render(scene: Scene, size: int = 32, supersample: int = 4) -> Image.Image:
    """Draw ``scene`` at ``size`` x ``size`` (drawn 4x larger and downsampled for clean edges)."""
    s = size * supersample
    scale = supersample  # scene coordinates are in output pixels
    bg = COLOURS[scene.background]
    fg = COLOURS[scene.colour]
    img = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(img)
    if scene.style == "outlined":
        # The outline is the same shape grown by OUTLINE_WIDTH px, drawn dark underneath.
        grow = OUTLINE_WIDTH * (1.6 if scene.shape == "triangle" else 1.0)
        _draw_shape(draw, scene, scale, DARK, grow=grow)
    _draw_shape(draw, scene, scale, fg)
    if scene.style == "striped":
        mask = Image.new("L", (s, s), 0)
        _draw_shape(ImageDraw.Draw(mask), scene, scale, 255)
        stripes = Image.new("RGB", (s, s), fg)
        sd = ImageDraw.Draw(stripes)
        stripe_colour = LIGHT_STRIPE if scene.colour == "black" else DARK
        period = STRIPE_PERIOD * supersample
        for y0 in range(0, s, period):
            sd.rectangle([0, y0 + period // 2, s, y0 + period - 1], fill=stripe_colour)
        img.paste(stripes, (0, 0), mask)
    elif scene.style != "plain" and scene.style != "outlined":
        raise ValueError(f"unknown style {scene.style!r}: choose one of {', '.join(STYLES)}")
    return img.resize((size, size), Image.Resampling.LANCZOS)


def random_texture(rng: random.Random, size: int = 32) -> Image.Image:
    """A full-frame texture (stripes of several periods and angles, checks, outlines, noise).

    Only for training the VAE: a VAE that has seen only flat colours cannot reconstruct a striped
    or outlined object, so no style adapter could ever show its style.
    """
    kind = rng.choice(["stripes", "checks", "noise", "outlined_scene", "striped_scene", "rings"])
    a = np.array(rng.choice(list(COLOURS.values())), dtype=np.float32)
    b = np.array(rng.choice([c for c in COLOURS.values() if not np.array_equal(c, a)]), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "stripes":
        period = rng.choice([4, 6, 8, 10, 12, 16])
        angle = rng.choice([0, 90, 45, 135, rng.uniform(0, 180)])
        t = xx * math.sin(math.radians(angle)) + yy * math.cos(math.radians(angle))
        m = ((t / period) % 1.0) < 0.5
    elif kind == "checks":
        period = rng.choice([4, 8, 12, 16])
        m = ((xx // (period / 2) + yy // (period / 2)) % 2) == 0
    elif kind == "rings":
        period = rng.choice([6, 8, 12])
        r = np.hypot(xx - rng.uniform(0, size), yy - rng.uniform(0, size))
        m = ((r / period) % 1.0) < 0.5
    elif kind == "noise":
        cells = rng.choice([2, 4, 8])
        small = np.random.default_rng(rng.getrandbits(32)).random((size // cells, size // cells)) < 0.5
        m = np.kron(small, np.ones((cells, cells), dtype=bool))
    else:
        style = "outlined" if kind == "outlined_scene" else "striped"
        return render(random_scene(rng, size, style=style), size)
    out = np.where(m[..., None], a, b)
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# The checker: what does an image show?
# ---------------------------------------------------------------------------------------------

_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _PALETTE_NAMES], dtype=np.float32)


def _nearest_colour(pixels: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour for each RGB pixel (Euclidean distance in RGB)."""
    d = ((pixels[..., None, :] - _PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


@dataclass(frozen=True)
class Reading:
    """What the checker saw in one image; ``None`` where it could not tell."""

    colour: str | None
    background: str | None
    shape: str | None
    fill_ratio: float


def read_scene(image: Image.Image) -> Reading:
    """Measure object colour, background colour and shape of a generated scene.

    Background: the most common palette colour on the 1-px border. Object: every pixel whose
    palette colour differs from the background; its colour is the most common palette colour among
    them. Shape, from the object's bounding box: a triangle (pointing up) is much narrower at 20%
    of its height than at 80% (widths ~0.2 vs ~0.8 of the box); otherwise the fill ratio of the box
    tells a square (~1.0) from a circle (pi/4 = 0.79), cut at 0.89.
    """
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    labels = _nearest_colour(arr)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    bg_idx = int(np.bincount(border, minlength=len(_PALETTE)).argmax())
    fg_mask = labels != bg_idx
    background = _PALETTE_NAMES[bg_idx]
    if fg_mask.sum() < 6:
        return Reading(colour=None, background=background, shape=None, fill_ratio=0.0)
    fg_idx = int(np.bincount(labels[fg_mask], minlength=len(_PALETTE)).argmax())
    # Ignore rows/columns with a single stray pixel when finding the bounding box.
    rows = np.nonzero(fg_mask.sum(1) >= 2)[0]
    cols = np.nonzero(fg_mask.sum(0) >= 2)[0]
    if len(rows) < 3 or len(cols) < 3:
        return Reading(colour=_PALETTE_NAMES[fg_idx], background=background, shape=None, fill_ratio=0.0)
    y0, y1, x0, x1 = rows[0], rows[-1], cols[0], cols[-1]
    box = fg_mask[y0 : y1 + 1, x0 : x1 + 1]
    h, w = box.shape
    fill = float(box.mean())
    top = box[int(round(0.2 * (h - 1)))].sum() / w
    bottom = box[int(round(0.8 * (h - 1)))].sum() / w
    if bottom - top > 0.3:
        shape = "triangle"
    else:
        shape = "square" if fill >= 0.89 else "circle"
    return Reading(colour=_PALETTE_NAMES[fg_idx], background=background, shape=shape, fill_ratio=fill)


def parse_caption(caption: str) -> dict[str, str]:
    """Inverse of :data:`CAPTION_TEMPLATE`: ``{"colour", "shape", "background"}``."""
    words = caption.strip().lower().split()
    # "a {colour} {shape} on a {background} background" -> words 1, 2, 5
    if len(words) < 7 or words[0] != "a" or words[3:5] != ["on", "a"]:
        raise ValueError(f"caption {caption!r} does not follow {CAPTION_TEMPLATE!r}")
    return {"colour": words[1], "shape": words[2], "background": words[5]}


def score(readings: list[Reading], expected: list[dict[str, str]]) -> dict[str, float]:
    """Rates (0..1) of images whose colour, background and shape match what was asked for."""
    n = len(readings)
    if n == 0 or n != len(expected):
        raise ValueError("score() needs one expected caption per reading")
    return {
        "colour": sum(r.colour == e["colour"] for r, e in zip(readings, expected)) / n,
        "background": sum(r.background == e["background"] for r, e in zip(readings, expected)) / n,
        "shape": sum(r.shape == e["shape"] for r, e in zip(readings, expected)) / n,
    }
