"""``lora-studio base-models list|export``: the base models the studio can use, and single-file export."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from studio.app.cli.common import Parser, quiet_libraries
from studio.app.cli.output import print_json, print_line, print_result
from studio.core.base_models import export_single_file, list_base_models
from studio.core.errors import InvalidRequestError
from studio.core.single_file import DTYPES


def register(sub) -> None:
    """Add ``base-models`` and its subcommands to the ``lora-studio`` subcommands."""
    p = sub.add_parser("base-models", help="base models the studio can use")
    bsub = p.add_subparsers(dest="base_models_command", required=True, parser_class=Parser)
    ls = bsub.add_parser("list", help="list the embedded model and the models in $LORA_STUDIO_HOME/models")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_base_models_list)
    ex = bsub.add_parser("export", help="write a base model as one .safetensors file in the A1111/ComfyUI layout")
    ex.add_argument("src", help="base model: tiny, a folder, a .safetensors file, a Hub id")
    ex.add_argument("out", type=Path, help="the .safetensors file to write")
    ex.add_argument("--dtype", choices=DTYPES, default=None, help="convert the weights (default: as loaded)")
    ex.add_argument("--force", action="store_true", help="replace OUT if it exists")
    ex.add_argument("--json", action="store_true", help="print {path, size_bytes}")
    ex.set_defaults(func=cmd_base_models_export)


def cmd_base_models_list(args) -> int:
    rows = list_base_models()
    if args.json:
        print_json([asdict(r) for r in rows])
        return 0
    width = max(len(r.ref) for r in rows)
    for r in rows:
        print_line(f"{r.ref:<{width}}  {r.family:<5} {r.kind:<12} {r.description}")
    return 0


def cmd_base_models_export(args) -> int:
    # Checked before loading anything: a checkpoint can take minutes to load, and replacing a
    # multi-GB file by mistake is worse.
    if args.out.exists() and not args.force:
        raise InvalidRequestError(f"{args.out} already exists: pass --force to replace it")
    quiet_libraries()
    path = export_single_file(args.src, args.out, dtype=args.dtype)
    print_result(args.json, {"path": str(path), "size_bytes": path.stat().st_size}, path)
    return 0
