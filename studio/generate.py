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
  and refuses a file that changed.

Adapter stacks (LoRA composition) extend the request in ``adapters.compose``; this module does not
load adapters.
"""

from __future__ import annotations

import json
import math
import random
import re
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from studio.errors import InvalidRequestError, RecipeError, StudioError

RECIPE_KEY = "lora_studio"
RECIPE_VERSION = 1
MAX_SEED = 2**32 - 1
MAX_SIDE = 4096
MAX_IMAGES = 64
_PINNED_KEYS = ("name", "version", "tensor_sha256")  # what a recipe records of each resolved adapter
DEFAULT_STRENGTH = 0.75  # A1111's img2img "denoising strength" default
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

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
            spec = entry if isinstance(entry, AdapterSpec) else AdapterSpec.from_dict(entry)
            pinned = {k: entry[k] for k in _PINNED_KEYS if isinstance(entry, dict) and k in entry}
            normalised.append({**spec.to_dict(), **pinned})
        self.adapters = normalised
        if not isinstance(self.prompt, str):
            raise InvalidRequestError("prompt must be text")
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
                raise InvalidRequestError(
                    f"{name} must be a multiple of 8 between 8 and {MAX_SIDE}, got {value!r}: "
                    f"try {max(8, min(MAX_SIDE, round((value if isinstance(value, int) else 0) / 8) * 8))}"
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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"recipe has unknown fields {unknown}: it was written by a newer studio")
        try:
            return cls(**data)
        except TypeError as e:
            raise RecipeError(f"recipe is incomplete: {e}") from None


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
        from studio.atomic import write_atomic

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
    """The request stored in a PNG written by the studio (``lora_studio`` chunk)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist: pass a PNG the studio wrote")
    try:
        with Image.open(path) as im:
            fmt = im.format
            text = dict(getattr(im, "text", {}) or {})
    except (UnidentifiedImageError, OSError) as e:
        raise RecipeError(f"{path} is not a readable image ({e}): pass a PNG the studio wrote") from None
    if fmt != "PNG":
        raise RecipeError(f"{path} is a {fmt} image, not a PNG: recipes are stored in PNG files only")
    if RECIPE_KEY not in text:
        hint = " (it has A1111 parameters, which do not pin every setting)" if "parameters" in text else ""
        raise RecipeError(f"{path} carries no LoRA Studio recipe{hint}: pass a PNG the studio wrote")
    try:
        payload = json.loads(text[RECIPE_KEY])
        request = payload["request"]
    except (ValueError, KeyError, TypeError) as e:
        raise RecipeError(f"the recipe in {path} is damaged ({e})") from None
    if not isinstance(request, dict):
        raise RecipeError(f"the recipe in {path} is damaged (request is not an object)")
    return GenerationRequest.from_dict(request)


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
    from studio.base_models import native_resolution

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


def _file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def inputs_dir() -> Path:
    from studio.settings import get_settings

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
    import hashlib
    import io

    from PIL import Image, UnidentifiedImageError

    from studio.errors import InputFileNotFoundError

    suffix = ".png"
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise InputFileNotFoundError(f"input image {path} does not exist: pass a PNG, JPEG or WebP file")
        data = path.read_bytes()
        if path.suffix.lower() in IMAGE_SUFFIXES:
            suffix = ".jpg" if path.suffix.lower() == ".jpeg" else path.suffix.lower()
    elif isinstance(source, bytes):
        data = source
    elif hasattr(source, "save"):
        buffer = io.BytesIO()
        source.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        raise InvalidRequestError(f"an input image must be a path, bytes or a PIL image, not {type(source).__name__}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.verify()  # a truncated or damaged file fails here, before anything is stored
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise InvalidRequestError(f"input image {source if isinstance(source, (str, Path)) else ''} is not a "
                                  f"readable image ({e}): pass a PNG, JPEG or WebP file") from None
    if not isinstance(source, (str, Path)):
        suffix = {"JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp"}.get(fmt, ".png")
    sha256 = hashlib.sha256(data).hexdigest()
    existing = _stored_input(sha256)
    if existing is not None:
        return existing
    folder = inputs_dir()
    folder.mkdir(parents=True, exist_ok=True)
    from studio.atomic import write_bytes_atomic

    return write_bytes_atomic(folder / f"{sha256}{suffix}", data)  # a reader never sees half an image


def _pin_input(label: str, path_text: str | None, pinned: str | None) -> tuple[str | None, str | None]:
    """(stored path, sha256) of an input image; the stored copy wins when the original moved or changed."""
    from studio.errors import InputFileNotFoundError

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
        actual = _file_sha256(path)
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
    with Image.open(request.init_image) as im:
        init = im.convert("RGB")
    if init.size != size:
        init = init.resize(size, Image.LANCZOS)
    mask = None
    if request.mask_image is not None:
        with Image.open(request.mask_image) as im:
            mask = im.convert("L")
        if mask.size != size:
            mask = mask.resize(size, Image.NEAREST)
        # Binary: the pipeline binarises at 0.5 too, and the paste-back below must agree with it.
        mask = mask.point(lambda v: 255 if v >= 128 else 0)
        if not mask.getbbox():
            raise InvalidRequestError(f"the mask {request.mask_image} is all black: paint the area to repaint "
                                      f"white")
    return init, mask


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
    from studio.families import family_for_pipeline_class

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
    from studio.base_models import load_pipeline, model_hash, recommended_settings, resolve

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
    from studio.families import family_for_pipeline_class

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
