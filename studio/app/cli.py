"""The ``lora-studio`` command: a thin face over the library, like the Streamlit app.

Every subcommand parses its arguments, calls one library function and prints the result (``--json``
for machines). A :class:`~studio.core.errors.StudioError` becomes one line on stderr and exit status 2,
never a traceback. Heavy imports (torch, diffusers) happen inside the commands that need them, so
``lora-studio --help`` and ``base-models list`` start fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC
from pathlib import Path

from studio.core.errors import StudioError
from studio.core.thirdparty import quiet_third_party

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that prints one line and the usage hint, exit status 2 (as argparse does)."""

    def error(self, message: str):  # noqa: D401
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _quiet_libraries() -> None:
    """Silence progress bars of diffusers/transformers on the console (their logs: studio.core.thirdparty)."""
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    except ImportError:
        pass


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="text-to-image with a base model; PNGs carry their recipe")
    p.add_argument("prompt", nargs="?", help="the prompt (or use --prompts-file / --recipe)")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--base", default=None, help="base model: tiny (default), a folder, a .safetensors file, a Hub id")
    p.add_argument("--seed", type=_int, default=None, help="seed of the first image (random if omitted)")
    p.add_argument("--num-images", type=_int, default=1, help="images per prompt; image i uses seed + i")
    p.add_argument("--steps", type=_int, default=20, help="denoising steps")
    p.add_argument("--guidance", type=_float, default=None,
                   help="classifier-free guidance scale (default: the base model's recommendation; tiny: 2)")
    p.add_argument("--width", type=_int, default=None, help="width in pixels (multiple of 8)")
    p.add_argument("--height", type=_int, default=None, help="height in pixels (multiple of 8)")
    p.add_argument("--scheduler", default=None, help="sampler name, e.g. 'Euler', 'Euler a', 'DPM++ 2M', 'UniPC'")
    _add_stack_args(p)
    p.add_argument("--init-image", type=Path, default=None,
                   help="img2img: start from this image (PNG, JPEG, WebP); resized to --width x --height")
    p.add_argument("--strength", type=_float, default=None,
                   help="img2img/inpainting: how much of the init image is re-noised, 0 < S <= 1 (default 0.75)")
    p.add_argument("--mask", type=Path, default=None,
                   help="inpainting: a mask image, white = repaint, black = keep (needs --init-image)")
    p.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line")
    p.add_argument("--recipe", type=Path, help="re-run the recipe stored in a PNG the studio wrote")
    p.add_argument("--yes", action="store_true",
                   help="run a --recipe even when it asks for more work than a normal recipe "
                        "(more than 150 steps at 2048x2048)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--json", action="store_true", help="print a JSON list of {path, prompt, seed}")
    p.set_defaults(func=cmd_generate)


def _add_stack_args(p) -> None:
    """``--adapter`` and the options that refine the adapter before them, kept in typed order."""
    p.add_argument("--adapter", dest="stack", action="append", default=[], metavar="REF[:WEIGHT]",
                   type=lambda text: ("adapter", text),
                   help="add an adapter to the stack (repeatable): name, name@3, name@prod, sha256:<prefix> or a "
                        ".safetensors path, with an optional weight, e.g. mystyle@2:0.8")
    p.add_argument("--te-weight", dest="stack", action="append", metavar="W", type=lambda text: ("te", text),
                   help="text-encoder weight of the --adapter before it (ComfyUI's strength_clip)")
    p.add_argument("--blocks", dest="stack", action="append", metavar="JSON", type=lambda text: ("blocks", text),
                   help="per-block UNet weights of the --adapter before it, e.g. "
                        "'{\"down\": 0.9, \"up\": {\"block_0\": 0.6}}'")


def _stack_from_args(items) -> list[dict]:
    """The ``--adapter``/``--te-weight``/``--blocks`` sequence -> the request's adapter stack."""
    from adapters.compose import AdapterSpec, parse_adapter_arg
    from studio.core.errors import InvalidRequestError

    stack: list[dict] = []
    for kind, text in items or ():
        if kind == "adapter":
            stack.append(parse_adapter_arg(text).to_dict())
            continue
        flag = "--te-weight" if kind == "te" else "--blocks"
        if not stack:
            raise InvalidRequestError(f"{flag} refines the --adapter before it, and the stack is empty: "
                                      f"write --adapter REF[:WEIGHT] first, then {flag} {text}")
        if kind == "te":
            try:
                stack[-1]["text_encoder"] = float(text)
            except ValueError:
                raise InvalidRequestError(f"--te-weight {text!r} is not a number") from None
        else:
            try:
                stack[-1]["blocks"] = json.loads(text)
            except ValueError as e:
                raise InvalidRequestError(f"--blocks {text!r} is not JSON ({e}): write it like "
                                          f"'{{\"down\": 0.9, \"up\": {{\"block_0\": 0.6}}}}'") from None
        AdapterSpec.from_dict(stack[-1])  # names a bad value now, with the flag that gave it
    return stack


def _read_prompts_file(path: Path) -> list[str]:
    from studio.core.errors import InvalidRequestError

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidRequestError(f"cannot read prompts file {path}: {e}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InvalidRequestError(f"prompts file {path} has no prompts: write one prompt per line")
    return prompts


def cmd_generate(args) -> int:
    from studio.core.errors import InvalidRequestError
    from studio.generation.generate import DEFAULT_SCHEDULER, GenerationRequest, check_recipe_cost, read_recipe

    sources = sum(x is not None for x in (args.prompt, args.prompts_file, args.recipe))
    if sources != 1:
        raise InvalidRequestError("give exactly one of: a PROMPT, --prompts-file FILE, or --recipe IMAGE.png")
    if args.recipe is not None:
        # A PNG can come from anyone: a recipe that asks for hours of work runs only when confirmed.
        requests = [read_recipe(args.recipe)]
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
                scheduler=args.scheduler or DEFAULT_SCHEDULER,
                base_model=args.base or "tiny",
                adapters=_stack_from_args(args.stack),
                init_image=str(args.init_image) if args.init_image is not None else None,
                strength=args.strength,
                mask_image=str(args.mask) if args.mask is not None else None,
            )
            for prompt in prompts
        ]
    _quiet_libraries()
    from studio.generation.generate import generate

    rows = []
    for index, request in enumerate(requests):
        result = generate(request)  # the pipeline is loaded once and cached for every prompt
        stem = None if len(requests) == 1 else f"{result.request.seed}-p{index:03d}"
        for path, out in zip(result.save(args.out, stem=stem), result.outputs):
            rows.append({"path": str(path), "prompt": out.request.prompt, "seed": out.seed})
            if not args.json:
                print(path)
    if args.json:
        print(json.dumps(rows))
    return 0


# --------------------------------------------------------------------------------------------
# grid
# --------------------------------------------------------------------------------------------


def _add_grid(sub) -> None:
    p = sub.add_parser("grid", help="an X/Y grid (strengths, seeds, adapter versions, prompts) as one labelled PNG")
    p.add_argument("prompt", help="the prompt (a prompt axis replaces it per cell)")
    p.add_argument("--x", required=True, metavar="KIND[@N]=V1,V2",
                   help="the x axis: strength=0,0.5,1 | seed=1,2,3 | version=1,2,prod | prompt=a|b (prompts split "
                        "on '|'); @N picks the N-th --adapter for strength and version (default 1)")
    p.add_argument("--y", default=None, metavar="KIND[@N]=V1,V2", help="the y axis (same forms); omit for one row")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--base", default=None, help="base model: tiny (default), a folder, a .safetensors file, a Hub id")
    p.add_argument("--seed", type=_int, default=None, help="seed of every cell without a seed axis (random if omitted)")
    p.add_argument("--steps", type=_int, default=20, help="denoising steps")
    p.add_argument("--guidance", type=_float, default=None, help="CFG scale (default: the base model's)")
    p.add_argument("--width", type=_int, default=None, help="width in pixels (multiple of 8)")
    p.add_argument("--height", type=_int, default=None, help="height in pixels (multiple of 8)")
    p.add_argument("--scheduler", default=None, help="sampler name, e.g. 'Euler', 'DPM++ 2M'")
    _add_stack_args(p)
    p.add_argument("--out", type=Path, required=True, help="output folder: the grid PNG and every cell's PNG")
    p.add_argument("--json", action="store_true",
                   help="print {grid_path, image_paths, x_title, x_labels, y_title, y_labels, seconds}")
    p.set_defaults(func=cmd_grid)


def cmd_grid(args) -> int:
    from studio.generation.generate import DEFAULT_SCHEDULER, GenerationRequest
    from studio.generation.grid import GridAxis

    x = GridAxis.parse(args.x)
    y = GridAxis.parse(args.y) if args.y else None
    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps,
        guidance_scale=args.guidance, width=args.width, height=args.height, seed=args.seed,
        scheduler=args.scheduler or DEFAULT_SCHEDULER, base_model=args.base or "tiny",
        adapters=_stack_from_args(args.stack))
    _quiet_libraries()
    from studio.generation.grid import render_grid

    result = render_grid(request, x, y, args.out)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(result.grid_path)
    return 0


# --------------------------------------------------------------------------------------------
# base-models
# --------------------------------------------------------------------------------------------


def _add_base_models(sub) -> None:
    p = sub.add_parser("base-models", help="base models the studio can use")
    bsub = p.add_subparsers(dest="base_models_command", required=True, parser_class=_Parser)
    ls = bsub.add_parser("list", help="list the embedded model and the models in $LORA_STUDIO_HOME/models")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_base_models_list)
    from studio.core.single_file import DTYPES  # no torch: cheap at start-up

    ex = bsub.add_parser("export", help="write a base model as one .safetensors file in the A1111/ComfyUI layout")
    ex.add_argument("src", help="base model: tiny, a folder, a .safetensors file, a Hub id")
    ex.add_argument("out", type=Path, help="the .safetensors file to write")
    ex.add_argument("--dtype", choices=DTYPES, default=None, help="convert the weights (default: as loaded)")
    ex.add_argument("--force", action="store_true", help="replace OUT if it exists")
    ex.add_argument("--json", action="store_true", help="print {path, size_bytes}")
    ex.set_defaults(func=cmd_base_models_export)


def cmd_base_models_list(args) -> int:
    from dataclasses import asdict

    from studio.core.base_models import list_base_models

    rows = list_base_models()
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
    else:
        width = max(len(r.ref) for r in rows)
        for r in rows:
            print(f"{r.ref:<{width}}  {r.family:<5} {r.kind:<12} {r.description}")
    return 0


def cmd_base_models_export(args) -> int:
    from studio.core.errors import InvalidRequestError

    # Checked before loading anything: a checkpoint can take minutes to load, and replacing a
    # multi-GB file by mistake is worse.
    if args.out.exists() and not args.force:
        raise InvalidRequestError(f"{args.out} already exists: pass --force to replace it")
    _quiet_libraries()
    from studio.core.single_file import export_single_file

    path = export_single_file(args.src, args.out, dtype=args.dtype)
    if args.json:
        print(json.dumps({"path": str(path), "size_bytes": path.stat().st_size}))
    else:
        print(path)
    return 0


# --------------------------------------------------------------------------------------------
# adapters
# --------------------------------------------------------------------------------------------


def _add_adapters(sub) -> None:
    p = sub.add_parser("adapters", help="the adapter registry: versions, aliases, search")
    asub = p.add_subparsers(dest="adapters_command", required=True, parser_class=_Parser)
    ls = asub.add_parser("list", help="list adapter versions, filtered, sorted and paged")
    ls.add_argument("--family", help="base-model family, e.g. sd1")
    ls.add_argument("--tag", help="only versions with this tag (case-insensitive)")
    ls.add_argument("--search", help="words that must all appear in the name or description")
    ls.add_argument("--type", dest="adapter_type", choices=("lora", "dora", "loha", "lokr"), help="adapter type")
    ls.add_argument("--trigger", help="only versions with this trigger word or phrase")
    ls.add_argument("--sort", choices=("name", "created", "newest"), default="name", help="order (default name)")
    ls.add_argument("--limit", type=_int, default=50, help="page size (default 50)")
    ls.add_argument("--offset", type=_int, default=0, help="rows to skip (default 0)")
    ls.add_argument("--json", action="store_true", help="print {total, limit, offset, items}")
    ls.set_defaults(func=cmd_adapters_list)
    show = asub.add_parser("show", help="show one version: name, name@3, name@alias or sha256:<prefix>")
    show.add_argument("ref", help="adapter reference")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_adapters_show)
    tag = asub.add_parser("tag", help="point an alias (e.g. prod) at a version; moves it if already set")
    tag.add_argument("ref", help="adapter reference, e.g. mystyle@3")
    tag.add_argument("alias", help="alias name (not a number, not 'latest')")
    tag.set_defaults(func=cmd_adapters_tag)
    untag = asub.add_parser("untag", help="remove an alias from an adapter")
    untag.add_argument("name", help="adapter name")
    untag.add_argument("alias", help="alias to remove")
    untag.set_defaults(func=cmd_adapters_untag)
    imp = asub.add_parser("import", help="import a LoRA file (diffusers/peft or kohya .safetensors) as a new version")
    imp.add_argument("path", type=Path, help="the adapter .safetensors file, or the folder save_lora_weights wrote")
    imp.add_argument("--name", help="adapter name (default: the file's ss_output_name, modelspec.title or file name)")
    imp.add_argument("--base", default="tiny",
                     help="base model the adapter must fit: tiny (default), a folder, a .safetensors file, a Hub id")
    imp.add_argument("--trigger", dest="triggers", action="extend", nargs="+", metavar="WORD",
                     help="trigger word or phrase (repeatable; replaces the file's declared ones)")
    imp.add_argument("--tag", dest="tags", action="extend", nargs="+", metavar="TAG",
                     help="label to filter by (repeatable; replaces the file's modelspec.tags)")
    imp.add_argument("--description", help="free text (default: the file's modelspec.description)")
    imp.add_argument("--json", action="store_true",
                     help="print the version record plus 'import': {format, warnings, suggested_trigger_words...}")
    imp.set_defaults(func=cmd_adapters_import)
    exp = asub.add_parser("export", help="write a version as a diffusers (peft) or kohya (A1111/ComfyUI) file")
    exp.add_argument("ref", help="adapter reference: name, name@3, name@alias or sha256:<prefix>")
    exp.add_argument("--format", dest="fmt", choices=("diffusers", "kohya"), required=True,
                     help="diffusers: peft keys + lora_adapter_metadata; kohya: lora_unet_*/lora_te_* + .alpha")
    exp.add_argument("--out", type=Path, required=True, help="the .safetensors file to write, or a folder")
    exp.add_argument("--force", action="store_true", help="replace OUT if it exists")
    exp.add_argument("--json", action="store_true", help="print {path, format, size_bytes}")
    exp.set_defaults(func=cmd_adapters_export)
    pub = asub.add_parser("publish", help="publish a version to a Hugging Face Hub model repo: one commit, tagged "
                                          "v<number>; HF_TOKEN or `hf auth login` credentials")
    pub.add_argument("ref", help="adapter reference: name, name@3, name@alias or sha256:<prefix>")
    pub.add_argument("--repo", required=True, metavar="OWNER/NAME", help="the Hub model repo (created if missing)")
    pub.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its "
                                                            "visibility)")
    pub.add_argument("--kohya", action="store_true", help="also upload <name>.safetensors in kohya layout for "
                                                          "AUTOMATIC1111/ComfyUI (LoRA only)")
    pub.add_argument("--dry-run", type=Path, metavar="DIR", dest="dry_run",
                     help="write exactly the files that would be uploaded into DIR (new or empty); no network")
    pub.add_argument("--base-model", metavar="OWNER/NAME",
                     help="Hub id for the card's base_model when the version's base model is not a Hub id")
    pub.add_argument("--license", help="the card's license, e.g. openrail++ (default: the version's, else unknown)")
    pub.add_argument("--json", action="store_true", help="print {repo_id, url, commit, tag, files, ...}")
    pub.set_defaults(func=cmd_adapters_publish)
    pull = asub.add_parser("pull", help="download a Hub adapter at a revision into the registry (origin 'pulled')")
    pull.add_argument("repo", metavar="OWNER/NAME[@REVISION]",
                      help="the Hub repo, optionally at a tag (v3), branch or commit; default main")
    pull.add_argument("--name", help="adapter name (default: the published name, else the repo's name)")
    pull.add_argument("--base", default=None,
                      help="base model to validate against (default: the studio's default base model, "
                           "LORA_STUDIO_BASE_MODEL, else tiny); the publication's own base model is never loaded")
    pull.add_argument("--json", action="store_true", help="print the version record")
    pull.set_defaults(func=cmd_adapters_pull)
    rm = asub.add_parser("delete", help="delete a version (name@3, name@alias, sha256:...) or a whole adapter (name)")
    rm.add_argument("ref", help="a version reference, or a bare NAME to delete the adapter with all its versions")
    rm.add_argument("--force", action="store_true", help="also when a user alias (e.g. prod) points at it")
    rm.set_defaults(func=cmd_adapters_delete)
    from adapters.merge import METHODS  # no torch: cheap at start-up

    mg = asub.add_parser("merge", help="merge LoRAs into a new adapter (peft's weighted merge), parents as lineage")
    mg.add_argument("parents", nargs="+", metavar="REF[:WEIGHT]", help="the adapters to merge, each with a weight")
    mg.add_argument("--method", choices=METHODS, required=True,
                    help="linear (equal ranks), cat (exact; rank = sum), svd (exact sum cut to --rank), ties and "
                         "dare_linear (equal ranks; keep --density of each delta)")
    mg.add_argument("--density", type=_float, default=None, help="ties / dare_linear: fraction kept, 0 < D <= 1")
    mg.add_argument("--rank", type=_int, default=None, help="svd: rank of the result (default: the largest parent's)")
    mg.add_argument("--name", required=True, help="name of the new adapter (a new version if it exists)")
    mg.add_argument("--description", default="", help="free text for the new version")
    mg.add_argument("--json", action="store_true", help="print the new version's record")
    mg.set_defaults(func=cmd_adapters_merge)


def cmd_adapters_list(args) -> int:
    from adapters.registry import Registry

    with Registry() as reg:
        page = reg.list_versions(search=args.search, tag=args.tag, family=args.family, trigger=args.trigger,
                                 adapter_type=args.adapter_type, sort=args.sort, limit=args.limit, offset=args.offset)
    if args.json:
        print(json.dumps(page.to_dict()))
        return 0
    if not page.items:
        print(f"no adapter versions match ({page.total} in total with these filters)")
        return 0
    rows = [(v.ref, v.adapter_type, str(v.rank or "?"), v.family, ",".join(v.aliases), ",".join(v.tags),
             ", ".join(v.trigger_words)) for v in page.items]
    header = ("REF", "TYPE", "RANK", "FAMILY", "ALIASES", "TAGS", "TRIGGER WORDS")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for r in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1])
    print(f"showing {page.offset + 1}-{page.offset + len(page.items)} of {page.total}")
    return 0


def cmd_adapters_show(args) -> int:
    from adapters.registry import Registry

    with Registry() as reg:
        v = reg.get(args.ref)
        publications = reg.publications(v.ref)
    if args.json:
        print(json.dumps({**v.to_dict(), "publications": [p.to_dict() for p in publications]}))
        return 0
    d = v.to_dict()
    lines = [
        ("ref", v.ref), ("aliases", ", ".join(v.aliases)), ("family", v.family), ("type", v.adapter_type),
        ("rank", v.rank), ("alpha", v.alpha), ("components", ", ".join(v.components)),
        ("target modules", ", ".join(v.target_modules)), ("trigger words", ", ".join(v.trigger_words)),
        ("tags", ", ".join(v.tags)), ("description", v.description), ("license", v.license), ("author", v.author),
        ("base model", v.base_model), ("base model sha256", v.base_model_sha256), ("origin", v.origin),
        ("parents", ", ".join(f"{p.ref}{'' if p.present else ' (deleted)'}" for p in v.parents)),
        ("created", d["created_at"]), ("sha256", v.weights_sha256), ("tensor sha256", v.tensor_sha256),
        ("AutoV2", v.autov2), ("A1111 legacy hash", v.a1111_legacy), ("size", f"{v.size_bytes} bytes"),
        ("file", str(v.path)), ("samples", len(v.samples)), ("metadata keys", len(v.safetensors_metadata)),
    ]
    for key, value in lines:
        if value not in (None, "", ()):
            print(f"{key + ':':<19} {value}")
    for p in publications:
        print(f"{'published:':<19} {p.repo_id}@{p.tag} (commit {p.commit[:12]}, {p.published_at:%Y-%m-%d}) {p.url}")
    return 0


def cmd_adapters_import(args) -> int:
    from datetime import datetime

    _quiet_libraries()
    from adapters.formats import METHOD_NAMES, detect
    from adapters.ingest import import_adapter
    from adapters.registry import Registry

    info = detect(args.path)  # header only: its warnings and suggestions are shown with the result
    started = datetime.now(UTC)
    with Registry() as reg:
        v = import_adapter(reg, args.path, name=args.name, base=args.base, trigger_words=args.triggers,
                           tags=args.tags, description=args.description)
    existed = v.created_at < started
    suggested = info.trigger_words if info.trigger_words_suggested and not v.trigger_words else []
    if args.json:
        print(json.dumps({**v.to_dict(), "import": {
            "format": info.format, "key_style": info.key_style, "alpha_source": info.alpha_source,
            "architecture": info.architecture, "already_registered": existed, "warnings": info.warnings,
            "suggested_trigger_words": suggested}}))
        return 0
    what = (f"{info.format} {METHOD_NAMES[v.adapter_type]}, rank {v.rank}, alpha {v.alpha:g} ({info.alpha_source}), "
            f"{' + '.join(v.components)}")
    print(f"{'already registered as' if existed else 'imported'} {v.ref} ({what})")
    if v.trigger_words:
        print(f"trigger words: {', '.join(v.trigger_words)}")
    for warning in info.warnings:
        if not (info.trigger_words_suggested and "suggested" in warning):
            print(f"warning: {warning}")
    if suggested:
        print(f"suggested trigger words (from the training tags): {', '.join(suggested)}; "
              f"record them with --trigger")
    return 0


def cmd_adapters_export(args) -> int:
    _quiet_libraries()
    from adapters.ingest import export_adapter
    from adapters.registry import Registry

    with Registry() as reg:
        path = export_adapter(reg, args.ref, format=args.fmt, out=args.out, force=args.force)
    if args.json:
        print(json.dumps({"path": str(path), "format": args.fmt, "size_bytes": path.stat().st_size}))
    else:
        print(path)
    return 0


def cmd_adapters_publish(args) -> int:
    _quiet_libraries()
    from adapters.registry import Registry
    from studio.app.hub import publish_version

    with Registry() as reg:
        result = publish_version(reg, args.ref, args.repo, private=args.private, kohya=args.kohya,
                                 dry_run_dir=args.dry_run, base_model=args.base_model, license=args.license)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if result.dry_run:
        print(f"wrote {len(result.files)} files to {result.out_dir} (nothing uploaded):")
        for f in result.files:
            print(f"  {f}")
        return 0
    what = "already published as" if result.already_published else "published"
    print(f"{what} {result.ref} -> {result.repo_id}@{result.tag} (commit {result.commit[:12]})")
    print(result.tag_url)
    return 0


def cmd_adapters_pull(args) -> int:
    from datetime import datetime

    _quiet_libraries()
    from adapters.registry import Registry
    from studio.app.hub import pull_adapter

    started = datetime.now(UTC)
    with Registry() as reg:
        v = pull_adapter(reg, args.repo, name=args.name, base=args.base)
    for refused in (v.source or {}).get("refused_samples") or ():
        print(f"warning: sample {refused.get('file')} was not stored: {refused.get('reason')}", file=sys.stderr)
    if args.json:
        print(json.dumps(v.to_dict()))
        return 0
    hub = (v.source or {}).get("hub") or {}
    what = "already registered as" if v.created_at < started else "pulled"
    print(f"{what} {v.ref} from {hub.get('repo_id', args.repo)}@{hub.get('revision', '?')} "
          f"(commit {str(hub.get('commit', '?'))[:12]})")
    if v.trigger_words:
        print(f"trigger words: {', '.join(v.trigger_words)}")
    return 0


def cmd_adapters_tag(args) -> int:
    from adapters.registry import Registry

    with Registry() as reg:
        v = reg.set_alias(args.ref, args.alias)
    print(f"{v.name}@{args.alias} -> {v.ref}")
    return 0


def cmd_adapters_untag(args) -> int:
    from adapters.registry import Registry

    with Registry() as reg:
        number = reg.remove_alias(args.name, args.alias)
    print(f"removed {args.name}@{args.alias} (was {args.name}@{number})")
    return 0


def cmd_adapters_merge(args) -> int:
    _quiet_libraries()
    from adapters.merge import merge_adapters, parse_merge_arg
    from adapters.registry import Registry

    parents = [parse_merge_arg(text) for text in args.parents]
    with Registry() as reg:
        v = merge_adapters(reg, parents, method=args.method, name=args.name, density=args.density, rank=args.rank,
                           description=args.description)
    if args.json:
        print(json.dumps(v.to_dict()))
    else:
        print(f"merged {', '.join(v.source['merge']['parents'])} ({args.method}) into {v.ref}, rank {v.rank}")
    return 0


def cmd_adapters_delete(args) -> int:
    from adapters.registry import Registry

    with Registry() as reg:
        report = reg.delete(args.ref, force=args.force)
    print(f"deleted {', '.join(report.deleted)}")
    if report.aliases_removed:
        print(f"removed aliases {', '.join(report.aliases_removed)}")
    print(f"freed {len(report.blobs_removed)} blob(s), {report.bytes_freed} bytes")
    return 0


# --------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------


def _add_datasets(sub) -> None:
    p = sub.add_parser("datasets", help="training datasets: check a folder before training on it")
    dsub = p.add_subparsers(dest="datasets_command", required=True, parser_class=_Parser)
    check = dsub.add_parser(
        "check", help="layout, counts, captions, tags, buckets, duplicates and every skipped file with its reason "
                      "(exit status 1 when no image is usable)")
    check.add_argument("dir", type=Path, help="the dataset folder (any layout the trainer reads)")
    check.add_argument("--resolution", type=_int, default=None,
                       help="training side in pixels for the buckets (default: the config's, else the base model's "
                            "native resolution; tiny: 32)")
    check.add_argument("--bucket-step", type=_int, default=None,
                       help="bucket sides are multiples of this (default: the base model's latent granularity, 8)")
    check.add_argument("--config", type=Path, default=None,
                       help="take the [dataset] options (trigger word, captions, buckets) from this training TOML")
    check.add_argument("--json", action="store_true", help="print the report as one JSON object")
    check.set_defaults(func=cmd_datasets_check)


def cmd_datasets_check(args) -> int:
    from dataclasses import replace

    from studio.core.settings import get_settings
    from trainer.config import ModelConfig, TrainConfig
    from trainer.data import check_dataset

    config = TrainConfig.from_toml(args.config) if args.config else TrainConfig(
        model=ModelConfig(base_model=get_settings().default_base_model))
    d = config.dataset
    config.dataset = replace(d, path=str(args.dir), resolution=args.resolution or d.resolution,
                             bucket_reso_steps=args.bucket_step or d.bucket_reso_steps)
    dataset = config.resolved().dataset
    report = check_dataset(args.dir, config=dataset)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        _print_dataset_report(report)
    return 0 if report.usable_count else 1


def _print_dataset_report(report) -> None:
    def row(label: str, text: str) -> None:
        print(f"{label:<12} {text}")

    row("dataset", report.path)
    row("layout", f"{report.layout} ({report.layout_description})")
    row("images", f"{report.image_count} found, {report.usable_count} usable, {len(report.bad_files)} skipped; "
                  f"{report.samples_per_epoch} samples per epoch")
    if report.layout == "kohya" or any(n != 1 for n in report.repeats.values()):
        row("repeats", ", ".join(f"{folder} x{n}" for folder, n in report.repeats.items()))
    sources = ", ".join(f"{k} {v}" for k, v in report.caption_sources.items())
    row("captions", f"{report.captioned_count}/{report.usable_count} ({report.caption_coverage:.0%})"
                    + (f": {sources}" if sources else ""))
    row("buckets", (", ".join(f"{b}: {n}" for b, n in report.buckets.items()) or "none")
        + f"  (resolution {report.resolution}, step {report.bucket_step})")
    for folder, tags in report.tag_frequency.items():
        top = list(tags.items())[:8]
        more = f", ... ({len(tags)} tags)" if len(tags) > len(top) else ""
        row("tags", f"{folder}: " + ", ".join(f"{t} {n}" for t, n in top) + more)
    row("duplicates", "; ".join(" = ".join(group) for group in report.duplicates) or "none")
    row("fingerprint", report.fingerprint)
    for title, items in (("skipped", report.bad_files), ("ignored", report.ignored_files)):
        if items:
            print(f"{title} ({len(items)}):")
            for item in items:
                print(f"  {item.path}: {item.reason}")
    for note in report.notes:
        print(f"note: {note}")


# --------------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------------


def _add_train(sub) -> None:
    from trainer.cli import add_arguments

    p = sub.add_parser("train", help="train a LoRA, DoRA, LoHa or LoKr adapter from a TOML config "
                                     "(datasets/*/train.toml are ready ones)")
    add_arguments(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from trainer.cli import run

    return run(args)


def _add_jobs(sub) -> None:
    p = sub.add_parser("jobs", help="background training jobs: a queue that runs one job after another")
    jsub = p.add_subparsers(dest="jobs_command", required=True, parser_class=_Parser)
    ls = jsub.add_parser("list", help="every job, newest first, with its state and progress")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_jobs_list)
    start = jsub.add_parser("start", help="queue a training run of CONFIG.toml; it runs in the background")
    start.add_argument("config", type=Path)
    start.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.OPTION=VALUE",
                       help="override a config option, e.g. --set training.max_train_steps=20 (repeatable)")
    start.add_argument("--run-dir", type=Path, default=None, help="run directory (default <output.dir>/<name>-<id>)")
    start.add_argument("--json", action="store_true")
    start.set_defaults(func=cmd_jobs_start)
    cancel = jsub.add_parser("cancel", help="remove a queued job, or stop a running one (it saves a checkpoint)")
    cancel.add_argument("job_id")
    cancel.add_argument("--json", action="store_true")
    cancel.set_defaults(func=cmd_jobs_cancel)
    res = jsub.add_parser("resume", help="queue a job that continues a stopped or failed job from its checkpoint")
    res.add_argument("job_id")
    res.add_argument("--json", action="store_true")
    res.set_defaults(func=cmd_jobs_resume)


def _job_dict(job) -> dict:
    d = job.to_dict()
    if job.state != "queued":
        p = job.progress()
        d["progress"] = {"step": p.step, "total_steps": p.total_steps, "eta_s": p.eta_s,
                         "loss": p.losses[-1][1] if p.losses else None, "result": p.result}
    return d


def _print_job(job) -> None:
    text = f"{job.id}  {job.state:<9}  {job.name}"
    if job.state != "queued":
        p = job.progress()
        if p.total_steps:
            text += f"  step {p.step}/{p.total_steps}"
        if job.state == "running" and p.eta_s is not None:
            text += f"  eta {p.eta_s:.0f} s"
        if p.result and p.result.get("ref"):
            text += f"  -> {p.result['ref']}"
    if job.message and job.state not in ("done", "running", "queued"):
        text += f"  ({job.message})"
    print(text)


def cmd_jobs_list(args) -> int:
    from studio.app import jobs

    found = jobs.list_jobs()
    if args.json:
        print(json.dumps([_job_dict(j) for j in found]))
        return 0
    if not found:
        print("no jobs: queue one with lora-studio jobs start CONFIG.toml")
    for job in found:
        _print_job(job)
    return 0


def cmd_jobs_start(args) -> int:
    from studio.app import jobs

    job = jobs.submit(args.config, overrides=args.overrides, run_dir=args.run_dir)
    if args.json:
        print(json.dumps(job.to_dict()))
    else:
        print(f"queued job {job.id} ({job.name}); run directory {job.run_dir}")
    return 0


def cmd_jobs_cancel(args) -> int:
    from studio.app import jobs

    job = jobs.cancel(args.job_id)
    if args.json:
        print(json.dumps(job.to_dict()))
    elif job.state == "cancelled":
        print(f"removed queued job {job.id}")
    elif job.finished:  # its pid belonged to another process: nothing of ours was running
        print(f"job {job.id} is {job.state}: {job.message}")
    else:
        print(f"asked job {job.id} to stop; it saves a checkpoint first (resume it with lora-studio jobs resume)")
    return 0


def cmd_jobs_resume(args) -> int:
    from studio.app import jobs

    job = jobs.resume(args.job_id)
    if args.json:
        print(json.dumps(job.to_dict()))
    else:
        print(f"queued job {job.id}, resuming {args.job_id} in {job.run_dir}")
    return 0


# --------------------------------------------------------------------------------------------
# gc
# --------------------------------------------------------------------------------------------


def _add_gc(sub) -> None:
    from studio.app.cleanup import CATEGORIES, DEFAULT_CATEGORIES, DEFAULT_OLDER_THAN_DAYS

    p = sub.add_parser("gc", help="free disk space: orphan blobs, stale caches, checkpoints of finished runs, "
                                  "inputs no recipe pins, and (when named) old outputs")
    p.add_argument("--dry-run", action="store_true", help="only report what would be freed (count and bytes)")
    p.add_argument("--category", dest="categories", action="append", choices=CATEGORIES, default=None,
                   help=f"clean only this category (repeatable; default: {', '.join(DEFAULT_CATEGORIES)}; "
                        f"outputs, your generated images, only when named)")
    p.add_argument("--older-than", type=_float, default=DEFAULT_OLDER_THAN_DAYS, metavar="DAYS",
                   help=f"leave caches, checkpoints, inputs and outputs younger than this many days "
                        f"(default {DEFAULT_OLDER_THAN_DAYS:g}; 0: any age)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_gc)


def cmd_gc(args) -> int:
    from studio.app.cleanup import DEFAULT_CATEGORIES, collect, human_bytes

    report = collect(categories=tuple(args.categories or DEFAULT_CATEGORIES), older_than_days=args.older_than,
                     dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    verb = "would free" if report.dry_run else "freed"
    for name, part in report.categories.items():
        print(f"{name:<12} {part.count:>6} {'item' if part.count == 1 else 'items'}  {human_bytes(part.bytes)}")
    print(f"{'total':<12} {report.count:>6} {'item' if report.count == 1 else 'items'}  {human_bytes(report.bytes)}"
          f" ({verb}; older than {report.older_than_days:g} days where age counts)")
    for line in report.kept:
        print(f"kept: {line}")
    return 0


# --------------------------------------------------------------------------------------------
# ui
# --------------------------------------------------------------------------------------------


def _add_ui(sub) -> None:
    p = sub.add_parser("ui", help="start the Streamlit studio (binds 127.0.0.1 unless --address is given)")
    p.add_argument("--address", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                                                          "another address needs --allow-remote)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow an address other machines can reach; the studio has no login, so prefer an SSH "
                        "tunnel or an authenticating reverse proxy (README: 'Behind a login')")
    p.add_argument("--port", type=_int, default=8501)
    p.add_argument("--headless", action="store_true", help="never open a browser (the default unless --browser)")
    p.add_argument("--browser", action="store_true", help="open the studio in this machine's web browser")
    p.set_defaults(func=cmd_ui)


def app_path() -> Path:
    from studio.core.settings import PROJECT_ROOT

    return PROJECT_ROOT / "app_streamlit.py"


# Uploads up to 2048 MB: a dataset zip may expand to 2 GiB (studio.app.dataset_files.MAX_EXPANDED_BYTES)
# and an SDXL LoRA file is up to ~1.7 GB. Streamlit keeps an upload in the server's memory.
UI_MAX_UPLOAD_MB = 2048


def _is_loopback(address: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost); a host name
    other than localhost may resolve to anything, so it counts as remote."""
    import ipaddress

    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def cmd_ui(args) -> int:
    from studio.core.errors import InvalidRequestError
    from studio.core.errors import StudioError as _E

    app = app_path()
    if not app.exists():
        raise _E(f"{app} is missing: install the studio from its source folder (pip install -e .)")
    if not _is_loopback(args.address):
        if not args.allow_remote:
            raise InvalidRequestError(
                f"--address {args.address} lets other machines open the studio, which has no login: keep "
                f"127.0.0.1 and use an SSH tunnel or an authenticating reverse proxy (README: 'Behind a login'), "
                f"or pass --allow-remote")
        print(f"warning: the studio listens on {args.address}:{args.port} with no login: anyone who reaches it can "
              f"generate, train and read and write the data roots; put it behind an SSH tunnel or an "
              f"authenticating reverse proxy (README: 'Behind a login')", file=sys.stderr)
    argv = [
        sys.executable, "-m", "streamlit", "run", str(app),
        "--server.address", args.address,
        "--server.port", str(args.port),
        "--browser.gatherUsageStats", "false",
        # No file watcher: it walks the whole project tree (inotify overflows) and reruns pages
        # when files change; a studio is not a development server.
        "--server.fileWatcherType", "none",
        "--client.toolbarMode", "minimal",
        # Visitors see the pages' own one-line errors; an uncaught exception shows a generic message,
        # its traceback goes to this console only ("false" would still show tracebacks).
        "--client.showErrorDetails", "none",
        "--server.maxUploadSize", str(UI_MAX_UPLOAD_MB),
    ]
    # Headless unless asked: no browser launch and no first-run e-mail prompt on a server.
    argv += ["--server.headless", "false" if args.browser and not args.headless else "true"]
    os.execv(sys.executable, argv)  # replace this process: Ctrl+C reaches Streamlit directly
    return 0  # pragma: no cover


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lora-studio", description="Train, catalog and combine LoRA adapters for diffusion models.")
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' own log lines and warnings on stderr (default: "
                             "$LORA_STUDIO_HOME/logs/libraries.log; also LORA_STUDIO_VERBOSE=1)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_ui(sub)
    _add_generate(sub)
    _add_grid(sub)
    _add_base_models(sub)
    _add_adapters(sub)
    _add_datasets(sub)
    _add_train(sub)
    _add_jobs(sub)
    _add_gc(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_third_party(verbose=True if args.verbose else None)
    try:
        return int(args.func(args) or 0)
    except StudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
