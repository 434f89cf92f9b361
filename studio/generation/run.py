"""Running a request: the one generation path the CLI, the UI, training previews and grids share.

- Image ``i`` of a request uses seed ``seed + i`` with its own ``torch.Generator``. Images are denoised
  in batches (:func:`batch_size_for` picks the size from free memory, at most ``MAX_BATCH``; a request
  may force one). A row's numbers depend on the batch's size but not on the other rows (measured on
  every family: kernels are chosen by shape, never by content), so each image's recipe records its
  batch's size and its row, and a replay rebuilds a batch of that size around it, bit for bit.
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
from dataclasses import dataclass, replace

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
from studio.generation.requests import (
    DEFAULT_STRENGTH,
    MAX_BATCH,
    MAX_SEED,
    GenerationRequest,
    make_scheduler,
)
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
    pipe, hash_, recommended = pipeline_for(request)
    return generate_with_pipeline(pipe, request, model_hash=hash_, progress=progress, recommended=recommended)


def pipeline_for(request: GenerationRequest) -> tuple:
    """(pipeline, model hash, recommended settings) of ``request``'s base model; the pipeline comes
    from the library's cache, so every caller shares one per base model and precision."""
    resolved = resolve(request.base_model)
    return load_pipeline(request.base_model, request.precision), model_hash(resolved), recommended_settings(resolved)


def generate_with_pipeline(
    pipe, request: GenerationRequest, model_hash: str = "", progress=None, recommended: dict | None = None
) -> GenerationResult:
    """Generate with an already loaded pipeline (training previews use the training components).

    Images are denoised in batches; each image's request records its batch (``batch_size``,
    ``batch_index``), which a replay rebuilds: a batch's size changes CPU and GPU kernels' summation
    order, so an image is bit-identical only to a re-run in a batch of the same size.
    """
    prepared = prepare(pipe, request, recommended)

    done = [0]  # image-steps so far

    def on_step(_owner, images, _step, steps):
        if progress is not None:
            done[0] += len(images)
            progress(done[0], prepared.request.num_images * steps)

    return generate_prepared(pipe, [prepared], model_hash, recommended, on_step=on_step)[0]


@dataclass
class Prepared:
    """A request ready to run: resolved (seed, size, CFG), its prompt's tags in its stack, its inputs
    pinned and loaded, its adapters resolved and pinned to exact versions."""

    request: GenerationRequest
    resolved: list[ResolvedAdapter]
    init: object = None  # PIL image or None
    mask: object = None

    def batch_key(self) -> tuple | None:
        """Requests with equal keys can share denoising batches (prompts and seeds may differ; a row's
        numbers do not depend on the other rows); ``None``: this one runs alone (img2img, a forced batch
        size, a recipe's rebuilt batch)."""
        r = self.request
        if r.task != "text2img" or r.batch_size is not None or r.batch_index is not None:
            return None
        return (r.base_model, r.precision, r.width, r.height, r.num_inference_steps, r.guidance_scale, r.scheduler,
                r.negative_prompt, tuple(repr(spec.to_dict()) for spec in r.adapters))


def prepare(pipe, request: GenerationRequest, recommended: dict | None = None) -> Prepared:
    """Everything about ``request`` that can fail before the pipeline is touched: resolve it, pin and
    load its input images (a bad image must not touch the pipeline), resolve and pin its adapters."""
    request = resolve_request(expand_prompt_tags(request), pipe, recommended)
    if request.init_image is not None:
        init_path, init_sha = pin_input("init image", request.init_image, request.init_image_sha256)
        mask_path, mask_sha = pin_input("mask image", request.mask_image, request.mask_image_sha256)
        request = replace(request, init_image=init_path, init_image_sha256=init_sha, mask_image=mask_path,
                          mask_image_sha256=mask_sha)
    init, mask = load_inputs(request)
    resolved = _resolve_stack(request, _pipeline_family(pipe))
    if resolved:
        # Pin every adapter in the recipe: the exact version and its tensor hash.
        request = replace(request, adapters=[
            replace(spec, ref=r.ref, name=r.name, version=r.version, tensor_sha256=r.tensor_sha256)
            for spec, r in zip(request.adapters, resolved)
        ])
    return Prepared(request, resolved, init, mask)


def generate_prepared(pipe, group: list[Prepared], model_hash: str = "", recommended: dict | None = None,
                      on_step=None, cancelled=None) -> list[GenerationResult | None]:
    """Run prepared requests together: one request, or several with the same :meth:`Prepared.batch_key`,
    whose images then share denoising batches in order (the generation queue merges requests so).

    ``on_step(owner, image_indices, step, steps)`` is called after each step of a batch for every
    request (``owner``, its index in ``group``) with images in it; ``cancelled(owner)`` is asked at each
    step: a batch whose owners are all cancelled stops there (:class:`GenerationCancelled` when it is
    the first's), and a cancelled request's result is ``None``.
    """
    keys = {p.batch_key() for p in group}
    if len(group) > 1 and (len(keys) != 1 or None in keys):
        raise ValueError("only requests with one batch key run together")
    family = _pipeline_family(pipe)
    t0 = time.perf_counter()
    # Schedulers keep per-run state (step index, model outputs): each batch gets a fresh one, and
    # the pipeline's own scheduler is put back afterwards, all under the pipeline's lock.
    with pipeline_lock(pipe):
        _apply_stack(pipe, group[0].request.adapters, group[0].resolved)
        original_scheduler = pipe.scheduler
        try:
            outputs = _run(pipe, group, original_scheduler.config, model_hash, family, recommended or {}, on_step,
                           cancelled or (lambda _owner: False))
        finally:
            pipe.scheduler = original_scheduler
    seconds = time.perf_counter() - t0
    return [None if out is None else GenerationResult(request=p.request, outputs=out, seconds=seconds)
            for p, out in zip(group, outputs)]


class GenerationCancelled(StudioError):
    """A request was cancelled while it ran; its images are discarded."""


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


def _run(pipe, group: list[Prepared], scheduler_config, model_hash: str, family: Family | None,
         recommended: dict, on_step, cancelled) -> list[list[GeneratedImage] | None]:
    import torch  # heavy: a run has loaded it with the pipeline; importing this module must not

    first = group[0]
    request, init, mask = first.request, first.init, first.mask
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
        sampling = family.sampling_options(pipe, request.guidance_scale, request.negative_prompt, recommended)
    else:
        sampling = {"guidance_scale": request.guidance_scale, "negative_prompt": request.negative_prompt or None}
    outputs: list[list[GeneratedImage] | None] = [[] for _ in group]
    dtypes = pipeline_dtypes(pipe)
    if len(group) == 1:
        batches = [[(0, seed, keep) for seed, keep in batch] for batch in plan_batches(request, batch_size_for(
            pipe, request))]
    else:
        rows = [(owner, p.request.seed + i, True) for owner, p in enumerate(group) for i in range(p.request.num_images)]
        size = batch_size_for(pipe, request)
        batches = [rows[i:i + size] for i in range(0, len(rows), size)]
    image_index = [0] * len(group)
    for batch in batches:
        owners = {owner for owner, _, _ in batch}
        if all(cancelled(owner) for owner in owners):
            continue
        rows = len(batch)
        pipe.scheduler = make_scheduler(request.scheduler, scheduler_config, family)
        runner.scheduler = pipe.scheduler
        generators = [torch.Generator(device="cpu").manual_seed(seed) for _, seed, _ in batch]
        members: dict[int, list[int]] = {}  # owner -> the indices of its images in this batch
        for owner, _, keep in batch:
            if keep:
                images = members.setdefault(owner, [])
                images.append(image_index[owner] + len(images))

        def on_batch_step(_pipe, step, _t, kwargs, _members=members):
            if all(cancelled(owner) for owner in _members):
                raise _Stop
            if on_step is not None:
                for owner, images in _members.items():
                    on_step(owner, images, step + 1, steps_run)
            return kwargs

        # diffusers wants the negative prompt in the prompt's type: a list of one per row as well.
        negatives = {key: [value] * rows for key, value in sampling.items()
                     if key.startswith("negative_prompt") and isinstance(value, str)}
        try:
            # A list of prompts, one per row, never one prompt repeated by num_images_per_prompt: the text
            # encoders then run on a batch of ``rows`` prompts too, as a replay of any row runs them.
            images = runner(
                prompt=[group[owner].request.prompt for owner, _, _ in batch],
                num_inference_steps=request.num_inference_steps,
                generator=generators,
                num_images_per_prompt=1,
                callback_on_step_end=on_batch_step,
                **{**sampling, **negatives},
                **extra,
            ).images
        except _Stop:
            continue
        for index, ((owner, seed, keep), image) in enumerate(zip(batch, images)):
            if not keep:
                continue
            image_index[owner] += 1
            if mask is not None:
                # Paste the kept region back (A1111 does too): the VAE round trip alters every pixel a little,
                # and "keep" should mean the original pixels.
                image = Image.composite(image, init, mask)
            single = replace(group[owner].request, seed=seed, num_images=1, batch_size=rows, batch_index=index)
            outputs[owner].append(GeneratedImage(image=image, request=single, model_hash=model_hash,
                                                 parameters=a1111_parameters(single, model_hash), family=family,
                                                 dtypes=dtypes))
    if len(group) == 1 and cancelled(0):
        raise GenerationCancelled("the request was cancelled; its images were discarded")
    return [None if cancelled(owner) else out for owner, out in enumerate(outputs)]


class _Stop(Exception):
    """Raised in a step callback to stop a batch whose requests were all cancelled."""


def plan_batches(request: GenerationRequest, batch_size: int) -> list[list[tuple[int, bool]]]:
    """The batches that make ``request``'s images: each a list of (seed, kept) rows.

    A recipe's image (``batch_index`` set) is one kept row in a rebuilt batch of its recorded size,
    the other rows its batch's own seeds; otherwise image ``i`` is seed ``seed + i``, in batches of
    ``batch_size`` (the last holds the rest), every row kept.
    """
    if request.batch_index is not None:
        return [[(seed, index == request.batch_index) for index, seed in enumerate(request.batch_seeds)]]
    seeds = [request.seed + i for i in range(request.num_images)]
    return [[(seed, True) for seed in seeds[i:i + batch_size]] for i in range(0, len(seeds), batch_size)]


# Memory a denoised image needs beyond the weights, per pixel and per channel of the VAE decoder's
# full-resolution blocks (their widest activations): measured on SD's VAE (128 channels) in float32 on
# CPU, 8 images at 256 x 256 take 198 MB each, 5.9 tensors of 128 x 256 x 256 x 4 bytes; 8 leaves room
# for the denoiser's activations, which are smaller (a 1/8-size latent).
_LIVE_DECODER_TENSORS = 8
# Share of the free memory batching may take: the rest stays for the system and other processes.
_MEMORY_SHARE = 0.5


def batch_size_for(pipe, request: GenerationRequest) -> int:
    """How many of ``request``'s images to denoise together: its own ``batch_size`` when it forces one,
    else as many as half the free memory (the GPU's, or the machine's on CPU) holds, at most
    :data:`MAX_BATCH`."""
    if request.batch_size is not None:
        return request.batch_size
    import torch

    vae = getattr(pipe, "vae", None)
    channels = vae.config.block_out_channels[0] if vae is not None else 128
    dtype_bytes = torch.finfo(vae.dtype).bits // 8 if vae is not None else 4
    per_image = _LIVE_DECODER_TENSORS * channels * request.width * request.height * dtype_bytes
    device = getattr(pipe, "device", None)
    if device is not None and device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    return max(1, min(MAX_BATCH, int(free * _MEMORY_SHARE // per_image)))
