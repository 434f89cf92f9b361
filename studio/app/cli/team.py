"""``lora-studio team submit|list|cancel|resume`` and ``lora-studio worker``: the training queue a team's
machines share through the registry's PostgreSQL database (studio.app.workers)."""

from __future__ import annotations

from pathlib import Path

from studio.app.cli.common import Parser, number
from studio.app.cli.output import print_json, print_line, print_result


def register(sub) -> None:
    """Add ``team`` and ``worker`` to the ``lora-studio`` subcommands."""
    p = sub.add_parser("team", help="the team's training queue on the PostgreSQL registry, run by workers on any "
                                    "machine")
    tsub = p.add_subparsers(dest="team_command", required=True, parser_class=Parser)
    submit = tsub.add_parser("submit", help="queue a training run of CONFIG.toml for any worker (its dataset and "
                                            "run folder on a path every machine sees)")
    submit.add_argument("config", type=Path)
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.OPTION=VALUE",
                        help="override a config option (repeatable)")
    submit.add_argument("--run-dir", type=Path, default=None,
                        help="run folder on the shared path (default <output.dir>/<name>-<id>)")
    submit.add_argument("--json", action="store_true")
    submit.set_defaults(func=cmd_team_submit)
    ls = tsub.add_parser("list", help="every team job, newest first: state, machine, attempts")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_team_list)
    cancel = tsub.add_parser("cancel", help="cancel a queued job, or stop a running one on whichever machine runs it")
    cancel.add_argument("job_id")
    cancel.add_argument("--json", action="store_true")
    cancel.set_defaults(func=cmd_team_cancel)
    resume = tsub.add_parser("resume", help="queue a stopped, failed or cancelled job again; the worker that "
                                            "takes it resumes from the run's newest checkpoint")
    resume.add_argument("job_id")
    resume.add_argument("--json", action="store_true")
    resume.set_defaults(func=cmd_team_resume)

    w = sub.add_parser("worker", help="take training jobs from the team's queue and run them, until stopped "
                                      "(SIGTERM or Ctrl-C: the running job stops at a checkpoint and goes back to "
                                      "the queue)")
    w.add_argument("--once", action="store_true", help="stop when nothing is left to take")
    w.add_argument("--poll", type=number, default=2.0, help="seconds between looks at an empty queue")
    w.add_argument("--heartbeat", type=number, default=None, help="seconds between heartbeats (default 5)")
    w.add_argument("--stale-after", type=number, default=None,
                   help="seconds without a heartbeat after which a job's worker counts as gone and the job is "
                        "resumed elsewhere (default 30)")
    w.set_defaults(func=cmd_worker)


def _queue():
    from studio.app.workers import TeamQueue  # SQLAlchemy, the trainer's config: only when asked

    return TeamQueue()


def cmd_team_submit(args) -> int:
    with _queue() as queue:
        job = queue.submit(args.config, overrides=args.overrides, run_dir=args.run_dir)
    print_result(args.json, job.to_dict(), f"queued team job {job.id} ({job.name}); run folder {job.run_dir}")
    return 0


def cmd_team_list(args) -> int:
    with _queue() as queue:
        found = queue.jobs()
    if args.json:
        print_json([j.to_dict() for j in found])
        return 0
    if not found:
        print_line("no team jobs: queue one with lora-studio team submit CONFIG.toml")
    for j in found:
        where = f" on {j.machine}" if j.machine else ""
        tries = f", {len(j.attempts)} attempts" if len(j.attempts) > 1 else ""
        note = f" ({j.message})" if j.message and j.state not in ("done", "running") else ""
        print_line(f"{j.id}  {j.state:<9}  {j.name}{where}{tries}  by {j.submitted_by}{note}")
    return 0


def cmd_team_cancel(args) -> int:
    with _queue() as queue:
        job = queue.cancel(args.job_id)
    text = (f"cancelled queued team job {job.id}" if job.state == "cancelled" else
            f"asked {job.worker} to stop team job {job.id}; it saves a checkpoint first")
    print_result(args.json, job.to_dict(), text)
    return 0


def cmd_team_resume(args) -> int:
    with _queue() as queue:
        job = queue.resume(args.job_id)
    print_result(args.json, job.to_dict(), f"queued team job {job.id} ({job.name}) again; the worker that takes "
                                           f"it resumes from its newest checkpoint")
    return 0


def cmd_worker(args) -> int:
    from studio.app.workers import HEARTBEAT_S, STALE_AFTER_S, run_worker
    from studio.core.errors import InvalidRequestError

    heartbeat, stale = args.heartbeat or HEARTBEAT_S, args.stale_after or STALE_AFTER_S
    # The trainer is stopped after stale / 2 without a heartbeat getting through: a third leaves room for
    # one slow or lost heartbeat before that.
    if heartbeat <= 0 or heartbeat * 3 > stale:
        raise InvalidRequestError(f"--heartbeat {heartbeat:g} must be above 0 and at most a third of --stale-after "
                                  f"{stale:g}, or other workers would count this one gone between its heartbeats")
    with _queue() as queue:
        run_worker(queue, once=args.once, poll_s=args.poll, heartbeat_s=heartbeat, stale_after_s=stale,
                   log=print_line)
    return 0
