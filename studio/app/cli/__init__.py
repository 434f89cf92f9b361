"""The ``lora-studio`` command: a thin face over the library, like the Streamlit app.

One module per command group registers its subcommands and runs them; every line they print goes
through :mod:`studio.app.cli.output`. This module builds the parser, applies the global ``--verbose``
flag and turns a :class:`~studio.core.errors.StudioError` into one line on stderr and exit status 2,
never a traceback.

    common.py       the parser class, number arguments, the progress-bar silencer
    output.py       lines, fields, tables, JSON, warnings and errors on the console
    generate.py     generate, grid
    adapters.py     adapters list|show|tag|untag|import|export|publish|pull|delete|merge
    datasets.py     datasets check
    train.py        train (trainer.cli's flags)
    jobs.py         jobs list|start|cancel|resume
    runs.py         runs list|show|register (checkpoints as candidates)
    team.py         team submit|list|cancel, worker (the team's queue on PostgreSQL)
    base_models.py  base-models list|export
    gc.py           gc
    ui.py           ui

Heavy libraries (torch, diffusers, SQLAlchemy, huggingface_hub, PIL) are imported inside the commands
that need them, so ``lora-studio --help`` and ``base-models list`` start fast.
"""

from __future__ import annotations

import argparse

from studio.app.cli import adapters, base_models, datasets, gc, generate, jobs, runs, team, train, ui
from studio.app.cli.common import EXIT_USAGE, Parser
from studio.app.cli.output import print_error, print_line
from studio.core.errors import StudioError
from studio.core.thirdparty import quiet_third_party

__all__ = ["EXIT_USAGE", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``lora-studio`` parser; each command's ``func`` default is the function that runs it."""
    parser = Parser(prog="lora-studio", description="Train, catalog and combine LoRA adapters for diffusion models.")
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' own log lines and warnings on stderr (default: "
                             "$LORA_STUDIO_HOME/logs/libraries.log; also LORA_STUDIO_VERBOSE=1)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    # The order of `lora-studio --help`: ui, generate, grid, base-models, adapters, datasets, train, jobs, runs, team,
    # worker, gc.
    for group in (ui, generate, base_models, adapters, datasets, train, jobs, runs, team, gc):
        group.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``lora-studio`` command; returns its exit status (2: bad input, 130: interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_third_party(verbose=True if args.verbose else None)
    try:
        return int(args.func(args) or 0)
    except StudioError as e:
        print_error(e)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print_line("interrupted", err=True)
        return 130
