"""Running a request: the one generation path the CLI, the UI, training previews and grids share.

- Image ``i`` of a request uses seed ``seed + i`` with its own ``torch.Generator``, and images are made
  one per denoising batch, so each image can be re-made alone from its recipe, bit for bit.
- Schedulers are chosen by their A1111 sampler names, built fresh for every image from the pipeline's
  own scheduler config, so requests never share scheduler state.
- The adapter stack is resolved and checked against the base model's family before the pipeline is
  touched, then applied by ``adapters.compose`` under the pipeline's lock; the recipe pins each
  adapter's exact version and tensor hash.
- img2img (``init_image`` + ``strength``) and inpainting (``init_image`` + ``mask_image``) run on the
  same components as text-to-image (``from_pipe``: no second copy of the weights), so the adapter
  stack applies to them too; their input images are pinned by hash (``studio.generation.inputs``).

Does not hold: the request and its validation (``studio.generation.requests``), recipes
(``studio.generation.recipes``), loading adapters (``adapters.compose``).
"""

from __future__ import annotations

import inspect
import random
import threading
import time
import weakref
from dataclasses import replace

from PIL import Image

from adapters.compose import AdapterSpec, ResolvedAdapter, check_family, engine_for, has_engine, resolve_adapter
from studio.core.base_models import (
    load_pipeline,
    model_hash,
    native_resolution,
    pipeline_dtypes,
    recommended_settings,
    resolve,
)
from studio.core.errors import RecipeError, StudioError
from studio.core.families import Family, family_of_pipeline
from studio.generation.inputs import load_inputs, pin_input
from studio.generation.prompt_tags import expand_prompt_tags
from studio.generation.recipes import a1111_parameters
from studio.generation.requests import DEFAULT_STRENGTH, MAX_SEED, GenerationRequest, make_scheduler
from studio.generation.results import GeneratedImage, GenerationResult

# One lock per pipeline object: the studio shares cached pipelines between threads (Streamlit
# sessions), and anything that changes pipeline state (the adapter stack) must happen under it
# together with the generation that depends on it.
_LOCKS: dict[int, threading.RLock] = {}
_LOCKS_GUARD = threading.Lock()

# pipeline -> {task: pipeline from_pipe'd on its components}; weak, so a dropped pipeline frees its weights
_TASK_PIPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def pipeline_lock(pipe) -> threading.RLock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(id(pipe), threading.RLock())


def generate(request: GenerationRequest, progress=None) -> GenerationResult:
    """Run ``request`` on its base model; ``progress(step, total)`` is called after each step."""
    resolved = resolve(request.base_model)
    pipe = load_pipeline(request.base_model, request.precision)
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
    request = resolve_request(expand_prompt_tags(request), pipe, recommended)
    if request.init_image is not None:
        init_path, init_sha = pin_input("init image", request.init_image, request.init_image_sha256)
        mask_path, mask_sha = pin_input("mask image", request.mask_image, request.mask_image_sha256)
        request = replace(request, init_image=init_path, init_image_sha256=init_sha, mask_image=mask_path,
                          mask_image_sha256=mask_sha)
    init, mask = load_inputs(request)  # before the lock: a bad image must not touch the pipeline
    t0 = time.perf_counter()
    family = _pipeline_family(pipe)
    resolved = _resolve_stack(request, family)
    if resolved:
        # Pin every adapter in the recipe: the exact version and its tensor hash.
        request = replace(request, adapters=[
            replace(spec, ref=r.ref, name=r.name, version=r.version, tensor_sha256=r.tensor_sha256)
            for spec, r in zip(request.adapters, resolved)
        ])
    # Schedulers keep per-run state (step index, model outputs): each image gets a fresh one, and
    # the pipeline's own scheduler is put back afterwards, all under the pipeline's lock.
    with pipeline_lock(pipe):
        _apply_stack(pipe, request.adapters, resolved)
        original_scheduler = pipe.scheduler
        try:
            outputs = _run(pipe, request, original_scheduler.config, model_hash, progress, init, mask, family,
                           recommended or {})
        finally:
            pipe.scheduler = original_scheduler
    return GenerationResult(request=request, outputs=outputs, seconds=time.perf_counter() - t0)


def resolve_request(request: GenerationRequest, pipe, recommended: dict | None = None) -> GenerationRequest:
    """Fill in what ``None`` left open: native size, recommended guidance and a random seed."""
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
    return replace(request, width=request.width or native, height=request.height or native, seed=seed,
                   guidance_scale=guidance, strength=strength)


def task_pipeline(pipe, task: str):
    """The family's ``task`` pipeline on ``pipe``'s own components (``from_pipe``: no weights copied).

    Adapters live in the shared denoiser and text encoders, so the adapter stack set on ``pipe`` applies.
    For SD-1 inpainting with a text-to-image UNet (4 input channels, as the tiny model has), diffusers'
    inpaint pipeline blends the known region's noised latents back in at every step.
    """
    if task == "text2img":
        return pipe
    family = family_of_pipeline(pipe)
    tasks = _TASK_PIPES.setdefault(pipe, {})
    cached = tasks.get(task)
    # A cached task pipeline is stale once a component that carries adapters was swapped on ``pipe``.
    if cached is not None and all(getattr(cached, name, None) is getattr(pipe, name, None)
                                  for name in (family.denoiser, *family.text_encoder_components)):
        return cached
    task_pipe = family.pipeline_class(task).from_pipe(pipe)
    if hasattr(pipe, "default_sample_size"):
        task_pipe.default_sample_size = pipe.default_sample_size  # a model's own size (see base_models)
    task_pipe.set_progress_bar_config(disable=True)
    tasks[task] = task_pipe
    return task_pipe


def _pipeline_family(pipe) -> Family | None:
    try:
        return family_of_pipeline(pipe)
    except StudioError:
        return None  # a pipeline class no family lists: nothing to compare adapters against


def _resolve_stack(request: GenerationRequest, family: Family | None) -> list[ResolvedAdapter]:
    """Resolve the request's adapter stack and check it (family, pinned hashes) before the pipeline is touched."""
    resolved = [resolve_adapter(spec.ref) for spec in request.adapters]
    if family is not None and resolved:
        check_family(resolved, family.name, f"the base {request.base_model!r}")
    for spec, r in zip(request.adapters, resolved):
        if spec.tensor_sha256 and spec.tensor_sha256 != r.tensor_sha256:
            raise RecipeError(
                f"adapter {spec.ref} now has tensor hash {r.tensor_sha256[:12]}, the recipe used "
                f"{spec.tensor_sha256[:12]}: the file changed since the image was made"
            )
    return resolved


def _apply_stack(pipe, stack: list[AdapterSpec], resolved: list[ResolvedAdapter]) -> None:
    """Make the stack active on ``pipe`` (an empty stack deactivates what an earlier request left)."""
    if stack or has_engine(pipe):
        engine_for(pipe).apply(stack, resolved)


def _run(pipe, request: GenerationRequest, scheduler_config, model_hash: str, progress, init=None,
         mask=None, family: Family | None = None, recommended: dict | None = None) -> list[GeneratedImage]:
    import torch  # heavy: a run has loaded it with the pipeline; importing this module must not

    runner = task_pipeline(pipe, request.task)
    extra: dict = {}
    if request.task == "img2img":
        extra = {"image": init, "strength": request.strength}  # sized by the image itself
        if "height" in inspect.signature(runner.__call__).parameters:
            # Flux's img2img resizes to its default size unless told: the image's own size, as SD's keeps
            extra.update(height=init.height, width=init.width)
    elif request.task == "inpaint":
        extra = {"image": init, "mask_image": mask, "strength": request.strength,
                 "width": request.width, "height": request.height}
    else:
        extra = {"width": request.width, "height": request.height}
    # img2img runs int(steps * strength) of the steps: progress counts those.
    steps_run = request.num_inference_steps if init is None else max(1, int(request.num_inference_steps
                                                                            * request.strength))
    if family is not None and family.sampling_options is not None:
        # e.g. Flux: the CFG scale is a distilled model's guidance input, or true CFG (lora_studio.json says)
        sampling = family.sampling_options(pipe, request.guidance_scale, request.negative_prompt, recommended or {})
    else:
        sampling = {"guidance_scale": request.guidance_scale, "negative_prompt": request.negative_prompt or None}
    outputs: list[GeneratedImage] = []
    dtypes = pipeline_dtypes(pipe)
    total = request.num_images * steps_run
    for i in range(request.num_images):
        seed = request.seed + i
        pipe.scheduler = make_scheduler(request.scheduler, scheduler_config, family)
        runner.scheduler = pipe.scheduler
        generator = torch.Generator(device="cpu").manual_seed(seed)

        def on_step(_pipe, step, _t, kwargs, _i=i):
            if progress is not None:
                progress(min(_i * steps_run + step + 1, total), total)
            return kwargs

        image = runner(
            prompt=request.prompt,
            num_inference_steps=request.num_inference_steps,
            generator=generator,
            num_images_per_prompt=1,
            callback_on_step_end=on_step,
            **sampling,
            **extra,
        ).images[0]
        if mask is not None:
            # Paste the kept region back (A1111 does too): the VAE round trip alters every pixel a little,
            # and "keep" should mean the original pixels.
            image = Image.composite(image, init, mask)
        single = replace(request, seed=seed, num_images=1)
        outputs.append(GeneratedImage(image=image, request=single, model_hash=model_hash,
                                      parameters=a1111_parameters(single, model_hash), family=family,
                                      dtypes=dtypes))
    return outputs
