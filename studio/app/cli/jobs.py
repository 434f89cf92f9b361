"""``lora-studio jobs list|start|cancel|resume``: the background training queue (studio.app.jobs)."""

from __future__ import annotations

from pathlib import Path

from studio.app import jobs
from studio.app.cli.common import Parser
from studio.app.cli.output import print_json, print_line, print_result


def register(sub) -> None:
    """Add ``jobs`` and its subcommands to the ``lora-studio`` subcommands."""
    p = sub.add_parser("jobs", help="background training jobs: a queue that runs one job after another")
    jsub = p.add_subparsers(dest="jobs_command", required=True, parser_class=Parser)
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
                         "loss": p.losses[-1][1] if p.losses else None, "result": p.result, "notes": p.notes}
    return d


def _job_line(job) -> str:
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
    return text


def cmd_jobs_list(args) -> int:
    found = jobs.list_jobs()
    if args.json:
        print_json([_job_dict(j) for j in found])
        return 0
    if not found:
        print_line("no jobs: queue one with lora-studio jobs start CONFIG.toml")
    for job in found:
        print_line(_job_line(job))
    return 0


def cmd_jobs_start(args) -> int:
    job = jobs.submit(args.config, overrides=args.overrides, run_dir=args.run_dir)
    print_result(args.json, job.to_dict(), f"queued job {job.id} ({job.name}); run directory {job.run_dir}")
    return 0


def cmd_jobs_cancel(args) -> int:
    job = jobs.cancel(args.job_id)
    if args.json:
        print_json(job.to_dict())
    elif job.state == "cancelled":
        print_line(f"removed queued job {job.id}")
    elif job.finished:  # its pid belonged to another process: nothing of ours was running
        print_line(f"job {job.id} is {job.state}: {job.message}")
    else:
        print_line(f"asked job {job.id} to stop; it saves a checkpoint first (resume it with lora-studio jobs resume)")
    return 0


def cmd_jobs_resume(args) -> int:
    job = jobs.resume(args.job_id)
    print_result(args.json, job.to_dict(), f"queued job {job.id}, resuming {args.job_id} in {job.run_dir}")
    return 0
