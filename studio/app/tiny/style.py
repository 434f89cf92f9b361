"""Style scores for the tiny model's scenes: does an image show stripes, or a dark outline?

The sample style datasets (``datasets/striped``, ``datasets/outlined``) teach the tiny model two
styles that pixel statistics can see, so a trained adapter can be graded without a person looking:

- ``striped``: horizontal dark stripes of period 8 px across the object. The score is the amplitude
  of the period-8 component of the object's row profile of dark pixels (0 for a flat object; a
  perfect half-dark square wave scores 2/pi = 0.64, its fundamental's amplitude).
- ``outlined``: a dark band around the object. The score is the fraction of the object's rim (its
  pixels within 2 px of the background) that is dark (0 for a plain object, near 1 when outlined).

The object is what differs from the background (the most common palette colour on the border, as
:func:`studio.app.tiny.scenes.read_scene` finds it). Dark means luminance below 45 of 255 (the styles
draw with 25,25,25), so prompts for these scores must not ask for black objects or backgrounds.

:func:`measure_style` generates the same prompts and seeds with and without an adapter stack
through ``studio.generation.run`` and reports both means and their difference: the number the trainer's
test asserts on, and ``python -m studio.app.tiny.style`` prints.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
from PIL import Image

from studio.app.tiny.scenes import _PALETTE_NAMES, _nearest_colour

DARK_LUMINANCE = 45.0  # the styles draw with 25; the darkest colour, blue, is 69
STRIPE_PERIOD_PX = 8
RIM_PX = 2
STYLE_PROMPTS = (
    "a red circle on a blue background",
    "a yellow square on a green background",
    "a blue triangle on a white background",
    "a green circle on a yellow background",
)


def _object_mask(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    labels = _nearest_colour(arr)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    bg = int(np.bincount(border, minlength=len(_PALETTE_NAMES)).argmax())
    luminance = arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return labels != bg, luminance < DARK_LUMINANCE


def stripe_score(image: Image.Image) -> float:
    """Amplitude of the period-8 px component of the object's per-row dark fraction (0 = no stripes)."""
    obj, dark = _object_mask(image)
    rows = np.nonzero(obj.sum(1) >= 2)[0]
    if len(rows) < STRIPE_PERIOD_PX:
        return 0.0
    profile = np.array([dark[y][obj[y]].mean() for y in rows])
    profile = profile - profile.mean()
    phase = np.exp(-2j * math.pi * rows / STRIPE_PERIOD_PX)
    return float(2 * abs((profile * phase).sum()) / len(rows))


def outline_score(image: Image.Image) -> float:
    """Fraction of the object's rim (within 2 px of the background) that is dark (0 = no outline)."""
    obj, dark = _object_mask(image)
    if obj.sum() < 6:
        return 0.0
    # Distance-to-background by repeated 4-neighbour erosion: RIM_PX erosions peel the rim off.
    inner = obj.copy()
    for _ in range(RIM_PX):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    rim = obj & ~inner
    return float(dark[rim].mean()) if rim.any() else 0.0


SCORES = {"striped": stripe_score, "outlined": outline_score}


def style_score(image: Image.Image, style: str) -> float:
    try:
        return SCORES[style](image)
    except KeyError:
        raise ValueError(f"unknown style {style!r}: choose one of {', '.join(SCORES)}") from None


def measure_style(style: str, adapters: list[dict], *, trigger: str = "", base: str = "tiny", seeds=(0, 1, 2),
                  steps: int = 20, prompts=STYLE_PROMPTS, base_score: float | None = None) -> dict:
    """Mean ``style`` score of the same prompts and seeds without and with ``adapters``.

    ``trigger`` is appended to every prompt (", zkstripes"), as the sample datasets caption it, on
    both sides so that the base model sees the same text.
    Returns ``{"base", "adapter", "margin", "images"}``; margin = adapter - base. ``base_score``: the
    base side measured earlier with the same arguments (skips generating it again).
    """
    from studio.generation.requests import GenerationRequest
    from studio.generation.run import generate

    means = {} if base_score is None else {"base": base_score}
    for label, stack in (("base", []), ("adapter", adapters)):
        if label in means:
            continue
        values = []
        for scene in prompts:
            prompt = f"{scene}, {trigger}" if trigger else scene
            result = generate(GenerationRequest(prompt=prompt, base_model=base, seed=seeds[0], num_images=len(seeds),
                                                batch_size=1,  # as measured before batching: one at a time
                                                num_inference_steps=steps, adapters=list(stack)))
            values += [style_score(img, style) for img in result.images]
        means[label] = float(np.mean(values))
    return {"base": means["base"], "adapter": means["adapter"], "margin": means["adapter"] - means["base"],
            "images": len(prompts) * len(seeds)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studio.app.tiny.style",
                                description="Style score of an adapter on the tiny model: base vs adapter.")
    p.add_argument("style", choices=sorted(SCORES))
    p.add_argument("--adapter", action="append", default=[], metavar="REF[:WEIGHT]", required=True)
    p.add_argument("--trigger", default="")
    args = p.parse_args(argv)
    from adapters.compose import parse_adapter_arg

    stack = [parse_adapter_arg(a).to_dict() for a in args.adapter]
    print(json.dumps(measure_style(args.style, stack, trigger=args.trigger), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
