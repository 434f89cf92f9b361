"""Background training jobs: a queue on disk, one detached runner, status read from run directories.

Holds :class:`Job` (one ``job.json``), :func:`submit` / :func:`resume` (queue a run),
:func:`cancel`, :func:`list_jobs` / :func:`get_job` and the runner (:func:`run_queue`, started as
``python -m studio.app.jobs``). Does not hold the training loop (``trainer/``, started here as a separate
process) nor the progress format (``trainer/events.py``, read here through ``run_state``).

Layout, everything under ``$LORA_STUDIO_HOME/jobs``::

    jobs/<id>/job.json      the record: id, config, argv, state, pid, run_dir, times (atomic writes)
    jobs/<id>/config.toml   the config snapshot the job trains with (relative paths made absolute)
    jobs/<id>/log.txt       the trainer's stdout and stderr
    jobs/queue.lock         held (flock) for every read-modify-write of a job record
    jobs/runner.lock        held by the one live runner for as long as it lives

Why a detached runner: a job must outlive the page that started it, a browser reload and a
restart of the studio, and several submitted jobs must run one after another. :func:`submit`
writes a ``queued`` record, then makes sure a runner is alive (:func:`ensure_runner`): a process
in its own session (``start_new_session``), so stopping the studio does not stop training. The
runner claims the oldest queued job, starts ``sys.executable -m trainer CONFIG --run-dir RUN
--json`` from an argument list (never a shell) as the leader of a new process group, waits for it,
records how it ended, and takes the next; with an empty queue it exits. Nothing lives in memory:
every page and command reads the records and ``trainer.events.run_state(run_dir)`` from disk.

The runner gives up ``runner.lock`` while it still holds ``queue.lock`` after seeing an empty
queue, and :func:`submit` tries ``runner.lock`` only after writing its record under
``queue.lock``: so either the old runner sees the new job, or the lock is free and a new runner is
started. A runner killed with the machine leaves ``running`` records behind; :func:`list_jobs`
settles them from the run directory (result.json, or "interrupted") and starts a runner again for
what is still queued. POSIX only (``fcntl``, process groups), like the trainer's signal handling.

How a run ended is judged by its ``result.json`` (the trainer's completion marker), never by the
exit code alone: a finished process can still abort in a library's teardown.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from studio.core.errors import DatasetNotFoundError, InvalidRequestError, StudioError
from studio.core.settings import PROJECT_ROOT, get_settings
from trainer.config import TrainConfig
from trainer.events import run_state, write_json_atomic

JOB_FILE = "job.json"
CONFIG_FILE = "config.toml"
LOG_FILE = "log.txt"
# queued: waiting for the runner; running: the trainer process is (or was last seen) alive;
# done / stopped / failed: as the run's result.json says; cancelled: removed before it started.
STATES = ("queued", "running", "done", "stopped", "failed", "cancelled")
FINISHED = ("done", "stopped", "failed", "cancelled")
_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{4}")
# SIGTERM makes the trainer save a checkpoint and exit (143); a checkpoint of a big model can take
# a while, so the runner never sends SIGKILL on its own.
CANCEL_SIGNAL = signal.SIGTERM


class JobNotFoundError(StudioError, KeyError):
    """No job has this id (it never existed, or a queued job was cancelled and removed)."""

    __str__ = Exception.__str__


@dataclass
class Job:
    """One training job as ``job.json`` records it."""

    id: str = field(metadata={"help": "YYYYmmdd-HHMMSS-xxxx: sorts by creation time"})
    name: str = field(metadata={"help": "the adapter name the run registers (output.name)"})
    config: str = field(metadata={"help": "the config snapshot the trainer reads (absolute path)"})
    run_dir: str = field(metadata={"help": "the run directory (--run-dir): events, samples, result.json"})
    argv: list[str] = field(metadata={"help": "the trainer command, an argument list (no shell)"})
    state: str = field(default="queued", metadata={"help": f"one of {', '.join(STATES)}"})
    created_at: float = field(default_factory=time.time, metadata={"help": "Unix seconds"})
    started_at: float | None = field(default=None, metadata={"help": "when the trainer process started"})
    ended_at: float | None = field(default=None, metadata={"help": "when it ended (or was cancelled)"})
    pid: int | None = field(default=None, metadata={"help": "the trainer's pid, also its process group id"})
    returncode: int | None = field(default=None, metadata={"help": "the trainer's exit status"})
    message: str = field(default="", metadata={"help": "how it ended, in words"})
    resume_of: str | None = field(default=None, metadata={"help": "the job this one resumes"})
    cancel_requested: bool = field(default=False, metadata={"help": "cancel asked while it was starting"})

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def job_dir(self) -> Path:
        return jobs_dir() / self.id

    @property
    def log_path(self) -> Path:
        return self.job_dir / LOG_FILE

    def progress(self):
        """The run's :class:`trainer.events.RunState` (steps, losses, samples, result)."""
        return run_state(self.run_dir)

    def log_tail(self, max_chars: int = 4000) -> str:
        return read_tail(self.log_path, max_chars)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Job:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ---- paths and locks ---------------------------------------------------------------------------


def read_tail(path: str | Path, max_chars: int = 4000) -> str:
    """The last ``max_chars`` bytes of a trainer's log, as text ('' while it does not exist yet)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_chars))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def jobs_dir() -> Path:
    return get_settings().home / "jobs"


def _check_id(job_id: str) -> str:
    # Ids become folder names: only the exact shape we make is accepted (no '..', no slashes).
    if not isinstance(job_id, str) or not _ID.fullmatch(job_id):
        raise JobNotFoundError(f"{job_id!r} is not a job id (they look like 20260101-120000-0a1b): "
                               f"see lora-studio jobs list")
    return job_id


@contextmanager
def _flock(name: str, *, blocking: bool = True) -> Iterator[bool]:
    root = jobs_dir()
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / name, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _queue_lock():
    return _flock("queue.lock")


def _write(job: Job) -> None:
    write_json_atomic(job.job_dir / JOB_FILE, job.to_dict())


def _read(job_id: str) -> Job:
    path = jobs_dir() / _check_id(job_id) / JOB_FILE
    try:
        return Job.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise JobNotFoundError(f"no job {job_id} (a cancelled queued job is removed): see lora-studio jobs list") \
            from None
    except (ValueError, TypeError) as e:
        raise StudioError(f"job record {path} is damaged ({e}): remove the folder {path.parent}") from None


def _all_ids() -> list[str]:
    root = jobs_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if _ID.fullmatch(p.name) and (p / JOB_FILE).is_file())


def _read_cmdline(pid: int) -> list[bytes]:
    """The argument list of ``pid`` from ``/proc`` (raises ``OSError`` when there is no such entry)."""
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def _is_zombie(pid: int) -> bool:
    # A zombie (ended, not yet reaped by the runner) has an empty command line and holds its pid.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


# What a recorded pid is now, for a job of a given run directory.
TRAINER, GONE, OTHER = "trainer", "gone", "other"


def _pid_status(pid: int | None, run_dir: str) -> str:
    """``TRAINER`` while ``pid`` is a live trainer of ``run_dir`` that this user may signal; ``GONE``
    when no such process lives (or it is a zombie); ``OTHER`` when the pid now belongs to another
    program or to another user's process (pids are reused, most often after a reboot).

    The command line from ``/proc`` decides; ``kill(pid, 0)`` only says whether the process is ours
    (``PermissionError``: another user's, so never a trainer our runner started). Without ``/proc``
    (not Linux) the signal check is all there is.
    """
    if not pid:
        return GONE
    if Path("/proc/self").is_dir():
        try:
            cmdline = _read_cmdline(pid)
        except (FileNotFoundError, ProcessLookupError):
            return GONE
        except OSError:  # /proc mounted with hidepid: the entry exists but is not ours to read
            return OTHER
        if _is_zombie(pid):
            return GONE
        if os.fsencode(run_dir) not in cmdline:
            return OTHER
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return GONE
    except PermissionError:
        return OTHER
    return TRAINER


def _pid_alive(pid: int | None, run_dir: str) -> bool:
    """True while ``pid`` is a live trainer of ``run_dir`` (a reused pid of another program is not)."""
    return _pid_status(pid, run_dir) == TRAINER


_NOT_OURS = ("its trainer's pid {pid} now belongs to another process (the machine restarted and the "
             "pid was reused?), so the job was lost")


# ---- submitting --------------------------------------------------------------------------------


def _new_job_dir() -> tuple[str, Path]:
    """A fresh job id and its folder; mkdir without exist_ok makes the id unique across processes."""
    root = jobs_dir()
    root.mkdir(parents=True, exist_ok=True)
    while True:
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        try:
            (root / job_id).mkdir()
            return job_id, root / job_id
        except FileExistsError:
            continue


def trainer_argv(config: str | Path, run_dir: str | Path, *, resume: bool = False) -> list[str]:
    """The trainer command line for a job (an argument list: nothing passes through a shell)."""
    argv = [sys.executable, "-m", "trainer", str(config), "--run-dir", str(run_dir), "--json"]
    if resume:
        argv += ["--resume", "latest"]
    return argv


def submit(config, *, overrides: list[str] | tuple[str, ...] = (), run_dir: str | Path | None = None,
           start_runner: bool = True) -> Job:
    """Queue a training run; returns its record (state ``queued``).

    Args:
        config: a ``TrainConfig`` or the path of a TOML config. It is checked now (a bad option
            fails here, not minutes later in the queue) and saved into the job folder, so editing
            the file afterwards does not change a queued job.
        overrides: ``["training.max_train_steps=20", ...]`` applied on top (``--set``).
        run_dir: the run directory; default ``<output.dir>/<output.name>-<job id>``.
        start_runner: start the background runner if none is alive (tests of the queue turn it off).
    """
    if isinstance(config, (str, Path)):
        config = TrainConfig.from_toml(config)
    elif not isinstance(config, TrainConfig):
        raise InvalidRequestError(f"config must be a TrainConfig or a TOML path, not {type(config).__name__}")
    if overrides:
        config = config.apply_overrides(list(overrides))
    resolved = config.resolved()  # raises ConfigError for a missing dataset.path, an unknown base model...
    dataset = Path(resolved.dataset.path)
    if not dataset.exists():
        raise DatasetNotFoundError(f"dataset.path {dataset} does not exist: choose a dataset folder")
    job_id, job_dir = _new_job_dir()
    if run_dir is None:
        run_dir = Path(resolved.output.dir) / f"{resolved.output.name}-{job_id}"
    run_dir = Path(run_dir).expanduser().resolve()
    snapshot = config.save(job_dir / CONFIG_FILE)
    job = Job(id=job_id, name=resolved.output.name, config=str(snapshot), run_dir=str(run_dir),
              argv=trainer_argv(snapshot, run_dir))
    with _queue_lock():
        _write(job)
    if start_runner:
        ensure_runner()
    return job


def resume(job_id: str, *, start_runner: bool = True) -> Job:
    """Queue a new job that continues ``job_id``'s run from its newest checkpoint (``--resume latest``).

    Only a run that stopped or failed can be resumed, and only if it saved a checkpoint.
    """
    old = get_job(job_id)
    if not old.finished:
        raise InvalidRequestError(f"job {job_id} is {old.state}: cancel it first, or wait for it to end")
    if old.state in ("done", "cancelled"):
        why = "finished training" if old.state == "done" else "was cancelled before it started"
        raise InvalidRequestError(f"job {job_id} {why}: there is nothing to resume; start a new job instead")
    checkpoints = Path(old.run_dir) / "checkpoints"
    if not checkpoints.is_dir() or not any(checkpoints.iterdir()):
        raise InvalidRequestError(f"job {job_id} saved no checkpoint in {checkpoints}: start it again instead")
    job_id, _ = _new_job_dir()
    job = Job(id=job_id, name=old.name, config=old.config, run_dir=old.run_dir,
              argv=trainer_argv(old.config, old.run_dir, resume=True), resume_of=old.id)
    with _queue_lock():
        _write(job)
    if start_runner:
        ensure_runner()
    return job


# ---- reading -----------------------------------------------------------------------------------


def get_job(job_id: str) -> Job:
    """The record of one job, settled against its process and run directory."""
    return _settle(_read(job_id), runner_alive())


def list_jobs(*, start_runner: bool = True) -> list[Job]:
    """Every job, newest first. Settles records a dead runner left ``running``, and starts a runner
    when jobs wait with none alive (after a machine restart)."""
    alive = runner_alive()
    jobs = []
    for job_id in reversed(_all_ids()):
        try:
            jobs.append(_settle(_read(job_id), alive))
        except JobNotFoundError:
            continue  # removed between the listing and the read (a cancelled queued job)
    jobs.sort(key=lambda j: (j.created_at, j.id), reverse=True)
    if start_runner and not alive and any(j.state == "queued" for j in jobs):
        ensure_runner()
    return jobs


def _settle(job: Job, runner_is_alive: bool) -> Job:
    """A ``running`` record whose process is gone and whose runner is dead gets its real end written.

    A record whose pid now belongs to another program or user is settled even while a runner lives:
    the runner's own trainer keeps its pid (as a zombie) until the runner reaps it and writes the end,
    so a pid held by something else means the record is left from before a restart.
    """
    if job.state != "running" or _stays_running(job, runner_is_alive):
        return job
    with _queue_lock():
        job = _read(job.id)
        if job.state != "running" or _stays_running(job, runner_alive()):
            return job
        if _pid_status(job.pid, job.run_dir) == OTHER:
            _finish(job, None, _NOT_OURS.format(pid=job.pid))
        else:
            _finish(job, None, "the job's runner ended while it ran (machine or studio restarted?)")
        return job


def _stays_running(job: Job, runner_is_alive: bool) -> bool:
    status = _pid_status(job.pid, job.run_dir)
    return status == TRAINER or (runner_is_alive and status == GONE)


def _finish(job: Job, returncode: int | None, lost: str) -> None:
    """Record how a started job ended, from its result.json (the completion marker)."""
    state = run_state(job.run_dir)
    job.returncode = returncode
    job.ended_at = time.time()
    if state.result is not None and state.state in ("done", "stopped", "failed"):
        job.state, job.message = state.state, state.message
    else:
        job.state = "failed"
        code = f" with exit status {returncode}" if returncode is not None else ""
        job.message = f"the trainer ended{code} without writing result.json: {lost}; see {job.log_path}"
    _write(job)


# ---- cancelling ----------------------------------------------------------------------------------


def cancel(job_id: str) -> Job:
    """Cancel a job: a queued one is removed; a running one gets SIGTERM on its process group (the
    trainer saves a checkpoint and stops, so it can be resumed). Returns the record as it was left."""
    with _queue_lock():
        job = _read(job_id)
        if job.finished:
            raise InvalidRequestError(f"job {job_id} already ended ({job.state}): nothing to cancel")
        if job.state == "queued":
            shutil.rmtree(job.job_dir, ignore_errors=True)
            job.state, job.ended_at, job.message = "cancelled", time.time(), "removed from the queue"
            return job
        job.cancel_requested = True
        _write(job)
        pid = job.pid
    status = _pid_status(pid, job.run_dir)
    if status == TRAINER:
        try:
            os.killpg(pid, CANCEL_SIGNAL)  # the trainer leads its own group: its workers stop too
        except ProcessLookupError:
            pass
        except PermissionError:  # the pid changed hands between the check and the signal
            status = OTHER
    if status == OTHER:
        # A process that is not ours is not this job: nothing of ours is left to stop, so the record
        # says the job was lost instead of staying "running" (and the other process is left alone).
        with _queue_lock():
            job = _read(job_id)
            if job.state == "running" and job.pid == pid:
                _finish(job, None, _NOT_OURS.format(pid=pid))
    return job


# ---- the runner --------------------------------------------------------------------------------


def runner_alive() -> bool:
    """True while a runner holds ``runner.lock``."""
    if not (jobs_dir() / "runner.lock").exists():
        return False
    with _flock("runner.lock", blocking=False) as got:
        return not got


def ensure_runner() -> bool:
    """Start a detached runner unless one is alive; returns True if one was started."""
    if runner_alive():
        return False
    root = jobs_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "runner.log", "ab") as log:
        # A new session: the runner and its trainers survive the studio's process group being stopped.
        subprocess.Popen([sys.executable, "-m", "studio.app.jobs"], stdin=subprocess.DEVNULL, stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                         cwd=str(PROJECT_ROOT))
    return True


def _claim_next(runner_lock_fd: int) -> Job | None:
    """Under the queue lock: mark the oldest queued job running and return it; with none, give up the
    runner lock before the queue lock (see the module docstring for why that order)."""
    with _queue_lock():
        queued = [job for job in map(_read, _all_ids()) if job.state == "queued"]
        if queued:
            # Oldest first by creation time (two ids made in the same second differ only by random hex).
            job = min(queued, key=lambda j: (j.created_at, j.id))
            job.state, job.started_at = "running", time.time()
            _write(job)
            return job
        fcntl.flock(runner_lock_fd, fcntl.LOCK_UN)
        return None


def _run_one(job: Job) -> None:
    Path(job.run_dir).mkdir(parents=True, exist_ok=True)
    with open(job.log_path, "ab") as log:
        proc = subprocess.Popen(job.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True, cwd=job.job_dir)
    with _queue_lock():
        current = _read(job.id)
        current.pid = proc.pid
        _write(current)
        cancelled_early = current.cancel_requested
    if cancelled_early:  # cancel arrived between the claim and the pid being written
        os.killpg(proc.pid, CANCEL_SIGNAL)
    returncode = proc.wait()
    with _queue_lock():
        current = _read(job.id)
        _finish(current, returncode, "it was killed or crashed")


def run_queue() -> int:
    """The runner's loop: run queued jobs oldest first, one at a time, until none is left.

    Returns the number of jobs run; 0 at once if another runner is alive.
    """
    root = jobs_dir()
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / "runner.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0
        count = 0
        while (job := _claim_next(fd)) is not None:
            try:
                _run_one(job)
            except Exception as e:  # one broken job (missing python, full disk) must not stall the queue
                with _queue_lock():
                    current = _read(job.id)
                    current.state, current.ended_at = "failed", time.time()
                    current.message = f"could not run the trainer: {type(e).__name__}: {e}"
                    _write(current)
            count += 1
        return count
    finally:
        os.close(fd)


def _on_term(_signum, _frame) -> None:
    # Stopping the runner stops the queue, not the running trainer: it finishes (or is cancelled by
    # its own id) and the next list_jobs settles its record.
    sys.exit(143)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_term)
    run_queue()
