"""What the Generate page's form can hold, and a recipe turned into form values (or refused).

The form's widgets have narrower ranges than a request allows (150 steps against 1000, 2048 px
sides against 4096, CFG 30 against 50, strengths of +-2 against +-4): Streamlit would silently
replace a value outside a widget's range, so a 200-step recipe would load as another image's
settings. :func:`form_values` refuses such a recipe instead, naming every value that does not fit,
and restores the img2img/inpainting inputs only from folders the UI may read
(:func:`studio.core.settings.check_data_path`). Not a page: the Generate page imports it.
"""

from __future__ import annotations

from dataclasses import replace

from studio.core.errors import InputFileNotFoundError, RecipeError
from studio.core.settings import check_data_path
from studio.generation.inputs import stored_input
from studio.generation.requests import DEFAULT_STRENGTH

# (low, high) of each widget on the Generate page; the page builds its widgets from these.
STEPS = (1, 150)
IMAGES = (1, 16)
SIDE = (0, 2048)  # 0 = the base model's native size
GUIDANCE = (0.0, 30.0)  # 0 = the base model's recommended CFG
STRENGTH = (0.05, 1.0)  # img2img / inpainting denoising strength
WEIGHT = (-2.0, 2.0)  # an adapter's strength, and its denoiser / text-encoder strengths


def _outside(label: str, value, limits: tuple) -> str | None:
    low, high = limits
    return None if value is None or low <= value <= high else f"{label} {value:g} (the form holds {low:g} to {high:g})"


def _stored_input(label: str, path: str | None, sha256: str | None) -> str | None:
    """The input image a recipe names, as a path the UI may read: the studio's stored copy of its
    sha256 when there is one (recipes from other machines name their own folders), else the path
    itself if it lies under the data roots and exists."""
    if path is None:
        return None
    stored = stored_input(sha256) if sha256 is not None else None
    if stored is not None:
        return str(stored)
    checked = check_data_path(path, what=f"recipe's {label}")
    if not checked.is_file():
        raise InputFileNotFoundError(f"the recipe's {label} {path} is not on this machine: put the image back at "
                                     f"that path, or load the recipe without it by dropping another PNG")
    return str(checked)


def form_values(request) -> dict:
    """Session-state values for the Generate form from a recipe's request (a ``GenerationRequest``).

    Keys: the form's widget keys (``prompt``, ``steps``, ``guidance``, ...), ``strength``,
    ``recipe_init`` / ``recipe_mask`` (stored input paths, or None) and ``recipe_batch``. Raises :class:`RecipeError`
    listing every value the widgets cannot hold, and :class:`~studio.core.errors.PathNotAllowedError`
    or :class:`InputFileNotFoundError` for an input image the UI may not or cannot read.
    """
    problems = [
        _outside("steps", request.num_inference_steps, STEPS),
        _outside("images", request.num_images, IMAGES),
        _outside("width", request.width, SIDE),
        _outside("height", request.height, SIDE),
        _outside("CFG scale", request.guidance_scale, GUIDANCE),
        _outside("strength", request.strength, STRENGTH),
    ]
    for i, spec in enumerate(request.adapters, 1):
        for label, value in (("strength", spec.weight), ("denoiser strength", spec.denoiser),
                             ("text-encoder strength", spec.text_encoders)):
            problems.append(_outside(f"adapter {i}'s {label}", value, WEIGHT))
        if spec.blocks:
            problems.append(f"adapter {i}'s per-block strengths (the form has none)")
    if request.precision != "auto":
        problems.append(f"precision {request.precision} (the form runs the device's own, auto)")
    problems = [p for p in problems if p]
    if problems:
        raise RecipeError(f"this recipe does not fit the form: {'; '.join(problems)}; re-run it exactly with "
                          f"lora-studio generate --recipe FILE")
    init = _stored_input("init image", request.init_image, request.init_image_sha256)
    mask = _stored_input("mask", request.mask_image, request.mask_image_sha256)
    values = {
        "prompt": request.prompt, "negative": request.negative_prompt, "base": request.base_model,
        "scheduler": request.scheduler, "steps": request.num_inference_steps,
        "guidance": float(request.guidance_scale or 0.0), "seed": "" if request.seed is None else str(request.seed),
        "num_images": request.num_images, "width": request.width or 0, "height": request.height or 0,
        "recipe_init": init, "recipe_mask": mask,
        # The batch the image was made in: a request with this seed and one image rebuilds it (see
        # batch_for), so the image re-makes bit for bit from the form too.
        "recipe_batch": None if request.batch_index is None else (request.seed, request.batch_size,
                                                                  request.batch_index),
    }
    if init is not None:
        values["strength"] = float(request.strength if request.strength is not None else DEFAULT_STRENGTH)
    return values


def batch_for(request, recipe_batch):
    """``request`` with the batch of the recipe loaded into the form (``recipe_batch``: its seed, batch
    size and row) when it still asks for that seed and one image; otherwise ``request`` unchanged."""
    if recipe_batch is None or request.num_images != 1 or request.seed != recipe_batch[0]:
        return request
    return replace(request, batch_size=recipe_batch[1], batch_index=recipe_batch[2])
