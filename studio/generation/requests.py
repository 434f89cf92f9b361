"""What a generation asks for: :class:`GenerationRequest`, its validation, and the samplers it may name.

A request is everything that determines an image besides the base weights and the machine: prompts,
sampler and its settings, size, seed, the adapter stack (:class:`adapters.compose.AdapterSpec` entries)
and, for img2img and inpainting, the input images pinned by their sha256. It is built and checked
here, whether it comes from the CLI, the UI or a recipe's JSON (:meth:`GenerationRequest.from_dict`
type-checks every field first, so a damaged recipe names the field at fault).

Does not hold: running a request (``studio.generation.run``), reading and writing recipes
(``studio.generation.recipes``), the input-image store (``studio.generation.inputs``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from adapters.compose import AdapterSpec
from studio.core.base_models import PRECISIONS
from studio.core.errors import InvalidRequestError, RecipeError
from studio.core.families import Family

MAX_SEED = 2**32 - 1
MAX_SIDE = 4096
MAX_IMAGES = 64
# The most images denoised together, and so the largest batch a recipe's replay must rebuild: 16 images
# reach batched speed on CPU at the sizes it can run (see benchmarks/generate_speed.py), and a replay
# of an image of a batch costs the whole batch.
MAX_BATCH = 16
DEFAULT_STRENGTH = 0.75  # A1111's img2img "denoising strength" default

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


def make_scheduler(name: str, base_config, family: Family | None = None):
    """A fresh scheduler called ``name`` built from a pipeline's scheduler config; a family that samples
    with its own schedulers (flow matching) has its own table of them."""
    import diffusers  # heavy (torch): only when a request runs, never when the CLI starts

    table = family.samplers if family is not None and family.samplers is not None else SCHEDULERS
    try:
        class_name, extra = table[name]
    except KeyError:
        what = f"{family.display_name} samples with" if table is not SCHEDULERS else "choose one of"
        raise InvalidRequestError(f"unknown scheduler {name!r} here: {what} {', '.join(repr(n) for n in table)}"
                                  ) from None
    return getattr(diffusers, class_name).from_config(base_config, **extra)


def brief(value, limit: int = 60) -> str:
    """``repr`` of a value for a one-line message, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def one_line(error: BaseException) -> str:
    """An exception's text on one line of at most 200 characters (messages quote library errors)."""
    return " ".join(str(error).split())[:200]


def _adapter_entry(entry) -> AdapterSpec:
    """A stack entry as a request carries it. A dict is an entry in a recipe's JSON form: it is parsed
    here, once, by :meth:`AdapterSpec.from_dict`; everything downstream sees the spec."""
    if isinstance(entry, AdapterSpec):
        return entry
    if isinstance(entry, dict):
        return AdapterSpec.from_dict(entry)
    raise InvalidRequestError(f"an adapter entry must be an AdapterSpec or an object like "
                              f'{{"ref": "name@1", "weight": 0.8}}, got {brief(entry)}')


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
    adapters: list[AdapterSpec] = field(
        default_factory=list,
        metadata={"help": "adapter stack: AdapterSpec entries (ref, weight, optional denoiser and text-encoder "
                          "strengths, per-block weights); a recipe's dict entries are parsed into them"},
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
    precision: str = field(
        default="auto", metadata={"help": "the weights' dtype: auto (float32 on CPU, bfloat16 or float16 on a "
                                          "GPU), float32, float16 or bfloat16"}
    )
    batch_size: int | None = field(
        default=None,
        metadata={"help": f"images denoised together, at most {MAX_BATCH}; default: as many as free memory holds. "
                          f"A recipe records the batch its image was made in"},
    )
    batch_index: int | None = field(
        default=None,
        metadata={"help": "a recipe's image: its row in the batch that made it (that batch, seeds seed - "
                          "batch_index onwards, is rebuilt to re-make it bit for bit)"},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.adapters, (list, tuple)):
            raise InvalidRequestError("adapters must be a list of adapter entries, each a reference and a weight")
        self.adapters = [_adapter_entry(entry) for entry in self.adapters]
        if self.precision not in PRECISIONS:
            raise InvalidRequestError(f"precision must be one of {', '.join(PRECISIONS)}, got {brief(self.precision)}")
        for name in ("prompt", "negative_prompt", "scheduler", "base_model"):
            # A list or number here fails deep inside diffusers or the model resolver, far from its cause.
            if not isinstance(getattr(self, name), str):
                raise InvalidRequestError(f"{name} must be text, got {brief(getattr(self, name))}")
        for name in ("num_inference_steps", "num_images", "width", "height", "seed", "batch_size", "batch_index"):
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
                    f"{name} must be a multiple of 8 between 8 and {MAX_SIDE}, got {brief(value)}: "
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
        self._check_batch()
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
                    raise InvalidRequestError(f"{name} {brief(value)} starts with ~ but names no user's home "
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

    def _check_batch(self) -> None:
        if self.batch_size is not None and (not isinstance(self.batch_size, int)
                                            or not 1 <= self.batch_size <= MAX_BATCH):
            raise InvalidRequestError(f"batch size must be between 1 and {MAX_BATCH}, got {brief(self.batch_size)}")
        if self.batch_index is None:
            return
        size = self.batch_size
        if not isinstance(self.batch_index, int) or size is None or not 0 <= self.batch_index < size:
            raise InvalidRequestError(f"batch index must be a row of the batch (0 to batch size - 1, with a batch "
                                      f"size), got {brief(self.batch_index)} of {brief(self.batch_size)}")
        if self.num_images != 1:
            raise InvalidRequestError("a batch index names one image of a recipe's batch: it needs num_images 1")

    @property
    def batch_seeds(self) -> list[int] | None:
        """The seeds of the batch a recipe's replay rebuilds (``None`` without a batch index): its request's
        own neighbours, ``seed - batch_index`` onwards, which are exactly the original batch when the image's
        request filled it alone. A row's numbers depend on the batch's size and not on the other rows, so
        a batch the generation queue shared between requests replays with these too; they wrap around
        0 and ``MAX_SEED`` where that image sat at a row past its own seed."""
        if self.batch_index is None or self.seed is None:
            return None
        first = self.seed - self.batch_index
        return [(first + k) % (MAX_SEED + 1) for k in range(self.batch_size)]

    @property
    def task(self) -> str:
        """``text2img``, ``img2img`` or ``inpaint`` (the family's pipeline for it runs the request)."""
        if self.mask_image is not None:
            return "inpaint"
        return "img2img" if self.init_image is not None else "text2img"

    def to_dict(self, family: Family | None = None) -> dict:
        """The request as a recipe stores it (JSON types only). ``family`` is the base model's: it spells
        the adapters' per-role strengths (see :meth:`AdapterSpec.to_dict`)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["adapters"] = [entry.to_dict(family) for entry in self.adapters]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> GenerationRequest:
        """A request from a recipe's JSON: every field type-checked (a :class:`RecipeError` names the
        field), then the request's own validation (its errors become RecipeErrors too)."""
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe's request must be an object, got {brief(data)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise RecipeError(f"recipe has unknown fields {brief(unknown)}: it was written by a newer studio")
        if "prompt" not in data:
            raise RecipeError("recipe is incomplete: it has no prompt")
        for name, value in data.items():
            _check_recipe_field(name, value)
        stack = []
        for i, entry in enumerate(data.get("adapters", ()), 1):
            try:
                stack.append(AdapterSpec.from_dict(entry))
            except InvalidRequestError as e:
                raise RecipeError(f"recipe field 'adapters' entry {i}: {e}: the recipe is damaged") from None
        try:
            return cls(**{**data, "adapters": stack})
        except InvalidRequestError as e:
            raise RecipeError(f"the recipe's request is not valid: {e}") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Recipe field -> (accepts the value, what it must be). None is accepted where the field's default is None.
# An adapter entry's own fields are AdapterSpec.from_dict's to check.
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
    "precision": (lambda v: isinstance(v, str), f"one of {', '.join(PRECISIONS)}"),
    "batch_size": (lambda v: v is None or _is_whole(v), "a whole number or null"),
    "batch_index": (lambda v: v is None or _is_whole(v), "a whole number or null"),
}


def _check_recipe_field(name: str, value) -> None:
    accepts, what = _RECIPE_FIELDS[name]
    if not accepts(value):
        raise RecipeError(f"recipe field {name!r} must be {what}, got {brief(value)}: the recipe is damaged")
