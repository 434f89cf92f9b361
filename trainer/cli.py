"""The ``train`` command line, shared by ``python -m trainer``, ``accelerate launch -m trainer`` and
``lora-studio train``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from studio.core.errors import ConfigError, StudioError, TrainingDivergedError
from studio.core.thirdparty import quiet_third_party
from trainer.config import TrainConfig
from trainer.events import CONFIG_FILE
from trainer.loop import find_resume_point, record_failure, train

EXIT_STOPPED = {"SIGINT": 130, "SIGTERM": 143}


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("config", nargs="?", help="training config (TOML), e.g. datasets/striped/train.toml; optional "
                                             "with --resume DIR (the run's own config.toml is used)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.OPTION=VALUE",
                   help="override one option, e.g. --set network.rank=8 (repeatable)")
    p.add_argument("--resume", metavar="latest|DIR",
                   help="continue from the newest checkpoint ('latest') or of a run directory / checkpoint folder")
    p.add_argument("--run-dir", metavar="DIR", help="run directory to use (default: a new one under output.dir)")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.add_argument("--no-register", action="store_true", help="keep the adapter in the run directory only")
    return p


def _load_config(args):
    if args.config:
        config = TrainConfig.from_toml(args.config)
    elif args.resume:
        if args.resume == "latest" and not args.run_dir:
            raise ConfigError("--resume latest without a config needs --run-dir DIR (the run to continue)")
        point = find_resume_point(args.resume, None, args.run_dir)
        config = TrainConfig.from_toml(point.parent.parent / CONFIG_FILE)
        if args.run_dir is None:
            args.run_dir = str(point.parent.parent)
    else:
        raise ConfigError("give a training config (TOML), e.g. lora-studio train datasets/striped/train.toml")
    return config.apply_overrides(args.overrides) if args.overrides else config


def run(args) -> int:
    """Run the command; returns the exit code (0 done, 1 failed, 2 bad input, 130/143 stopped)."""
    try:
        config = _load_config(args)
        result = train(config, run_dir=args.run_dir, resume=args.resume, register=not args.no_register)
    except StudioError as e:
        if args.run_dir and not (Path(args.run_dir) / "result.json").exists():
            record_failure(args.run_dir, str(e))
        print(f"error: {e}", file=sys.stderr)
        if args.json:
            print(json.dumps({"status": "failed", "message": str(e), "run_dir": args.run_dir}))
        return 1 if isinstance(e, TrainingDivergedError) else 2
    if result.status == "done":
        where = f"registered as {result.ref}" if result.ref else "kept in the run directory"
        print(f"done: {result.steps} steps, loss {result.final_loss}, adapter {result.adapter} ({where})",
              file=sys.stderr)
    else:
        print(result.message, file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict()))
    sys.stdout.flush()
    sys.stderr.flush()
    if result.status == "stopped":
        return EXIT_STOPPED.get(result.stopped_by or "", 130)
    return 0


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()
    parser = add_arguments(argparse.ArgumentParser(prog="python -m trainer",
                                                   description="Train a LoRA (or DoRA, LoHa, LoKr) adapter."))
    return run(parser.parse_args(argv))
