"""Training jobs shared by a team's machines: a queue in the registry's PostgreSQL database, taken by
``lora-studio worker`` processes on any machine.

The on-disk queue (``studio.app.jobs``) stays the default for one machine; this one is for a team
whose registry is PostgreSQL (``LORA_STUDIO_REGISTRY_URL``) and whose datasets and run folders lie on
a path every machine sees (NFS, a shared volume). Holds :class:`TeamQueue` (submit, resume, claim, heartbeat,
finish, cancel, list) and :func:`run_worker` (the worker's loop).

- Claiming is one transaction: ``SELECT ... FOR UPDATE SKIP LOCKED`` takes the oldest claimable job,
  so two workers never take the same one and neither waits on the other's row.
- A running job has a worker (``host:pid``) and a heartbeat the worker refreshes every few seconds.
  A heartbeat older than ``stale_after_s`` means the worker died (killed, machine lost): the job is
  claimable again, and the next worker resumes it from the newest checkpoint in its run folder (the
  trainer's resume is bit-exact, so the adapter equals an uninterrupted run's). The trainer dies with
  its worker (``PR_SET_PDEATHSIG`` on Linux), as it would with the machine, so two never write one run.
- Cancel sets a flag on the row; the worker holding the job reads it with its next heartbeat and
  sends the trainer SIGTERM (it saves a checkpoint and stops), wherever that worker runs.
- Every attempt is kept in the row's ``attempts`` list: the machine, the worker, when and how it ended.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from studio.app.jobs import read_tail, trainer_argv
from studio.core.errors import DatasetNotFoundError, InvalidRequestError, StudioError
from studio.core.settings import get_settings
from trainer.config import TrainConfig
from trainer.events import RESULT_FILE, run_state
from trainer.loop import list_checkpoints

STATES = ("queued", "running", "done", "stopped", "failed", "cancelled")
FINISHED = ("done", "stopped", "failed", "cancelled")
HEARTBEAT_S = 5.0
# A worker that missed six heartbeats is gone: its job goes to the next worker that asks.
STALE_AFTER_S = 30.0
WORKER_LOG = "worker-log.txt"  # in the run folder: every attempt's trainer output, appended
PREVIOUS_RESULT = "result.previous.json"  # the last attempt's result.json, set aside when the next starts

METADATA = sa.MetaData()
team_jobs = sa.Table(
    "team_jobs", METADATA,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("config_toml", sa.Text, nullable=False),  # the config snapshot, paths absolute
    sa.Column("run_dir", sa.String(1024), nullable=False),  # on the shared path
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("submitted_by", sa.String(256), nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("machine", sa.String(256)),  # the machine running it now, or that ran it last
    sa.Column("worker", sa.String(256)),  # host:pid of that worker
    sa.Column("heartbeat_at", sa.DateTime),
    # Until when the worker holding it counts as alive: the last heartbeat plus that worker's own
    # --stale-after, so a worker started with a longer patience is not robbed by one with a shorter.
    sa.Column("lease_until", sa.DateTime),
    sa.Column("ended_at", sa.DateTime),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("cancelled_by", sa.String(256)),  # who asked (LORA_STUDIO_USER, else the OS user)
    sa.Column("message", sa.Text),
    sa.Column("attempts", postgresql.JSONB, nullable=False),
    sa.Index("ix_team_jobs_state_created", "state", "created_at"),
)


# Columns added since the table's first version, with their PostgreSQL types: an existing queue gains them.
ADDED_COLUMNS = {"lease_until": "TIMESTAMP", "cancelled_by": "VARCHAR(256)"}


class TeamJobNotFoundError(StudioError, KeyError):
    """No team job has this id."""

    __str__ = Exception.__str__


@dataclass(frozen=True)
class TeamJob:
    id: str
    name: str
    run_dir: str
    state: str
    submitted_by: str
    created_at: datetime
    machine: str | None
    worker: str | None
    heartbeat_at: datetime | None
    ended_at: datetime | None
    cancel_requested: bool
    message: str | None
    attempts: list
    config_toml: str = ""
    cancelled_by: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def progress(self):
        """The run's :class:`trainer.events.RunState`, read from its folder on the shared path (as a local
        job's ``progress``)."""
        return run_state(self.run_dir)

    def log_tail(self, max_chars: int = 4000) -> str:
        """The end of the trainer's output, which the worker running it appends to ``worker-log.txt``."""
        return read_tail(Path(self.run_dir) / WORKER_LOG, max_chars)

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "run_dir": self.run_dir, "state": self.state,
                "submitted_by": self.submitted_by, "created_at": _iso(self.created_at), "machine": self.machine,
                "worker": self.worker, "heartbeat_at": _iso(self.heartbeat_at), "ended_at": _iso(self.ended_at),
                "cancel_requested": self.cancel_requested, "cancelled_by": self.cancelled_by, "message": self.message,
                "attempts": self.attempts}


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.replace(tzinfo=UTC).isoformat()


def _now(conn: sa.Connection) -> datetime:
    """The database server's time, naive UTC (as the registry stores times). Every machine's heartbeat and
    every staleness test read this one clock: with each machine's own, a worker whose clock ran 40 s
    ahead would find every other worker's heartbeat stale and take their jobs."""
    return conn.execute(sa.select(sa.func.timezone("UTC", sa.func.now()))).scalar_one()


GONE_CANCELLED = ("cancelled by {by} after its worker had stopped beating; its checkpoints stay (lora-studio team "
                  "resume)")


def _lease_over(now: datetime):
    """Running rows whose holder's lease ran out (rows from before leases: their heartbeat is too old)."""
    return sa.or_(team_jobs.c.lease_until < now,
                  sa.and_(team_jobs.c.lease_until.is_(None),
                          team_jobs.c.heartbeat_at < now - timedelta(seconds=STALE_AFTER_S)))


def _end_attempt(attempts: list, now: datetime, how: str) -> list:
    """The attempts with the last one ended ``how`` at ``now``."""
    attempts = list(attempts)
    if attempts:
        attempts[-1] = {**attempts[-1], "ended_at": _iso(now), "how": how}
    return attempts


def _job(row) -> TeamJob:
    return TeamJob(**{c: getattr(row, c) for c in (
        "id", "name", "run_dir", "state", "submitted_by", "created_at", "machine", "worker", "heartbeat_at",
        "ended_at", "cancel_requested", "message", "attempts", "config_toml", "cancelled_by")})


def is_team_registry(url: str | None) -> bool:
    """Whether a registry at ``url`` can hold the team's queue: only PostgreSQL has the row locks
    (``SKIP LOCKED``) that let workers on several machines claim jobs without a coordinator."""
    return bool(url) and sa.engine.make_url(url).get_backend_name() == "postgresql"


def _said_plainly(method):
    """For what users call (the CLI, the Train page): a database that does not answer becomes one clear
    error naming it, not a driver's traceback. Workers call the raw queries and retry instead."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as e:
            first = str(getattr(e, "orig", e)).strip().splitlines()[0]
            raise StudioError(f"cannot reach the team's queue in {self.engine.url.render_as_string(hide_password=True)}"
                              f" ({first}): check that the database server is up and try again") from None

    return wrapper


class TeamQueue:
    """The team's training queue in the PostgreSQL database at ``url`` (default the registry's)."""

    def __init__(self, url: str | None = None) -> None:
        url = url or get_settings().registry_url
        if not is_team_registry(url):
            raise InvalidRequestError("a team queue needs the registry on PostgreSQL: set LORA_STUDIO_REGISTRY_URL "
                                      "to postgresql+psycopg://... (one machine uses lora-studio jobs instead)")
        # A worker must learn within seconds that the database is gone, not after TCP's minutes: a bounded
        # connect, keepalives and (libpq's) TCP user timeout on the socket, and statement and lock timeouts
        # on the server. Ignored on a Unix socket, which fails at once.
        self.engine = sa.create_engine(url, pool_pre_ping=True, connect_args={
            "connect_timeout": 10, "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
            "keepalives_count": 3, "tcp_user_timeout": 10_000,
            "options": "-c statement_timeout=20000 -c lock_timeout=10000"})
        try:
            try:
                METADATA.create_all(self.engine)  # checkfirst: every worker may be the first
            except (sa.exc.ProgrammingError, sa.exc.IntegrityError):
                METADATA.create_all(self.engine)  # another worker created the table between check and CREATE
            have = {c["name"] for c in sa.inspect(self.engine).get_columns("team_jobs")}
            if missing := [name for name in ADDED_COLUMNS if name not in have]:
                with self.engine.begin() as conn:  # a queue made by an earlier version: the columns, added in place
                    for name in missing:
                        conn.execute(sa.text(f"ALTER TABLE team_jobs ADD COLUMN IF NOT EXISTS {name} "
                                             f"{ADDED_COLUMNS[name]}"))
        except sa.exc.OperationalError as e:
            self.engine.dispose()
            raise StudioError(f"cannot open the team's queue in {self.engine.url.render_as_string(hide_password=True)}"
                              f": {e.orig}; check LORA_STUDIO_REGISTRY_URL and that the server is up") from None

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> TeamQueue:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- what users do ------------------------------------------------------------------------

    @_said_plainly
    def submit(self, config: str | Path | TrainConfig, *, overrides=(), run_dir: str | Path | None = None,
               submitted_by: str | None = None) -> TeamJob:
        """Queue a training run for any worker. The config is checked now and stored whole; its dataset and
        ``run_dir`` must lie on a path every worker's machine sees."""
        if isinstance(config, (str, Path)):
            config = TrainConfig.from_toml(config)
        if overrides:
            config = config.apply_overrides(list(overrides))
        resolved = config.resolved()
        if not Path(resolved.dataset.path).exists():
            raise DatasetNotFoundError(f"dataset.path {resolved.dataset.path} does not exist: choose a dataset folder "
                                       f"on the team's shared path")
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        run_dir = Path(run_dir or Path(resolved.output.dir) / f"{resolved.output.name}-{job_id}").expanduser().resolve()
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise InvalidRequestError(f"run folder {run_dir} is not empty: each team job trains in a folder of its "
                                      f"own (leave --run-dir out for a new one); resume a stopped job with "
                                      f"lora-studio team resume")
        with tempfile.TemporaryDirectory(prefix="lora-studio-team-") as tmp:
            snapshot = config.save(Path(tmp) / "config.toml").read_text()
        with self.engine.begin() as conn:
            other = conn.execute(sa.select(team_jobs.c.id).where(team_jobs.c.run_dir == str(run_dir))).scalar()
            if other is not None:
                raise InvalidRequestError(f"run folder {run_dir} belongs to team job {other}: each job trains in a "
                                          f"folder of its own")
            conn.execute(sa.insert(team_jobs).values(
                id=job_id, name=resolved.output.name, config_toml=snapshot, run_dir=str(run_dir),
                state="queued", submitted_by=submitted_by or get_settings().user, created_at=_now(conn),
                attempts=[]))
        return self.get(job_id)

    @_said_plainly
    def get(self, job_id: str) -> TeamJob:
        return self._get(job_id)

    def _get(self, job_id: str) -> TeamJob:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(team_jobs).where(team_jobs.c.id == job_id)).first()
        if row is None:
            raise TeamJobNotFoundError(f"no team job {job_id!r}: lora-studio team list shows them")
        return _job(row)

    @_said_plainly
    def jobs(self, *, limit: int | None = None) -> list[TeamJob]:
        """Every job (the newest ``limit`` when given), newest first."""
        query = sa.select(team_jobs).order_by(team_jobs.c.created_at.desc(), team_jobs.c.id)
        with self.engine.connect() as conn:
            rows = conn.execute(query if limit is None else query.limit(limit)).all()
        return [_job(r) for r in rows]

    @_said_plainly
    def cancel(self, job_id: str, *, by: str | None = None) -> TeamJob:
        """A queued job is cancelled at once; a running one is flagged, and the worker holding it (on
        whichever machine) stops its trainer at its next heartbeat, keeping a checkpoint. ``by``: who asks
        (default the configured user), kept with the job and in its message."""
        by = by or get_settings().user
        with self.engine.begin() as conn:
            now = _now(conn)
            row = conn.execute(sa.select(team_jobs, _lease_over(now).label("lease_over"))
                               .where(team_jobs.c.id == job_id).with_for_update()).first()
            if row is None:
                raise TeamJobNotFoundError(f"no team job {job_id!r}: lora-studio team list shows them")
            if row.state in FINISHED:
                raise InvalidRequestError(f"team job {job_id} already ended ({row.state}): nothing to cancel")
            if row.state == "queued":
                conn.execute(sa.update(team_jobs).where(team_jobs.c.id == job_id).values(
                    state="cancelled", ended_at=now, cancelled_by=by, message=f"cancelled by {by} before a worker "
                                                                              f"took it"))
            elif row.lease_over:  # no worker holds it any more: nobody would read the flag
                conn.execute(sa.update(team_jobs).where(team_jobs.c.id == job_id).values(
                    state="stopped", ended_at=now, attempts=_end_attempt(row.attempts, now, "lost (no heartbeat)"),
                    cancelled_by=by, message=GONE_CANCELLED.format(by=by)))
            else:
                conn.execute(sa.update(team_jobs).where(team_jobs.c.id == job_id).values(cancel_requested=True,
                                                                                         cancelled_by=by))
        return self.get(job_id)

    @_said_plainly
    def resume(self, job_id: str) -> TeamJob:
        """Queue a stopped, failed or cancelled job again: the next worker to take it resumes its run from
        the newest checkpoint in its run folder (or starts it, if none was kept). Its attempts stay."""
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(team_jobs).where(team_jobs.c.id == job_id).with_for_update()).first()
            if row is None:
                raise TeamJobNotFoundError(f"no team job {job_id!r}: lora-studio team list shows them")
            if row.state not in ("stopped", "failed", "cancelled"):
                raise InvalidRequestError(f"team job {job_id} is {row.state}: only a stopped, failed or cancelled "
                                          f"job can be resumed")
            conn.execute(sa.update(team_jobs).where(team_jobs.c.id == job_id).values(
                state="queued", ended_at=None, message=None, cancel_requested=False, cancelled_by=None,
                heartbeat_at=None, lease_until=None))
        return self.get(job_id)

    # ---- what workers do ----------------------------------------------------------------------

    def claim(self, worker: str, machine: str, *, stale_after_s: float = STALE_AFTER_S) -> tuple[TeamJob, bool] | None:
        """Take the oldest queued job, or a running one whose worker's lease ran out; (job, resume) where
        ``resume`` says a previous attempt left checkpoints to continue from. None when nothing is claimable.
        ``stale_after_s`` is this worker's lease: how long others wait after its last heartbeat. A job
        cancelled while its worker was gone is settled as stopped, not started."""
        with self.engine.begin() as conn:
            now = _now(conn)
            while True:
                row = conn.execute(
                    sa.select(team_jobs)
                    .where(sa.or_(team_jobs.c.state == "queued", sa.and_(team_jobs.c.state == "running",
                                                                          _lease_over(now))))
                    .order_by(team_jobs.c.created_at, team_jobs.c.id)
                    .limit(1).with_for_update(skip_locked=True)).first()
                if row is None:
                    return None
                if row.state == "running" and row.cancel_requested:
                    conn.execute(sa.update(team_jobs).where(team_jobs.c.id == row.id).values(
                        state="stopped", ended_at=now, message=GONE_CANCELLED.format(by=row.cancelled_by),
                        attempts=_end_attempt(row.attempts, now, "lost (no heartbeat)")))
                    continue
                break
            attempts = list(row.attempts)
            if row.state == "running":
                attempts = _end_attempt(attempts, now, "lost (no heartbeat)")
            attempts.append({"machine": machine, "worker": worker, "started_at": _iso(now), "ended_at": None,
                             "how": None})
            conn.execute(sa.update(team_jobs).where(team_jobs.c.id == row.id).values(
                state="running", machine=machine, worker=worker, heartbeat_at=now,
                lease_until=now + timedelta(seconds=stale_after_s), attempts=attempts))
        job = self._get(row.id)
        try:
            resume = bool(list_checkpoints(job.run_dir))
        except OSError:
            resume = False  # an unreadable run folder: the attempt fails with the trainer's own words
        return job, resume

    def heartbeat(self, job_id: str, worker: str, *, stale_after_s: float = STALE_AFTER_S) -> str:
        """Refresh the job's heartbeat and this worker's lease on it: 'ok', 'cancel' (stop the trainer) or
        'lost' (another worker took the job: this one must stop writing its run at once)."""
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(team_jobs.c.worker, team_jobs.c.state, team_jobs.c.cancel_requested)
                               .where(team_jobs.c.id == job_id).with_for_update()).first()
            if row is None or row.worker != worker or row.state != "running":
                return "lost"
            now = _now(conn)
            conn.execute(sa.update(team_jobs).where(team_jobs.c.id == job_id).values(
                heartbeat_at=now, lease_until=now + timedelta(seconds=stale_after_s)))
            return "cancel" if row.cancel_requested else "ok"

    def finish(self, job_id: str, worker: str, state: str, message: str | None) -> None:
        """Record how this worker's attempt ended (ignored when the job is no longer this worker's).
        ``state`` "queued" ends the attempt but not the job: any worker resumes it from its checkpoint."""
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(team_jobs).where(team_jobs.c.id == job_id).with_for_update()).first()
            if row is None or row.worker != worker or row.state != "running":
                return
            now = _now(conn)
            attempts = _end_attempt(row.attempts, now, message if state == "queued" else state)
            if state == "queued" and row.cancel_requested:  # cancelled meanwhile: stays stopped at its checkpoint
                state, message = "stopped", f"{message}; cancelled by {row.cancelled_by} meanwhile"
            elif state == "stopped" and row.cancel_requested:
                message = f"cancelled by {row.cancelled_by}: {message}"
            ended = {"heartbeat_at": None, "lease_until": None} if state == "queued" else {"ended_at": now}
            conn.execute(sa.update(team_jobs).where(team_jobs.c.id == job_id).values(
                state=state, message=message, attempts=attempts, **ended))


def worker_name() -> str:
    """host:pid:token; the token tells apart two workers that share a host name and a pid (containers on
    the host's network, each with its worker as pid 1)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def _die_with_parent() -> None:
    """In the trainer's process, before exec: the kernel kills it when the worker dies (Linux), as a lost
    machine would; another worker then resumes the run alone."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


# What a worker does when the database does not answer (a restart, a network cut): it waits and asks
# again, from every call, instead of dying with the job's row half-told.
DATABASE_DOWN = (sa.exc.OperationalError, sa.exc.InterfaceError)
UNREACHABLE = "stopped: the worker could not reach the team's database"


DRAINED = "stopped: its worker was stopped (SIGTERM or Ctrl-C)"


def run_worker(queue: TeamQueue, *, once: bool = False, poll_s: float = 2.0, heartbeat_s: float = HEARTBEAT_S,
               stale_after_s: float = STALE_AFTER_S, log=print) -> int:
    """Take jobs and train them until stopped (or, with ``once``, until the queue has nothing claimable).
    Returns the number of attempts run.

    Stopping the worker (SIGTERM, as a service manager or a machine's shutdown sends it, or Ctrl-C) drains
    it: its trainer saves a checkpoint and stops, the job goes back to the queue at once for any worker
    to resume, and the worker exits. While the database cannot be reached the worker says so and keeps
    asking; a job whose heartbeats fail for half of ``stale_after_s`` is stopped at a checkpoint and queued
    again (when the database answers), so it never runs here while another worker resumes it."""
    me, machine = worker_name(), socket.gethostname()
    stopping, current = threading.Event(), {}

    def drain(_signum, _frame) -> None:  # no printing here: the main thread may be inside a print
        stopping.set()
        _stop_trainer(current.get("proc"))

    handled = (signal.SIGTERM, signal.SIGINT) if threading.current_thread() is threading.main_thread() else ()
    previous = {sig: signal.signal(sig, drain) for sig in handled}
    count = 0
    try:
        while not stopping.is_set():
            claimed = _patiently(lambda: queue.claim(me, machine, stale_after_s=stale_after_s), poll_s, log,
                                 stopping)
            if claimed is None:
                if once:
                    break
                stopping.wait(poll_s)
                continue
            job, resume = claimed
            count += 1
            log(f"{me}: {'resuming' if resume else 'starting'} team job {job.id} ({job.name}) in {job.run_dir}")

            def started(proc: subprocess.Popen) -> None:
                current["proc"] = proc
                if stopping.is_set():  # the signal came between the claim and the trainer's start
                    _stop_trainer(proc)

            try:
                state, message = _train(queue, job, me, resume, heartbeat_s, stale_after_s, started)
            except Exception as e:  # noqa: BLE001 - a job this machine cannot run fails; the worker goes on
                state, message = "failed", f"{machine} could not run it: {type(e).__name__}: {e}"
            current.pop("proc", None)
            if stopping.is_set() and state == "stopped":
                state, message = "queued", DRAINED
            # Stopped while the database is down: the outcome goes unrecorded, and the job's lease runs out
            # for another worker to resume it, instead of this worker refusing to stop.
            _patiently(lambda: queue.finish(job.id, me, state, message), poll_s, log,  # noqa: B023 - called at once
                       stopping)
            log(f"{me}: team job {job.id} {state}{f': {message}' if message else ''}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopping.is_set():
        log(f"{me}: stopped")
    return count


def _stop_trainer(proc: subprocess.Popen | None, how: signal.Signals = signal.SIGTERM) -> None:
    """SIGTERM: the trainer saves a checkpoint and stops. SIGKILL: it stops now (another owns the run)."""
    if proc is not None and proc.poll() is None:
        try:
            os.killpg(proc.pid, how)
        except ProcessLookupError:
            pass


def _patiently(call, poll_s: float, log, give_up: threading.Event | None = None):
    """``call()``, asked again every ``poll_s`` (up to 30 s apart) while the database is unreachable;
    None once ``give_up`` is set."""
    wait = poll_s
    while True:
        try:
            return call()
        except DATABASE_DOWN as e:
            log(f"cannot reach the team's database ({str(getattr(e, 'orig', e)).splitlines()[0]}); asking again in "
                f"{wait:.0f} s")
            if give_up is not None and give_up.wait(wait):
                return None
            if give_up is None:
                time.sleep(wait)
            wait = min(wait * 2, 30.0)


def keep_beating(queue: TeamQueue, job_id: str, me: str, proc: subprocess.Popen, *, heartbeat_s: float,
                 stale_after_s: float) -> str | None:
    """Refresh the job's heartbeat (and this worker's lease) every ``heartbeat_s`` while ``proc`` (the
    trainer) runs. Stops the trainer when the job is cancelled ("cancel": SIGTERM, it saves a checkpoint),
    taken by another worker ("lost": SIGKILL, the run is the other worker's now), or when no heartbeat got
    through for half of ``stale_after_s`` ("unreachable": SIGTERM), so its trainer has stopped writing
    before other workers may count this one as gone. Heartbeats run in a thread of their own, watched
    from here: a call that hangs on a dead network counts as failed. Returns which, or None."""
    last_ok, said = [time.monotonic()], [None]

    def beat() -> None:
        while proc.poll() is None and said[0] is None:
            try:
                status = queue.heartbeat(job_id, me, stale_after_s=stale_after_s)
                last_ok[0] = time.monotonic()
            except DATABASE_DOWN:
                status = "ok"  # the watch below decides when silence has lasted too long
            if status != "ok":
                said[0] = status
                return
            time.sleep(heartbeat_s)

    threading.Thread(target=beat, daemon=True).start()
    why = None
    while proc.poll() is None:
        if why is None:
            why = said[0] or ("unreachable" if time.monotonic() - last_ok[0] > stale_after_s / 2 else None)
            if why is not None:
                _stop_trainer(proc, signal.SIGKILL if why == "lost" else signal.SIGTERM)
        time.sleep(min(heartbeat_s, 0.25))
    return why


def _train(queue: TeamQueue, job: TeamJob, me: str, resume: bool, heartbeat_s: float, stale_after_s: float,
           started=lambda proc: None) -> tuple[str, str | None]:
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if (before := run_state(run_dir)).state == "done" and before.result is not None:
        # The last worker's trainer finished (and registered) but the worker died before saying so: the
        # run is complete; training it again from a checkpoint would only repeat the work.
        return "done", before.message or None
    if before.result is not None:
        # An earlier attempt's outcome (stopped, failed): set aside, so this attempt's is the one read.
        (run_dir / RESULT_FILE).replace(run_dir / PREVIOUS_RESULT)
    # The version it registers is recorded in the audit trail as the work of whoever queued the job.
    env = {**os.environ, "LORA_STUDIO_USER": job.submitted_by}
    with tempfile.TemporaryDirectory(prefix="lora-studio-worker-") as tmp:
        config = Path(tmp) / "config.toml"
        config.write_text(job.config_toml)
        with open(run_dir / WORKER_LOG, "ab") as log:
            proc = subprocess.Popen(trainer_argv(config, run_dir, resume=resume), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                                    start_new_session=True, close_fds=True, cwd=tmp, env=env)
        started(proc)
        why: list[str | None] = [None]
        beater = threading.Thread(daemon=True, target=lambda: why.__setitem__(0, keep_beating(
            queue, job.id, me, proc, heartbeat_s=heartbeat_s, stale_after_s=stale_after_s)))
        beater.start()
        returncode = proc.wait()
        beater.join(timeout=heartbeat_s + 5)
    if why[0] == "lost":
        return "failed", "another worker took the job over (this worker missed its heartbeats)"
    state = run_state(run_dir)
    if why[0] == "unreachable" and state.state != "done":
        return "queued", UNREACHABLE  # back to the queue: the next worker resumes it from the checkpoint
    if state.result is not None and state.state in ("done", "stopped", "failed"):
        return state.state, state.message
    if returncode == -signal.SIGTERM:  # stopped by us (cancel, drain, outage) before its own handler was set
        return "stopped", "stopped while the trainer was loading, before its first step"
    return "failed", f"the trainer ended with exit status {returncode} without writing result.json; see " \
                     f"{run_dir / WORKER_LOG}"
