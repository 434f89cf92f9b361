"""Text-to-image generation: a :class:`GenerationRequest` in, images that carry their recipe out.

This is the one generation path the CLI, the UI, training previews and grids share. Rules:

- Image ``i`` of a request uses seed ``seed + i`` with its own ``torch.Generator``, so each image can
  be re-made alone from its recipe.
- Every PNG carries its recipe twice: an A1111-style ``parameters`` text chunk (read by A1111,
  Civitai and most image browsers) and a ``lora_studio`` JSON chunk with the full request, which
  ``--recipe`` re-runs bit for bit on the same machine.
- Schedulers are chosen by their A1111 sampler names (``Euler a``, ``DPM++ 2M``...), built fresh for
  every call from the pipeline's own scheduler config, so requests never share scheduler state.

- img2img (``init_image`` + ``strength``) and inpainting (``init_image`` + ``mask_image``) run on the
  same components as text-to-image (``from_pipe``: no second copy of the weights), so the adapter
  stack applies to them too. Input images are copied into ``$LORA_STUDIO_HOME/inputs`` under their
  sha256 and the recipe pins that hash: a recipe re-runs exactly even after the original file moved,
  and refuses a file that changed. Every input file is size-checked before it is read and decoded
  within a pixel bound.
- A recipe read from a PNG is untrusted input: :func:`read_recipe` bounds the chunk's size and
  nesting before parsing it, type-checks every field, asks for one image (the studio writes one per
  PNG), and takes input images from the inputs store only (by their pinned sha256, never another
  path). :func:`recipe_cost` and :func:`check_recipe_cost` make a costly recipe ask for a confirmation.

Adapter stacks (LoRA composition) extend the request in ``adapters.compose``; this module does not
load adapters.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from studio.core.errors import InvalidRequestError, RecipeError, StudioError
from studio.core.hashing import file_sha256

RECIPE_KEY = "lora_studio"
RECIPE_VERSION = 1
MAX_SEED = 2**32 - 1
MAX_SIDE = 4096
MAX_IMAGES = 64
# Recipe chunks: the studio writes a few kilobytes (prompt, settings, the adapter stack); a megabyte
# holds any prompt a person types, and bounds the parse of a chunk from a PNG nobody vouches for.
MAX_RECIPE_CHARS = 1 << 20
# payload > request > adapters > entry > blocks > part > block > weights list: 8 levels at most in a
# studio recipe. Twice that is refused before json.loads, which would raise RecursionError at ~1000.
RECIPE_DEPTH = 16
# A recipe PNG holds one generated image, at most MAX_SIDE x MAX_SIDE.
MAX_RECIPE_PIXELS = MAX_SIDE * MAX_SIDE
# Recipe cost, in pixel-steps: denoising steps x width x height x images (see recipe_cost). The
# studio's normal range is what the Generate page's widgets hold: up to 150 steps at 2048 x 2048, one
# image: 150 x 2048 x 2048 = 629,145,600. 50 steps at 1024 x 1024 on a real model (52,428,800) is a
# twelfth of it; 1000 steps at 4096 x 4096 (16,777,216,000) is 27 times over. On a GPU doing SD-1 at
# 512 x 512 and ~20 steps/s (5.2 M pixel-steps/s) the bound is about two minutes; on a CPU, hours.
MAX_RECIPE_COST = 150 * 2048 * 2048
# A width/height of None (the base model's native size) counts as 1024, the largest native size of
# the families the studio runs (SDXL, SD3, Flux), so a cost is never underestimated.
_COST_NATIVE_SIDE = 1024
# Input images (img2img, inpainting). A 48-megapixel phone photo must fit; 8192 x 8192 = 67 M pixels
# (four times the largest output) does, and decodes to at most 256 MiB as RGBA. It is below Pillow's
# own decompression-bomb threshold (89 M), so Pillow never warns before this bound refuses.
MAX_INPUT_PIXELS = 8192 * 8192
# The file itself: 8192 x 8192 RGB stored raw (BMP, uncompressed PNG) is 192 MiB; 256 MiB holds any
# honest encoding of an image within MAX_INPUT_PIXELS.
MAX_INPUT_BYTES = 256 * 1024 * 1024
_PINNED_KEYS = ("name", "version", "tensor_sha256")  # what a recipe records of each resolved adapter
DEFAULT_STRENGTH = 0.75  # A1111's img2img "denoising strength" default
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_STORED_SUFFIXES = (".png", ".jpg", ".webp", ".bmp")  # what store_input_image names its copies
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A1111 sampler name -> (diffusers scheduler class, extra config). "Karras" variants use Karras sigmas.
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "DDPM": ("DDPMScheduler", {}),
    "PNDM": ("PNDMScheduler", {"skip_prk_steps": True}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}
DEFAULT_SCHEDULER = "Euler"


def scheduler_names() -> list[str]:
    return list(SCHEDULERS)


def make_scheduler(name: str, base_config):
    """A fresh scheduler called ``name`` built from a pipeline's scheduler config."""
    import diffusers

    try:
        class_name, extra = SCHEDULERS[name]
    except KeyError:
        raise InvalidRequestError(
            f"unknown scheduler {name!r}: choose one of {', '.join(repr(n) for n in SCHEDULERS)}"
        ) from None
    return getattr(diffusers, class_name).from_config(base_config, **extra)


@dataclass
class GenerationRequest:
    """Everything that determines a generated image (with the base weights and the machine).

    ``width``/``height`` of ``None`` mean the base model's native resolution, ``guidance_scale`` of
    ``None`` the base model's recommended CFG; ``seed`` of ``None`` means a random seed, chosen when
    the request runs. Every image's recipe records the resolved values.
    """

    prompt: str
    negative_prompt: str = ""
    num_inference_steps: int = field(default=20, metadata={"help": "denoising steps"})
    guidance_scale: float | None = field(
        default=None, metadata={"help": "CFG scale; default: the base model's recommendation"}
    )
    width: int | None = field(default=None, metadata={"help": "image width in pixels, a multiple of 8"})
    height: int | None = field(default=None, metadata={"help": "image height in pixels, a multiple of 8"})
    seed: int | None = field(default=None, metadata={"help": "seed of the first image; image i uses seed + i"})
    num_images: int = field(default=1, metadata={"help": "images per prompt"})
    scheduler: str = field(default=DEFAULT_SCHEDULER, metadata={"help": "sampler, by its A1111 name"})
    base_model: str = field(default="tiny", metadata={"help": "base model reference"})
    adapters: list = field(
        default_factory=list,
        metadata={"help": "adapter stack: dicts with ref, weight and optional unet, text_encoder, blocks"},
    )
    init_image: str | None = field(
        default=None, metadata={"help": "img2img / inpainting: the starting image (a PNG, JPEG or WebP file)"}
    )
    strength: float | None = field(
        default=None,
        metadata={"help": f"img2img / inpainting: how much of the init image is re-noised, 0 < s <= 1 "
                          f"(1 ignores it); default {DEFAULT_STRENGTH}"},
    )
    mask_image: str | None = field(
        default=None, metadata={"help": "inpainting: white = repaint, black = keep (needs init_image)"}
    )
    init_image_sha256: str | None = field(
        default=None, metadata={"help": "sha256 of the init image's file, pinned by the recipe"}
    )
    mask_image_sha256: str | None = field(
        default=None, metadata={"help": "sha256 of the mask image's file, pinned by the recipe"}
    )

    def __post_init__(self) -> None:
        from adapters.compose import AdapterSpec

        if not isinstance(self.adapters, (list, tuple)):
            raise InvalidRequestError("adapters must be a list of {ref, weight} entries")
        # Normalise to plain dicts (recipes are JSON) after validating each entry.
        normalised = []
        for entry in self.adapters:
            if isinstance(entry, dict):
                _check_pinned(entry)
            try:
                spec = entry if isinstance(entry, AdapterSpec) else AdapterSpec.from_dict(entry)
            except OverflowError:  # a weight like 10**400: no float holds it
                raise InvalidRequestError(f"adapter entry for {entry.get('ref')!r} has a weight too large for a "
                                          f"number: weights are small numbers like 0.8") from None
            pinned = {k: entry[k] for k in _PINNED_KEYS if isinstance(entry, dict) and k in entry}
            normalised.append({**spec.to_dict(), **pinned})
        self.adapters = normalised
        for name in ("prompt", "negative_prompt", "scheduler", "base_model"):
            # A list or number here fails deep inside diffusers or the model resolver, far from its cause.
            if not isinstance(getattr(self, name), str):
                raise InvalidRequestError(f"{name} must be text, got {_brief(getattr(self, name))}")
        for name in ("num_inference_steps", "num_images", "width", "height", "seed"):
            if isinstance(getattr(self, name), bool):  # True is an int to Python, never a count to a user
                raise InvalidRequestError(f"{name} must be a whole number, got {getattr(self, name)!r}")
        for name in ("guidance_scale", "strength"):
            if isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"{name} must be a number, got {getattr(self, name)!r}")
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise InvalidRequestError(f"steps must be a whole number >= 1, got {self.num_inference_steps!r}")
        if self.num_inference_steps > 1000:
            raise InvalidRequestError(f"steps must be at most 1000, got {self.num_inference_steps}")
        if not isinstance(self.num_images, int) or not 1 <= self.num_images <= MAX_IMAGES:
            raise InvalidRequestError(f"number of images must be between 1 and {MAX_IMAGES}, got {self.num_images!r}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, int) or value < 8 or value > MAX_SIDE or value % 8:
                # Integer arithmetic: value / 8 overflows a float for a 400-digit width.
                nearest = (value + 4) // 8 * 8 if isinstance(value, int) else 8
                raise InvalidRequestError(
                    f"{name} must be a multiple of 8 between 8 and {MAX_SIDE}, got {_brief(value)}: "
                    f"try {max(8, min(MAX_SIDE, nearest))}"
                )
        if self.guidance_scale is not None:
            if not isinstance(self.guidance_scale, (int, float)) or not 0 <= self.guidance_scale <= 50:
                raise InvalidRequestError(f"guidance scale must be between 0 and 50, got {self.guidance_scale!r}")
            self.guidance_scale = float(self.guidance_scale)
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED):
            raise InvalidRequestError(f"seed must be a whole number between 0 and {MAX_SEED}, got {self.seed!r}")
        if self.seed is not None and self.seed + self.num_images - 1 > MAX_SEED:
            raise InvalidRequestError(f"seed + number of images must stay below {MAX_SEED + 1}")
        if self.scheduler not in SCHEDULERS:
            raise InvalidRequestError(
                f"unknown scheduler {self.scheduler!r}: choose one of {', '.join(repr(n) for n in SCHEDULERS)}"
            )
        for name in ("init_image", "mask_image"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise InvalidRequestError(f"{name} must be a file path, got {value!r}")
        for name in ("base_model", "init_image", "mask_image"):
            value = getattr(self, name)
            if value is not None and value.startswith("~"):
                # Path.expanduser raises RuntimeError for "~someone" when no such user exists.
                try:
                    Path(value).expanduser()
                except RuntimeError:
                    raise InvalidRequestError(f"{name} {_brief(value)} starts with ~ but names no user's home "
                                              f"folder: give the full path") from None
        if self.mask_image is not None and self.init_image is None:
            raise InvalidRequestError("a mask needs an init image to inpaint: pass --init-image with --mask")
        if self.strength is not None:
            if self.init_image is None:
                raise InvalidRequestError("strength applies to img2img and inpainting: pass --init-image too")
            if (isinstance(self.strength, bool) or not isinstance(self.strength, (int, float))
                    or not 0 < self.strength <= 1):
                raise InvalidRequestError(f"strength must be a number in (0, 1], got {self.strength!r}")
            self.strength = float(self.strength)
            if int(self.num_inference_steps * self.strength) < 1:
                # diffusers runs int(steps * strength) steps of the schedule: zero would return noise.
                raise InvalidRequestError(
                    f"{self.num_inference_steps} steps at strength {self.strength:g} run no denoising step: "
                    f"use at least {math.ceil(1 / self.strength)} steps or a higher strength")
        for name in ("init_image_sha256", "mask_image_sha256"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value)):
                raise InvalidRequestError(f"{name} must be 64 lowercase hex digits, got {value!r}")

    @property
    def task(self) -> str:
        """``text2img``, ``img2img`` or ``inpaint`` (the family's pipeline for it runs the request)."""
        if self.mask_image is not None:
            return "inpaint"
        return "img2img" if self.init_image is not None else "text2img"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GenerationRequest:
        """A request from a recipe's JSON: every field type-checked (a :class:`RecipeError` names the
        field), then the request's own validation (its errors become RecipeErrors too)."""
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe's request must be an object, got {_brief(data)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise RecipeError(f"recipe has unknown fields {_brief(unknown)}: it was written by a newer studio")
        if "prompt" not in data:
            raise RecipeError("recipe is incomplete: it has no prompt")
        for name, value in data.items():
            _check_recipe_field(name, value)
        try:
            return cls(**data)
        except InvalidRequestError as e:
            raise RecipeError(f"the recipe's request is not valid: {e}") from None


def _brief(value, limit: int = 60) -> str:
    """``repr`` of a value for a one-line message, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Recipe field -> (accepts the value, what it must be). None is accepted where the field's default is None.
_RECIPE_FIELDS = {
    "prompt": (lambda v: isinstance(v, str), "text"),
    "negative_prompt": (lambda v: isinstance(v, str), "text"),
    "num_inference_steps": (_is_whole, "a whole number"),
    "guidance_scale": (lambda v: v is None or _is_number(v), "a number or null"),
    "width": (lambda v: v is None or _is_whole(v), "a whole number or null"),
    "height": (lambda v: v is None or _is_whole(v), "a whole number or null"),
    "seed": (lambda v: v is None or _is_whole(v), "a whole number or null"),
    "num_images": (_is_whole, "a whole number"),
    "scheduler": (lambda v: isinstance(v, str), "text (a sampler name)"),
    "base_model": (lambda v: isinstance(v, str), "text (a base-model reference)"),
    "adapters": (lambda v: isinstance(v, list) and all(isinstance(e, dict) for e in v),
                 'a list of objects like {"ref": "name@1", "weight": 0.8}'),
    "init_image": (lambda v: v is None or isinstance(v, str), "a file path or null"),
    "strength": (lambda v: v is None or _is_number(v), "a number or null"),
    "mask_image": (lambda v: v is None or isinstance(v, str), "a file path or null"),
    "init_image_sha256": (lambda v: v is None or isinstance(v, str), "64 hex digits or null"),
    "mask_image_sha256": (lambda v: v is None or isinstance(v, str), "64 hex digits or null"),
}
# Adapter-entry key -> (accepts, what it must be): the AdapterSpec fields and the pins a recipe adds.
_ENTRY_FIELDS = {
    "ref": (lambda v: isinstance(v, str), "text"),
    "weight": (lambda v: v is None or _is_number(v), "a number"),
    "unet": (lambda v: v is None or _is_number(v), "a number"),
    "text_encoder": (lambda v: v is None or _is_number(v), "a number"),
    "blocks": (lambda v: v is None or isinstance(v, dict), "an object of per-block weights"),
    "name": (lambda v: isinstance(v, str), "text"),
    "version": (lambda v: v is None or _is_whole(v), "a whole number (none for an adapter used from a file)"),
    "tensor_sha256": (lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
                      "64 lowercase hex digits"),
}


def _check_recipe_field(name: str, value) -> None:
    accepts, what = _RECIPE_FIELDS[name]
    if not accepts(value):
        raise RecipeError(f"recipe field {name!r} must be {what}, got {_brief(value)}: the recipe is damaged")
    if name == "adapters":
        for i, entry in enumerate(value):
            for key, item in entry.items():
                check = _ENTRY_FIELDS.get(key)
                if check is None:
                    continue  # unknown keys: AdapterSpec names them
                if not check[0](item) or (_is_number(item) and not _finite_weight(item)):
                    raise RecipeError(f"recipe field 'adapters' entry {i + 1}: {key!r} must be {check[1]}, got "
                                      f"{_brief(item)}: the recipe is damaged")


def _finite_weight(value) -> bool:
    """A number a float holds (a 400-digit integer would overflow every later check)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_pinned(entry: dict) -> None:
    """The pins a resolved adapter entry carries (recipes show them; A1111's 'Lora hashes' slices them)."""
    for key in _PINNED_KEYS:
        if key in entry and not _ENTRY_FIELDS[key][0](entry[key]):
            raise InvalidRequestError(f"adapter entry for {_brief(entry.get('ref'))}: {key} must be "
                                      f"{_ENTRY_FIELDS[key][1]}, got {_brief(entry[key])}")


def recipe_cost(request: GenerationRequest) -> int:
    """What a request costs, in pixel-steps: denoising steps x width x height x images.

    Denoising dominates a request's time and grows with each factor, so this orders requests by the
    work they ask for (a width/height of None counts as 1024, the largest native size). Strength is
    ignored: img2img runs fewer steps, and the cost stays an upper bound. Compare with
    :data:`MAX_RECIPE_COST`.
    """
    width = request.width or _COST_NATIVE_SIDE
    height = request.height or _COST_NATIVE_SIDE
    return request.num_inference_steps * width * height * request.num_images


def check_recipe_cost(request: GenerationRequest, *, confirmed: bool) -> None:
    """Refuse a request whose :func:`recipe_cost` exceeds :data:`MAX_RECIPE_COST`, unless ``confirmed``
    (``--yes`` on the command line, a confirmation in the UI). Raises :class:`RecipeTooCostlyError`."""
    from studio.core.errors import RecipeTooCostlyError

    cost = recipe_cost(request)
    if cost > MAX_RECIPE_COST and not confirmed:
        raise RecipeTooCostlyError(
            f"this recipe asks for {request.num_inference_steps} steps at {request.width or 'native'}x"
            f"{request.height or 'native'} x {request.num_images} image(s), {cost / 1e6:,.0f} M pixel-steps, more "
            f"than the {MAX_RECIPE_COST / 1e6:,.0f} M a normal recipe needs (150 steps at 2048x2048): pass --yes "
            f"to run it anyway")


@dataclass
class GeneratedImage:
    """One image with the exact single-image request that re-makes it."""

    image: object  # PIL.Image.Image
    request: GenerationRequest  # num_images=1, seed = this image's seed, sizes resolved
    parameters: str  # the A1111 "parameters" text
    model_hash: str

    @property
    def seed(self) -> int:
        return self.request.seed

    def pnginfo(self):
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("parameters", self.parameters)
        info.add_text(RECIPE_KEY, json.dumps(recipe_payload(self.request, self.model_hash), ensure_ascii=False))
        return info

    def save(self, path: str | Path) -> Path:
        """Write the PNG with its recipe atomically (temp file in the same folder, then rename)."""
        from studio.core.atomic import write_atomic

        return write_atomic(path, lambda f: self.image.save(f, format="PNG", pnginfo=self.pnginfo()))


@dataclass
class GenerationResult:
    request: GenerationRequest  # resolved: seed and sizes filled in
    outputs: list[GeneratedImage]
    seconds: float

    @property
    def images(self) -> list:
        return [o.image for o in self.outputs]

    @property
    def seeds(self) -> list[int]:
        return [o.seed for o in self.outputs]

    def save(self, out_dir: str | Path, stem: str | None = None) -> list[Path]:
        """Save every image under ``out_dir`` as ``<stem>-<seed>.png`` without overwriting files."""
        out_dir = Path(out_dir)
        stem = stem or time.strftime("%Y%m%d-%H%M%S")
        paths = []
        for out in self.outputs:
            path = out_dir / f"{stem}-{out.seed}.png"
            n = 1
            while path.exists():
                path = out_dir / f"{stem}-{out.seed}-{n}.png"
                n += 1
            paths.append(out.save(path))
        return paths


def recipe_payload(request: GenerationRequest, model_hash: str = "") -> dict:
    import diffusers
    import torch

    return {
        "version": RECIPE_VERSION,
        "request": request.to_dict(),
        "model_hash": model_hash,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }


def a1111_parameters(request: GenerationRequest, model_hash: str = "") -> str:
    """The ``parameters`` text A1111 writes: prompt, ``Negative prompt:`` line, then settings."""
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    settings = [
        f"Steps: {request.num_inference_steps}",
        f"Sampler: {request.scheduler}",
        f"CFG scale: {request.guidance_scale:g}",
        f"Seed: {request.seed}",
        f"Size: {request.width}x{request.height}",
    ]
    if model_hash:
        settings.append(f"Model hash: {model_hash}")
    settings.append(f"Model: {_a1111_value(request.base_model)}")
    if request.init_image is not None:
        settings.append(f"Denoising strength: {request.strength:g}")  # A1111's img2img key
    if request.adapters:
        # A1111/Civitai read adapters from 'Lora hashes': name and the first 12 hex of the tensor hash.
        hashes = ", ".join(f"{a.get('name', a['ref'])}: {a.get('tensor_sha256', '')[:12]}" for a in request.adapters)
        settings.append(f'Lora hashes: "{hashes}"')
    lines.append(", ".join(settings))
    return "\n".join(lines)


def _a1111_value(value: str) -> str:
    # A1111 quotes values that contain its separators.
    return json.dumps(value) if re.search(r"[,:\n\"]", value) else value


def read_recipe(path: str | Path) -> GenerationRequest:
    """The request stored in a PNG written by the studio (``lora_studio`` chunk).

    The PNG may come from anywhere, so nothing in it is trusted: the claimed size is checked before
    Pillow sees the file, only the chunks before the pixels are read (the studio writes its recipe
    there), the chunk's size and nesting are bounded before it is parsed, every field is type-checked,
    and the recipe must ask for one image and take its input images from the inputs store. The
    request's cost is left to :func:`check_recipe_cost`, which needs the user's confirmation.
    """
    from PIL import UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist: pass a PNG the studio wrote")
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] == _PNG_MAGIC and head[12:16] == b"IHDR":
        # Read from the IHDR chunk before Pillow opens the file: Pillow refuses huge sizes without naming
        # them (DecompressionBombError), and warns on stderr below that.
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        if width * height > MAX_RECIPE_PIXELS:
            raise RecipeError(f"{path} claims {width}x{height} pixels, more than the {MAX_SIDE}x{MAX_SIDE} the "
                              f"studio ever writes: it is not a PNG the studio wrote")
    try:
        with _bounded_open(path, MAX_RECIPE_PIXELS) as im:
            fmt = im.format
            # ``info`` holds the text chunks before the pixel data, where the studio writes; ``im.text``
            # would decode the whole image to find chunks after it.
            text = {k: v for k, v in im.info.items() if k in (RECIPE_KEY, "parameters") and isinstance(v, str)}
    except _TooManyPixels as e:
        raise RecipeError(f"{path} claims {e}, more than the {MAX_SIDE}x{MAX_SIDE} the studio ever writes: it is "
                          f"not a PNG the studio wrote") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        # ValueError: Pillow's own bound on text chunks ("Too much memory used in text chunks").
        raise RecipeError(f"{path} is not a readable image ({_one_line(e)}): pass a PNG the studio wrote") from None
    if fmt != "PNG":
        raise RecipeError(f"{path} is a {fmt} image, not a PNG: recipes are stored in PNG files only")
    if RECIPE_KEY not in text:
        hint = " (it has A1111 parameters, which do not pin every setting)" if "parameters" in text else ""
        raise RecipeError(f"{path} carries no LoRA Studio recipe{hint}: pass a PNG the studio wrote")
    chunk = text[RECIPE_KEY]
    if len(chunk) > MAX_RECIPE_CHARS:
        raise RecipeError(f"the recipe in {path} is too large ({len(chunk):,} characters; a recipe is a few "
                          f"kilobytes, at most {MAX_RECIPE_CHARS:,}): it is not a recipe the studio wrote")
    from studio.core.filesafety import json_nesting_within

    if not json_nesting_within(chunk, RECIPE_DEPTH):
        raise RecipeError(f"the recipe in {path} is damaged (its JSON nests deeper than {RECIPE_DEPTH} levels; a "
                          f"recipe has 8 at most)")
    try:
        payload = json.loads(chunk, parse_constant=_refuse_json_constant)
        request = payload["request"]
    except (ValueError, KeyError, TypeError) as e:
        raise RecipeError(f"the recipe in {path} is damaged ({_one_line(e)})") from None
    if not isinstance(request, dict):
        raise RecipeError(f"the recipe in {path} is damaged (request is not an object)")
    request = GenerationRequest.from_dict(request)
    if request.num_images != 1:
        raise RecipeError(f"the recipe in {path} asks for num_images {request.num_images}, but the studio writes "
                          f"a recipe for each image (num_images 1): it was not written by the studio")
    return _pin_recipe_inputs(request, path)


def _refuse_json_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:200]


def _pin_recipe_inputs(request: GenerationRequest, path: Path) -> GenerationRequest:
    """The recipe with its input images pointing at this studio's stored copies.

    A recipe names its inputs by their stored path and sha256 (``<sha256>.png`` in the inputs store).
    Any other path is refused without being read: a recipe must not make the studio read a file of the
    user's choosing; and an input missing from this studio's store cannot re-run.
    """
    changes = {}
    for name, flag in (("init_image", "--init-image"), ("mask_image", "--mask")):
        path_text, pinned = getattr(request, name), getattr(request, f"{name}_sha256")
        if path_text is None:
            if pinned is not None:
                raise RecipeError(f"the recipe in {path} pins {name}_sha256 without an {name}: it is damaged")
            continue
        if pinned is None:
            raise RecipeError(f"the recipe's {name} {_brief(path_text)} has no {name}_sha256: a recipe takes its "
                              f"input images from the inputs store, pinned by sha256; pass the image with {flag} "
                              f"instead")
        stored_name = Path(path_text).name
        if Path(stored_name).stem != pinned or Path(stored_name).suffix not in _STORED_SUFFIXES:
            raise RecipeError(f"the recipe's {name} {_brief(path_text)} is not the pinned stored input ({pinned[:12]}"
                              f"... in the inputs store): a recipe takes input images from the inputs store only; "
                              f"pass that file with {flag} to use it")
        stored = _stored_input(pinned)
        if stored is None:
            raise RecipeError(f"the recipe's {name} (sha256 {pinned[:12]}) is not in the inputs store {inputs_dir()}: "
                              f"it can re-run only where its input images are stored; run the original image once "
                              f"with {flag} to store it")
        changes[name] = str(stored)
    return GenerationRequest(**{**request.to_dict(), **changes}) if changes else request


# One lock per pipeline object: the studio shares cached pipelines between threads (Streamlit
# sessions), and anything that changes pipeline state (adapters, later) must happen under it
# together with the generation that depends on it.
_LOCKS: dict[int, threading.RLock] = {}
_LOCKS_GUARD = threading.Lock()


def pipeline_lock(pipe) -> threading.RLock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(id(pipe), threading.RLock())


def resolve_request(request: GenerationRequest, pipe, recommended: dict | None = None) -> GenerationRequest:
    """Fill in what ``None`` left open: native size, recommended guidance and a random seed."""
    from studio.core.base_models import native_resolution

    native = native_resolution(pipe)
    seed = request.seed
    if seed is None:
        seed = random.SystemRandom().randrange(0, MAX_SEED - request.num_images + 1)
    guidance = request.guidance_scale
    if guidance is None:
        guidance = (recommended or {}).get("guidance_scale", 7.5)
    strength = request.strength
    if request.init_image is not None and strength is None:
        strength = DEFAULT_STRENGTH
    return GenerationRequest(
        **{
            **request.to_dict(),
            "width": request.width or native,
            "height": request.height or native,
            "seed": seed,
            "guidance_scale": guidance,
            "strength": strength,
        }
    )


# ---- input images (img2img, inpainting) ------------------------------------------------------


class _TooManyPixels(Exception):
    """An image claims more pixels than the caller's bound; ``str()`` says how many ("WxH pixels")."""


def _bounded_open(source, max_pixels: int):
    """``Image.open`` refusing more than ``max_pixels`` before a pixel is decoded (raises _TooManyPixels).

    Pillow's own check (``Image.MAX_IMAGE_PIXELS``, 89 M by default) stays as it is: its warning is
    silenced here because every bound this module passes is below it and is checked right after, and its
    error (above twice that) is turned into ours. Nothing global changes beyond this call's warnings.
    """
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(source)
        except Image.DecompressionBombError:
            raise _TooManyPixels(f"more than {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels") from None
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise _TooManyPixels(f"{width}x{height} pixels")
    return im


def _too_many_pixels(label: str, error: _TooManyPixels) -> InvalidRequestError:
    side = math.isqrt(MAX_INPUT_PIXELS)
    return InvalidRequestError(f"{label} claims {error}, more than the {MAX_INPUT_PIXELS:,} ({side}x{side}) an input "
                               f"image may have: use a smaller image")


def _check_input_size(path: Path, label: str) -> None:
    """Refuse an input file over MAX_INPUT_BYTES before a byte of it is read."""
    size = path.stat().st_size
    if size > MAX_INPUT_BYTES:
        raise InvalidRequestError(f"{label} {path} is {size:,} bytes, more than the {MAX_INPUT_BYTES:,} an input "
                                  f"image may have: use a smaller image")


def inputs_dir() -> Path:
    from studio.core.settings import get_settings

    return get_settings().home / "inputs"


def _stored_input(sha256: str) -> Path | None:
    folder = inputs_dir()
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{sha256}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def store_input_image(source) -> Path:
    """Copy an input image (a path, encoded bytes or a PIL image) into ``$LORA_STUDIO_HOME/inputs``,
    named by the sha256 of its bytes, and return that path (what a request's ``init_image`` /
    ``mask_image`` should name: it stays put, so recipes that name it re-run).

    The UI calls this with an upload's bytes; the CLI's files go through it when a request runs.
    """
    import io

    from PIL import UnidentifiedImageError

    from studio.core.errors import InputFileNotFoundError

    suffix = ".png"
    label = f"input image {source}" if isinstance(source, (str, Path)) else "input image"
    if isinstance(source, (str, Path)):
        try:
            path = Path(source).expanduser()
        except RuntimeError:  # "~someone" with no such user
            raise InputFileNotFoundError(f"input image {source} names no user's home folder: give the full "
                                         f"path") from None
        if not path.is_file():
            raise InputFileNotFoundError(f"input image {path} does not exist: pass a PNG, JPEG or WebP file")
        _check_input_size(path, "input image")
        data = path.read_bytes()
        if path.suffix.lower() in IMAGE_SUFFIXES:
            suffix = ".jpg" if path.suffix.lower() == ".jpeg" else path.suffix.lower()
    elif isinstance(source, bytes):
        if len(source) > MAX_INPUT_BYTES:
            raise InvalidRequestError(f"input image is {len(source):,} bytes, more than the {MAX_INPUT_BYTES:,} an "
                                      f"input image may have: use a smaller image")
        data = source
    elif hasattr(source, "save") and hasattr(source, "size"):
        if source.size[0] * source.size[1] > MAX_INPUT_PIXELS:
            raise _too_many_pixels(label, _TooManyPixels(f"{source.size[0]}x{source.size[1]} pixels"))
        buffer = io.BytesIO()
        source.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        raise InvalidRequestError(f"an input image must be a path, bytes or a PIL image, not {type(source).__name__}")
    try:
        with _bounded_open(io.BytesIO(data), MAX_INPUT_PIXELS) as im:
            fmt = im.format
            im.verify()  # a truncated or damaged file fails here, before anything is stored
    except _TooManyPixels as e:
        raise _too_many_pixels(label, e) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        # SyntaxError/ValueError: what some Pillow plugins raise for malformed headers and chunks.
        raise InvalidRequestError(f"{label} is not a readable image ({_one_line(e)}): pass a PNG, JPEG or WebP "
                                  f"file") from None
    if not isinstance(source, (str, Path)):
        suffix = {"JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp"}.get(fmt, ".png")
    sha256 = hashlib.sha256(data).hexdigest()
    existing = _stored_input(sha256)
    if existing is not None:
        return existing
    folder = inputs_dir()
    folder.mkdir(parents=True, exist_ok=True)
    from studio.core.atomic import write_bytes_atomic

    return write_bytes_atomic(folder / f"{sha256}{suffix}", data)  # a reader never sees half an image


def _pin_input(label: str, path_text: str | None, pinned: str | None) -> tuple[str | None, str | None]:
    """(stored path, sha256) of an input image; the stored copy wins when the original moved or changed."""
    from studio.core.errors import InputFileNotFoundError

    if path_text is None:
        return None, None
    path = Path(path_text).expanduser()
    if pinned is not None:
        stored = _stored_input(pinned)
        if stored is not None:
            return str(stored), pinned
        if not path.is_file():
            raise InputFileNotFoundError(
                f"the {label} {path} is gone and no copy with sha256 {pinned[:12]} is in {inputs_dir()}: "
                f"put the original image back at that path")
        _check_input_size(path, f"the {label}")
        actual = file_sha256(path)
        if actual != pinned:
            raise RecipeError(f"the {label} {path} has sha256 {actual[:12]}, the recipe used {pinned[:12]}: "
                              f"the file changed since the image was made")
    stored = store_input_image(path)
    return str(stored), stored.stem


def _load_inputs(request: GenerationRequest):
    """The init image and mask at the request's size (RGB and L), or (None, None) for text-to-image.

    Resized here with PIL (LANCZOS for the picture, NEAREST for the mask so it stays black and white),
    so img2img and inpainting see the same pixels at any size the recipe records.
    """
    from PIL import Image

    if request.init_image is None:
        return None, None
    size = (request.width, request.height)
    init = _decode_input(request.init_image, "the init image", "RGB")
    if init.size != size:
        init = init.resize(size, Image.LANCZOS)
    mask = None
    if request.mask_image is not None:
        mask = _decode_input(request.mask_image, "the mask image", "L")
        if mask.size != size:
            mask = mask.resize(size, Image.NEAREST)
        # Binary: the pipeline binarises at 0.5 too, and the paste-back below must agree with it.
        mask = mask.point(lambda v: 255 if v >= 128 else 0)
        if not mask.getbbox():
            raise InvalidRequestError(f"the mask {request.mask_image} is all black: paint the area to repaint "
                                      f"white")
    return init, mask


def _decode_input(path_text: str, label: str, mode: str):
    """Decode a stored input image in ``mode``: size-checked, then pixel-bounded before decoding (a file
    can be put into the inputs store by hand, so the stored copy is checked again)."""
    from PIL import UnidentifiedImageError

    path = Path(path_text)
    _check_input_size(path, label)
    try:
        with _bounded_open(path, MAX_INPUT_PIXELS) as im:
            return im.convert(mode)
    except _TooManyPixels as e:
        raise _too_many_pixels(f"{label} {path}", e) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InvalidRequestError(f"{label} {path} is not a readable image ({_one_line(e)}): pass a PNG, JPEG or "
                                  f"WebP file") from None


# pipeline -> {task: pipeline from_pipe'd on its components}; weak, so a dropped pipeline frees its weights
_TASK_PIPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def task_pipeline(pipe, task: str):
    """The family's ``task`` pipeline on ``pipe``'s own components (``from_pipe``: no weights copied).

    Adapters live in the shared UNet and text encoder, so the adapter stack set on ``pipe`` applies.
    For SD-1 inpainting with a text-to-image UNet (4 input channels, as the tiny model has), diffusers'
    inpaint pipeline blends the known region's noised latents back in at every step.
    """
    if task == "text2img":
        return pipe
    from studio.core.families import family_for_pipeline_class

    tasks = _TASK_PIPES.setdefault(pipe, {})
    cached = tasks.get(task)
    if cached is not None and cached.unet is pipe.unet and cached.text_encoder is pipe.text_encoder:
        return cached
    family = family_for_pipeline_class(type(pipe).__name__)
    cls = family.pipeline_class(task)
    task_pipe = cls.from_pipe(pipe)
    task_pipe.set_progress_bar_config(disable=True)
    tasks[task] = task_pipe
    return task_pipe


def generate(request: GenerationRequest, progress=None) -> GenerationResult:
    """Run ``request`` on its base model; ``progress(step, total)`` is called after each step."""
    from studio.core.base_models import load_pipeline, model_hash, recommended_settings, resolve

    resolved = resolve(request.base_model)
    pipe = load_pipeline(request.base_model)
    return generate_with_pipeline(
        pipe, request, model_hash=model_hash(resolved), progress=progress, recommended=recommended_settings(resolved)
    )


def generate_with_pipeline(
    pipe, request: GenerationRequest, model_hash: str = "", progress=None, recommended: dict | None = None
) -> GenerationResult:
    """Generate with an already loaded pipeline (training previews use the training components).

    Images are generated one per denoising batch: batch composition changes CPU kernels' summation
    order, and one image at a time is what makes every image bit-identical to its recipe re-run alone.
    """
    request = resolve_request(request, pipe, recommended)
    if request.init_image is not None:
        init_path, init_sha = _pin_input("init image", request.init_image, request.init_image_sha256)
        mask_path, mask_sha = _pin_input("mask image", request.mask_image, request.mask_image_sha256)
        request = GenerationRequest(**{**request.to_dict(), "init_image": init_path, "init_image_sha256": init_sha,
                                       "mask_image": mask_path, "mask_image_sha256": mask_sha})
    init, mask = _load_inputs(request)  # before the lock: a bad image must not touch the pipeline
    t0 = time.perf_counter()
    # Schedulers keep per-run state (step index, model outputs): each image gets a fresh one, and
    # the pipeline's own scheduler is put back afterwards, all under the pipeline's lock.
    stack, resolved = _resolve_stack(request, pipe)
    if resolved:
        # Pin every adapter in the recipe: the exact version and its tensor hash.
        request = GenerationRequest(**{**request.to_dict(), "adapters": [
            {**spec.to_dict(), "ref": r.ref, "name": r.name, "version": r.version, "tensor_sha256": r.tensor_sha256}
            for spec, r in zip(stack, resolved)
        ]})
    with pipeline_lock(pipe):
        _apply_stack(pipe, stack, resolved)
        original_scheduler = pipe.scheduler
        try:
            outputs = _run(pipe, request, original_scheduler.config, model_hash, progress, init, mask)
        finally:
            pipe.scheduler = original_scheduler
    return GenerationResult(request=request, outputs=outputs, seconds=time.perf_counter() - t0)


def _pipeline_family(pipe) -> str | None:
    from studio.core.families import family_for_pipeline_class

    try:
        return family_for_pipeline_class(type(pipe).__name__).name
    except StudioError:
        return None  # a pipeline class no family lists: nothing to compare adapters against


def _resolve_stack(request: GenerationRequest, pipe):
    """Validate and resolve the request's adapter stack before the pipeline is touched."""
    from adapters.compose import AdapterSpec, check_family, resolve_adapter

    stack = [AdapterSpec.from_dict(a) for a in request.adapters]
    resolved = [resolve_adapter(spec.ref) for spec in stack]
    family = _pipeline_family(pipe) if resolved else None
    if family is not None:
        check_family(resolved, family, f"the base {request.base_model!r}")
    for entry, r in zip(request.adapters, resolved):
        pinned = entry.get("tensor_sha256")
        if pinned and pinned != r.tensor_sha256:
            raise RecipeError(
                f"adapter {entry['ref']} now has tensor hash {r.tensor_sha256[:12]}, the recipe used {pinned[:12]}: "
                f"the file changed since the image was made"
            )
    return stack, resolved


def _apply_stack(pipe, stack, resolved) -> None:
    """Make the stack active on ``pipe`` (an empty stack deactivates what an earlier request left)."""
    from adapters.compose import engine_for, has_engine

    if stack or has_engine(pipe):
        engine_for(pipe).apply(stack, resolved)


def _run(pipe, request: GenerationRequest, scheduler_config, model_hash: str, progress, init=None,
         mask=None) -> list[GeneratedImage]:
    import torch

    runner = task_pipeline(pipe, request.task)
    extra: dict = {}
    if request.task == "img2img":
        extra = {"image": init, "strength": request.strength}  # sized by the image itself
    elif request.task == "inpaint":
        extra = {"image": init, "mask_image": mask, "strength": request.strength,
                 "width": request.width, "height": request.height}
    else:
        extra = {"width": request.width, "height": request.height}
    # img2img runs int(steps * strength) of the steps: progress counts those.
    steps_run = request.num_inference_steps if init is None else max(1, int(request.num_inference_steps
                                                                            * request.strength))
    outputs: list[GeneratedImage] = []
    total = request.num_images * steps_run
    for i in range(request.num_images):
        seed = request.seed + i
        pipe.scheduler = make_scheduler(request.scheduler, scheduler_config)
        runner.scheduler = pipe.scheduler
        generator = torch.Generator(device="cpu").manual_seed(seed)

        def on_step(_pipe, step, _t, kwargs, _i=i):
            if progress is not None:
                progress(min(_i * steps_run + step + 1, total), total)
            return kwargs

        image = runner(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            generator=generator,
            num_images_per_prompt=1,
            callback_on_step_end=on_step,
            **extra,
        ).images[0]
        if mask is not None:
            # Paste the kept region back (A1111 does too): the VAE round trip alters every pixel a little,
            # and "keep" should mean the original pixels.
            from PIL import Image

            image = Image.composite(image, init, mask)
        single = GenerationRequest(**{**request.to_dict(), "seed": seed, "num_images": 1})
        outputs.append(
            GeneratedImage(
                image=image, request=single, model_hash=model_hash, parameters=a1111_parameters(single, model_hash)
            )
        )
    return outputs
