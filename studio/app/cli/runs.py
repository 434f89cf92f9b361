"""``lora-studio runs list|show|register``: training runs and their checkpoints as candidates (studio.app.runs)."""

from __future__ import annotations

from studio.app import runs
from studio.app.cli.common import Parser, open_registry, whole_number
from studio.app.cli.output import print_json, print_line, print_result, print_table


def register(sub) -> None:
    """Add ``runs`` and its subcommands to the ``lora-studio`` subcommands."""
    p = sub.add_parser("runs", help="training runs: every checkpoint with its losses, and registering any of them")
    rsub = p.add_subparsers(dest="runs_command", required=True, parser_class=Parser)
    ls = rsub.add_parser("list", help="every run, newest first: state, steps, checkpoints and the best one")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_runs_list)
    show = rsub.add_parser("show", help="a run's checkpoints: step, training loss, validation loss, samples")
    show.add_argument("run", help="a run's folder name (runs list), a job id, or a run directory")
    show.add_argument("--json", action="store_true",
                      help="print {run, name, base_model, state, best_step, checkpoints: [{step, val_loss, ...}]}")
    show.set_defaults(func=cmd_runs_show)
    reg = rsub.add_parser("register", help="register one checkpoint of a run as a new adapter version")
    reg.add_argument("run", help="a run's folder name (runs list), a job id, or a run directory")
    reg.add_argument("--step", required=True, type=whole_number, help="the checkpoint's step (runs show lists them)")
    reg.add_argument("--name", default=None, help="adapter name (default: the run's output.name)")
    reg.add_argument("--json", action="store_true")
    reg.set_defaults(func=cmd_runs_register)


def _loss(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def cmd_runs_list(args) -> int:
    found = runs.list_runs()
    if args.json:
        print_json([s.to_dict() for s in found])
        return 0
    if not found:
        print_line("no runs yet: train one with lora-studio train CONFIG.toml (or the Train page)")
        return 0
    rows = []
    for s in found:
        best = s.best
        rows.append([s.run, s.name, s.state, f"{s.step}/{s.total_steps or '?'}", str(len(s.candidates)),
                     f"step {best.step} ({best.val_loss:.4f})" if best else "-"])
    print_table(["run", "adapter", "state", "steps", "checkpoints", "best val_loss"], rows)
    return 0


def cmd_runs_show(args) -> int:
    summary = runs.run_summary(runs.find_run(args.run))
    if args.json:
        print_json(summary.to_dict())
        return 0
    print_line(f"{summary.run}: {summary.name} on {summary.base_model}, {summary.state}, step {summary.step}/"
               f"{summary.total_steps or '?'}  ({summary.run_dir})")
    if not summary.candidates:
        print_line("no checkpoints yet (one comes every output.checkpointing_steps, and one at the end)")
        return 0
    rows = [[str(c.step) + (" final" if c.final else ""), _loss(c.loss), _loss(c.val_loss),
             "best" if c.best else "", str(len(c.samples)), c.ref or ""] for c in summary.candidates]
    print_table(["step", "loss", "val_loss", "", "samples", "registered"], rows)
    print_line(f"register one: lora-studio runs register {summary.run} --step N; compare them: lora-studio grid "
               f"PROMPT --x checkpoint={summary.run} --y strength=0.5,1 --out DIR")
    return 0


def cmd_runs_register(args) -> int:
    with open_registry() as reg:
        result = runs.register_checkpoint(reg, args.run, args.step, name=args.name)
    version = result.version
    text = (f"registered {version.ref} from step {args.step} of {args.run}" if result.created
            else f"step {args.step} of {args.run} is {version.ref} already")
    print_result(args.json, {"ref": version.ref, "created": result.created, "step": args.step}, text)
    return 0
