"""``lora-studio generate`` and ``lora-studio grid``: prompts (and an adapter stack) to PNGs with recipes."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from adapters.compose import AdapterSpec, parse_adapter_arg
from studio.app.cli.common import number, quiet_libraries, whole_number
from studio.app.cli.output import print_json, print_line, print_result
from studio.core.base_models import PRECISIONS
from studio.core.errors import InvalidRequestError
from studio.generation import run
from studio.generation.grid import GridAxis, render_grid
from studio.generation.recipes import check_recipe_cost, read_recipe
from studio.generation.requests import DEFAULT_SCHEDULER, MAX_BATCH, GenerationRequest


def register(sub) -> None:
    """Add ``generate`` and ``grid`` to the ``lora-studio`` subcommands."""
    _add_generate(sub)
    _add_grid(sub)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="text-to-image with a base model; PNGs carry their recipe")
    p.add_argument("prompt", nargs="?", help="the prompt (or use --prompts-file / --recipe)")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--base", default=None, help="base model: tiny (default), a folder, a .safetensors file, a Hub id")
    p.add_argument("--seed", type=whole_number, default=None, help="seed of the first image (random if omitted)")
    p.add_argument("--num-images", type=whole_number, default=1, help="images per prompt; image i uses seed + i")
    p.add_argument("--batch-size", type=whole_number, default=None,
                   help=f"images denoised together, 1 to {MAX_BATCH}; default: as many as free memory holds (each "
                        f"image's recipe records its batch, so it re-runs bit for bit)")
    p.add_argument("--steps", type=whole_number, default=20, help="denoising steps")
    p.add_argument("--guidance", type=number, default=None,
                   help="classifier-free guidance scale (default: the base model's recommendation; tiny: 2)")
    p.add_argument("--width", type=whole_number, default=None, help="width in pixels (multiple of 8)")
    p.add_argument("--height", type=whole_number, default=None, help="height in pixels (multiple of 8)")
    p.add_argument("--scheduler", default=None, help="sampler name, e.g. 'Euler', 'Euler a', 'DPM++ 2M', 'UniPC'")
    _add_stack_args(p)
    _add_precision_arg(p)
    p.add_argument("--init-image", type=Path, default=None,
                   help="img2img: start from this image (PNG, JPEG, WebP); resized to --width x --height")
    p.add_argument("--strength", type=number, default=None,
                   help="img2img/inpainting: how much of the init image is re-noised, 0 < S <= 1 (default 0.75)")
    p.add_argument("--mask", type=Path, default=None,
                   help="inpainting: a mask image, white = repaint, black = keep (needs --init-image)")
    p.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line")
    p.add_argument("--recipe", type=Path, help="re-run the recipe stored in a PNG the studio wrote, or the A1111 "
                                               "parameters of an A1111 / Civitai PNG (on --base)")
    p.add_argument("--yes", action="store_true",
                   help="run a --recipe even when it asks for more work than a normal recipe "
                        "(more than 150 steps at 2048x2048)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--json", action="store_true", help="print a JSON list of {path, prompt, seed}")
    p.set_defaults(func=cmd_generate)


def _add_precision_arg(p) -> None:
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="the weights' dtype: auto (float32 on CPU; bfloat16, or float16 where the GPU lacks it), "
                        "float32, float16, bfloat16; recorded in each image's recipe")


def _add_stack_args(p) -> None:
    """``--adapter`` and the options that refine the adapter before them, kept in typed order."""
    p.add_argument("--adapter", dest="stack", action="append", default=[], metavar="REF[:WEIGHT]",
                   type=lambda text: ("adapter", text),
                   help="add an adapter to the stack (repeatable): name, name@3, name@prod, sha256:<prefix> or a "
                        ".safetensors path, with an optional weight, e.g. mystyle@2:0.8")
    p.add_argument("--te-weight", dest="stack", action="append", metavar="W", type=lambda text: ("te", text),
                   help="text-encoder weight of the --adapter before it (ComfyUI's strength_clip)")
    p.add_argument("--blocks", dest="stack", action="append", metavar="JSON", type=lambda text: ("blocks", text),
                   help="per-block denoiser weights of the --adapter before it, e.g. "
                        "'{\"down\": 0.9, \"up\": {\"block_0\": 0.6}}'")


def _stack_from_args(items) -> list[AdapterSpec]:
    """The ``--adapter``/``--te-weight``/``--blocks`` sequence -> the request's adapter stack.

    Each refinement replaces the spec before it with one holding the new value, checked at once, before
    any model loads.
    """
    stack: list[AdapterSpec] = []
    for kind, text in items or ():
        if kind == "adapter":
            stack.append(parse_adapter_arg(text))
            continue
        flag = "--te-weight" if kind == "te" else "--blocks"
        if not stack:
            raise InvalidRequestError(f"{flag} refines the --adapter before it, and the stack is empty: "
                                      f"write --adapter REF[:WEIGHT] first, then {flag} {text}")
        if kind == "te":
            try:
                weight = float(text)
            except ValueError:
                raise InvalidRequestError(f"--te-weight {text!r} is not a number") from None
            stack[-1] = replace(stack[-1], text_encoders=weight)
        else:
            try:
                blocks = json.loads(text)
            except ValueError as e:
                raise InvalidRequestError(f"--blocks {text!r} is not JSON ({e}): write it like "
                                          f"'{{\"down\": 0.9, \"up\": {{\"block_0\": 0.6}}}}'") from None
            stack[-1] = replace(stack[-1], blocks=blocks)
    return stack


def _read_prompts_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"cannot read prompts file {path}: {e}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InvalidRequestError(f"prompts file {path} has no prompts: write one prompt per line")
    return prompts


def cmd_generate(args) -> int:
    sources = sum(x is not None for x in (args.prompt, args.prompts_file, args.recipe))
    if sources != 1:
        raise InvalidRequestError("give exactly one of: a PROMPT, --prompts-file FILE, or --recipe IMAGE.png")
    if args.recipe is not None:
        # A PNG can come from anyone: a recipe that asks for hours of work runs only when confirmed.
        notes: list[str] = []
        requests = [read_recipe(args.recipe, base_model=args.base, notes=notes)]
        for note in notes:  # an A1111 / Civitai image: what its parameters say that the studio left out
            print(f"note: {note}", file=sys.stderr)
        check_recipe_cost(requests[0], confirmed=args.yes)
    else:
        prompts = [args.prompt] if args.prompt is not None else _read_prompts_file(args.prompts_file)
        requests = [
            GenerationRequest(
                prompt=prompt,
                negative_prompt=args.negative,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                width=args.width,
                height=args.height,
                seed=args.seed,
                num_images=args.num_images,
                batch_size=args.batch_size,
                scheduler=args.scheduler or DEFAULT_SCHEDULER,
                base_model=args.base or "tiny",
                adapters=_stack_from_args(args.stack),
                init_image=str(args.init_image) if args.init_image is not None else None,
                strength=args.strength,
                mask_image=str(args.mask) if args.mask is not None else None,
                precision=args.precision,
            )
            for prompt in prompts
        ]
    quiet_libraries()
    rows = []
    for index, request in enumerate(requests):
        # Looked up on the module at each call, so a caller (a test) can stand in its own generate.
        result = run.generate(request)  # the pipeline is loaded once and cached for every prompt
        stem = None if len(requests) == 1 else f"{result.request.seed}-p{index:03d}"
        for path, out in zip(result.save(args.out, stem=stem), result.outputs):
            rows.append({"path": str(path), "prompt": out.request.prompt, "seed": out.seed})
            if not args.json:
                print_line(path)
    if args.json:
        print_json(rows)
    return 0


def _add_grid(sub) -> None:
    p = sub.add_parser("grid", help="an X/Y grid (strengths, seeds, adapter versions, checkpoints, prompts) as one "
                                    "labelled PNG")
    p.add_argument("prompt", help="the prompt (a prompt axis replaces it per cell)")
    p.add_argument("--x", required=True, metavar="KIND[@N]=V1,V2",
                   help="the x axis: strength=0,0.5,1 | seed=1,2,3 | version=1,2,prod | prompt=a|b (prompts split "
                        "on '|') | checkpoint=RUN or RUN:100,200,final (a training run's checkpoints; with no "
                        "--adapter they are the stack); @N picks the N-th --adapter for strength, version and "
                        "checkpoint (default 1)")
    p.add_argument("--y", default=None, metavar="KIND[@N]=V1,V2", help="the y axis (same forms); omit for one row")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--base", default=None, help="base model: tiny (default), a folder, a .safetensors file, a Hub id")
    p.add_argument("--seed", type=whole_number, default=None,
                   help="seed of every cell without a seed axis (random if omitted)")
    p.add_argument("--steps", type=whole_number, default=20, help="denoising steps")
    p.add_argument("--guidance", type=number, default=None, help="CFG scale (default: the base model's)")
    p.add_argument("--width", type=whole_number, default=None, help="width in pixels (multiple of 8)")
    p.add_argument("--height", type=whole_number, default=None, help="height in pixels (multiple of 8)")
    p.add_argument("--scheduler", default=None, help="sampler name, e.g. 'Euler', 'DPM++ 2M'")
    _add_stack_args(p)
    _add_precision_arg(p)
    p.add_argument("--out", type=Path, required=True, help="output folder: the grid PNG and every cell's PNG")
    p.add_argument("--json", action="store_true",
                   help="print {grid_path, image_paths, x_title, x_labels, y_title, y_labels, seconds}")
    p.set_defaults(func=cmd_grid)


def cmd_grid(args) -> int:
    from studio.app.runs import parse_checkpoint_axis  # local: reads run folders only when asked

    x = GridAxis.parse(args.x, checkpoints=parse_checkpoint_axis)
    y = GridAxis.parse(args.y, checkpoints=parse_checkpoint_axis) if args.y else None
    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps,
        guidance_scale=args.guidance, width=args.width, height=args.height, seed=args.seed,
        scheduler=args.scheduler or DEFAULT_SCHEDULER, base_model=args.base or "tiny",
        adapters=_stack_from_args(args.stack), precision=args.precision)
    quiet_libraries()
    result = render_grid(request, x, y, args.out)
    print_result(args.json, result.to_dict(), result.grid_path)
    return 0
