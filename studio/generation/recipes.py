"""Recipes: what a generated PNG carries to re-make itself, written and read back.

Every PNG carries its recipe twice: an A1111-style ``parameters`` text chunk (:func:`a1111_parameters`,
read by A1111, Civitai and most image browsers) and a ``lora_studio`` JSON chunk with the full request
(:func:`recipe_payload`), which ``--recipe`` re-runs bit for bit on the same machine.

A recipe read from a PNG is untrusted input: :func:`read_recipe` bounds the chunk's size and nesting
before parsing it, type-checks every field, asks for one image (the studio writes one per PNG), and
takes input images from the inputs store only (by their pinned sha256, never another path).
:func:`recipe_cost` and :func:`check_recipe_cost` make a costly recipe ask for a confirmation.

Does not hold: the request itself (``studio.generation.requests``), the PNG files a run saves
(``studio.generation.results``), running a recipe (``studio.generation.run``).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

from PIL import UnidentifiedImageError

from studio.core.errors import RecipeError, RecipeTooCostlyError, StudioError
from studio.core.families import Family
from studio.core.filesafety import json_nesting_within
from studio.generation.inputs import STORED_SUFFIXES, TooManyPixels, bounded_open, inputs_dir, stored_input
from studio.generation.prompt_tags import expand_prompt_tags, parse_tags, stack_tags
from studio.generation.requests import MAX_SIDE, SCHEDULERS, GenerationRequest, brief, one_line

RECIPE_KEY = "lora_studio"
RECIPE_VERSION = 1
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
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def recipe_payload(request: GenerationRequest, model_hash: str = "", family: Family | None = None,
                   dtypes: dict[str, str] | None = None) -> dict:
    """The ``lora_studio`` chunk's JSON: the request (adapter strengths spelled as ``family`` names its
    components; its ``precision`` as asked), each component's dtype as it ran, the base model's hash
    and the library versions that made the image."""
    import diffusers  # heavy (torch): recipes are written after a run, which has loaded both already
    import torch

    return {
        "version": RECIPE_VERSION,
        "request": request.to_dict(family),
        "model_hash": model_hash,
        "dtypes": dict(dtypes or {}),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }


def a1111_parameters(request: GenerationRequest, model_hash: str = "") -> str:
    """The ``parameters`` text A1111 writes: prompt, ``Negative prompt:`` line, then settings."""
    # A1111 writes the prompt as typed, LoRA tags included: an image dragged into it keeps its stack.
    lines = [" ".join(filter(None, (request.prompt, stack_tags(request.adapters))))]
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
        hashes = ", ".join(f"{a.name or a.ref}: {(a.tensor_sha256 or '')[:12]}" for a in request.adapters)
        settings.append(f'Lora hashes: "{hashes}"')
    lines.append(", ".join(settings))
    return "\n".join(lines)


def _a1111_value(value: str) -> str:
    # A1111 quotes values that contain its separators.
    return json.dumps(value) if re.search(r"[,:\n\"]", value) else value


def recipe_cost(request: GenerationRequest) -> int:
    """What a request costs, in pixel-steps: denoising steps x width x height x images.

    Denoising dominates a request's time and grows with each factor, so this orders requests by the
    work they ask for (a width/height of None counts as 1024, the largest native size). A recipe's
    image counts the whole batch its replay rebuilds (``batch_size`` images). Strength is ignored:
    img2img runs fewer steps, and the cost stays an upper bound. Compare with :data:`MAX_RECIPE_COST`.
    """
    width = request.width or _COST_NATIVE_SIDE
    height = request.height or _COST_NATIVE_SIDE
    return request.num_inference_steps * width * height * _denoised_images(request)


def _denoised_images(request: GenerationRequest) -> int:
    return request.batch_size if request.batch_index is not None else request.num_images


def check_recipe_cost(request: GenerationRequest, *, confirmed: bool) -> None:
    """Refuse a request whose :func:`recipe_cost` exceeds :data:`MAX_RECIPE_COST`, unless ``confirmed``
    (``--yes`` on the command line, a confirmation in the UI). Raises :class:`RecipeTooCostlyError`."""
    cost = recipe_cost(request)
    if cost > MAX_RECIPE_COST and not confirmed:
        raise RecipeTooCostlyError(
            f"this recipe asks for {request.num_inference_steps} steps at {request.width or 'native'}x"
            f"{request.height or 'native'} x {_denoised_images(request)} image(s)"
            f"{' (the batch its image was made in)' if request.batch_index is not None else ''}, "
            f"{cost / 1e6:,.0f} M pixel-steps, more "
            f"than the {MAX_RECIPE_COST / 1e6:,.0f} M a normal recipe needs (150 steps at 2048x2048): pass --yes "
            f"to run it anyway")


def read_recipe(path: str | Path, *, base_model: str | None = None, notes: list[str] | None = None
                ) -> GenerationRequest:
    """The request stored in a PNG: the studio's own (``lora_studio`` chunk), or one made by A1111 or
    downloaded from Civitai (only a ``parameters`` text; see :func:`request_from_a1111`, which runs on
    ``base_model``, default the embedded tiny model, and appends what it could not map to ``notes``).

    The PNG may come from anywhere, so nothing in it is trusted: the claimed size is checked before
    Pillow sees the file, only the chunks before the pixels are read (the studio writes its recipe
    there), the chunk's size and nesting are bounded before it is parsed, every field is type-checked,
    and the recipe must ask for one image and take its input images from the inputs store. The
    request's cost is left to :func:`check_recipe_cost`, which needs the user's confirmation.
    """
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
        with bounded_open(path, MAX_RECIPE_PIXELS) as im:
            fmt = im.format
            # ``info`` holds the text chunks before the pixel data, where the studio writes; ``im.text``
            # would decode the whole image to find chunks after it.
            text = {k: v for k, v in im.info.items() if k in (RECIPE_KEY, "parameters") and isinstance(v, str)}
    except TooManyPixels as e:
        raise RecipeError(f"{path} claims {e}, more than the {MAX_SIDE}x{MAX_SIDE} the studio ever writes: it is "
                          f"not a PNG the studio wrote") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        # ValueError: Pillow's own bound on text chunks ("Too much memory used in text chunks").
        raise RecipeError(f"{path} is not a readable image ({one_line(e)}): pass a PNG the studio wrote") from None
    if fmt != "PNG":
        raise RecipeError(f"{path} is a {fmt} image, not a PNG: recipes are stored in PNG files only")
    if RECIPE_KEY not in text:
        if "parameters" in text:
            return request_from_a1111(text["parameters"], base_model=base_model, notes=notes, source=path)
        raise RecipeError(f"{path} carries no recipe (neither the studio's nor A1111's parameters): pass a PNG "
                          f"the studio, A1111 or Civitai wrote")
    chunk = text[RECIPE_KEY]
    if len(chunk) > MAX_RECIPE_CHARS:
        raise RecipeError(f"the recipe in {path} is too large ({len(chunk):,} characters; a recipe is a few "
                          f"kilobytes, at most {MAX_RECIPE_CHARS:,}): it is not a recipe the studio wrote")
    if not json_nesting_within(chunk, RECIPE_DEPTH):
        raise RecipeError(f"the recipe in {path} is damaged (its JSON nests deeper than {RECIPE_DEPTH} levels; a "
                          f"recipe has 8 at most)")
    try:
        payload = json.loads(chunk, parse_constant=_refuse_json_constant)
        request = payload["request"]
    except (ValueError, KeyError, TypeError) as e:
        raise RecipeError(f"the recipe in {path} is damaged ({one_line(e)})") from None
    if not isinstance(request, dict):
        raise RecipeError(f"the recipe in {path} is damaged (request is not an object)")
    request = GenerationRequest.from_dict(request)
    if request.num_images != 1:
        raise RecipeError(f"the recipe in {path} asks for num_images {request.num_images}, but the studio writes "
                          f"a recipe for each image (num_images 1): it was not written by the studio")
    return _pin_recipe_inputs(request, path)


def _refuse_json_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


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
            raise RecipeError(f"the recipe's {name} {brief(path_text)} has no {name}_sha256: a recipe takes its "
                              f"input images from the inputs store, pinned by sha256; pass the image with {flag} "
                              f"instead")
        stored_name = Path(path_text).name
        if Path(stored_name).stem != pinned or Path(stored_name).suffix not in STORED_SUFFIXES:
            raise RecipeError(f"the recipe's {name} {brief(path_text)} is not the pinned stored input ({pinned[:12]}"
                              f"... in the inputs store): a recipe takes input images from the inputs store only; "
                              f"pass that file with {flag} to use it")
        stored = stored_input(pinned)
        if stored is None:
            raise RecipeError(f"the recipe's {name} (sha256 {pinned[:12]}) is not in the inputs store {inputs_dir()}: "
                              f"it can re-run only where its input images are stored; run the original image once "
                              f"with {flag} to store it")
        changes[name] = str(stored)
    return replace(request, **changes) if changes else request


# A1111's infotext settings line: "Key: value, Key: "quoted, value", ..." (its parse_generation_parameters).
_A1111_SETTING = re.compile(r'\s*([\w][\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_A1111_SIZE = re.compile(r"(\d+)x(\d+)")
# Settings that do not change the numbers the studio computes, or that it records elsewhere.
_A1111_SILENT = {"Model hash", "Lora hashes", "Version", "TI hashes"}


def _a1111_fields(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, settings) of an A1111 ``parameters`` text."""
    lines = text.strip().split("\n")
    settings: dict[str, str] = {}
    if lines and len(_A1111_SETTING.findall(lines[-1])) >= 3:
        for key, value in _A1111_SETTING.findall(lines.pop()):
            value = value.strip()
            if value.startswith('"') and value.endswith('"'):
                try:
                    value = json.loads(value)
                except ValueError:
                    value = value[1:-1]
            settings[key.strip()] = value
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt).strip(), "\n".join(negative).strip(), settings


def request_from_a1111(text: str, *, base_model: str | None = None, notes: list[str] | None = None,
                       source: str | Path = "the image") -> GenerationRequest:
    """A request from an A1111 ``parameters`` text (A1111's PNGs, Civitai downloads).

    Prompt, negative prompt, steps, sampler (with its ``Schedule type``), CFG scale, seed and size map
    to the request; the prompt's ``<lora:NAME:W>`` tags are resolved in the registry, by name or by the
    hash ``Lora hashes`` gives that name, and join the stack. What has no counterpart (the checkpoint
    by name, hires fix, clip skip, a sampler the studio lacks, a hash with no tag) is appended to
    ``notes`` as one line each; an adapter that cannot be found is an error (the image cannot be re-made
    without it). The text is untrusted: bounded like a recipe chunk, every number checked.
    """
    if len(text) > MAX_RECIPE_CHARS:
        raise RecipeError(f"the A1111 parameters in {source} are too large ({len(text):,} characters)")
    notes = notes if notes is not None else []
    prompt, negative, settings = _a1111_fields(text)
    if not prompt:
        raise RecipeError(f"the A1111 parameters in {source} have no prompt")
    fields: dict = {"prompt": prompt, "negative_prompt": negative, "base_model": base_model or "tiny"}

    def number(key: str, kind):
        try:
            return kind(settings[key])
        except ValueError:
            raise RecipeError(f"the A1111 parameters in {source} say {key}: {settings[key]!r}, not a number") from None

    for key, name, kind in (("Steps", "num_inference_steps", int), ("CFG scale", "guidance_scale", float),
                            ("Seed", "seed", int)):
        if key in settings:
            fields[name] = number(key, kind)
    if "Size" in settings:
        size = _A1111_SIZE.fullmatch(settings["Size"].strip())
        if size is None:
            raise RecipeError(f"the A1111 parameters in {source} say Size: {settings['Size']!r}; expected WxH")
        fields["width"], fields["height"] = int(size.group(1)), int(size.group(2))
    if "Sampler" in settings:
        sampler = settings["Sampler"].strip()
        schedule = settings.get("Schedule type", "").strip()
        name = f"{sampler} {schedule}" if schedule and schedule != "Automatic" else sampler
        if name in SCHEDULERS:
            fields["scheduler"] = name
        elif sampler in SCHEDULERS:
            fields["scheduler"] = sampler
            notes.append(f"Schedule type {schedule!r}: not offered with {sampler}; ran {sampler}'s default schedule")
        else:
            notes.append(f"Sampler {name!r}: the studio has no such sampler; ran Euler (it offers "
                         f"{', '.join(SCHEDULERS)})")
    if "Model" in settings or "Model hash" in settings:
        model = settings.get("Model") or settings.get("Model hash")
        notes.append(f"Model {model!r}: A1111 checkpoints are not looked up; ran on {fields['base_model']!r} "
                     f"(pass --base to choose)")
    mapped = {"Steps", "CFG scale", "Seed", "Size", "Sampler", "Schedule type", "Model"}
    for key in settings:
        if key not in mapped and key not in _A1111_SILENT:
            notes.append(f"{key}: {settings[key]!r} has no counterpart in the studio; left out")
    short_hashes = {}
    for entry in settings.get("Lora hashes", "").split(","):
        name, colon, digest = entry.rpartition(":")
        if colon and name.strip():
            short_hashes[name.strip()] = digest.strip()
    try:
        request = GenerationRequest(**fields)
    except StudioError as e:
        raise RecipeError(f"the A1111 parameters in {source} do not make a valid request: {e}") from None
    request = expand_prompt_tags(request, short_hashes=short_hashes)
    used = {tag.name for tag in parse_tags(prompt)[1]}
    for name in short_hashes:
        if name not in used:
            notes.append(f"Lora hashes names {name!r}, but the prompt has no <lora:{name}:...> tag giving its "
                         f"weight; not applied")
    return request
