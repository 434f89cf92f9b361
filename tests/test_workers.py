"""The team's training queue on PostgreSQL (studio.app.workers): workers in several processes take each
job once, a worker that stops beating loses its job to another that resumes it, cancel reaches the
worker holding a job, a stopped job queued again resumes, and ``lora-studio team`` / ``worker``. Runs on
the session's real PostgreSQL server (conftest's postgres_server)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from studio.core.errors import InvalidRequestError, StudioError
from studio.core.settings import reload_settings

ROOT = Path(__file__).resolve().parent.parent
STRIPED = ROOT / "datasets" / "striped" / "train.toml"


@pytest.fixture
def team(studio_home, monkeypatch, postgres_server):
    """A TeamQueue on a fresh PostgreSQL database, which is the registry's too."""
    from studio.app.workers import TeamQueue

    url = postgres_server.new_database()
    monkeypatch.setenv("LORA_STUDIO_REGISTRY_URL", url)
    reload_settings()
    with TeamQueue() as queue:
        yield queue
    postgres_server.drop_database(url)


def _claim_all(url: str, home: str, name: str, barrier, results) -> None:
    """In a spawned process: claim jobs until none is left, finishing each at once."""
    os.environ.update(LORA_STUDIO_REGISTRY_URL=url, LORA_STUDIO_HOME=home)
    from studio.app.workers import TeamQueue

    taken = []
    with TeamQueue() as queue:
        barrier.wait()
        while (claimed := queue.claim(name, f"machine-{name}")) is not None:
            job, _ = claimed
            taken.append(job.id)
            queue.finish(job.id, name, "done", None)
    results.put((name, taken))


def test_workers_in_several_processes_take_each_job_once(team, studio_home):
    ids = [team.submit(STRIPED, overrides=[f"output.name=job{i}"], run_dir=studio_home / f"run{i}").id
           for i in range(12)]
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    url = os.environ["LORA_STUDIO_REGISTRY_URL"]
    procs = [ctx.Process(target=_claim_all, args=(url, str(studio_home), f"w{i}", barrier, results)) for i in range(3)]
    for p in procs:
        p.start()
    taken = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    claimed = [job_id for ids_ in taken.values() for job_id in ids_]
    assert sorted(claimed) == sorted(ids)  # every job once: none twice, none left
    assert [j.id for j in team.jobs(limit=5)] == [j.id for j in team.jobs()][:5] == ids[::-1][:5]  # newest first
    for job in team.jobs():
        owner = next(name for name, got in taken.items() if job.id in got)
        assert job.state == "done" and job.machine == f"machine-{owner}" and len(job.attempts) == 1
        assert job.attempts[0]["how"] == "done" and job.attempts[0]["worker"] == owner


def test_a_worker_that_stops_beating_loses_its_job(team, studio_home):
    job = team.submit(STRIPED, run_dir=studio_home / "run")
    patient = team.submit(STRIPED, overrides=["output.name=patient"], run_dir=studio_home / "patient")
    first, resume = team.claim("a:1", "machine-a", stale_after_s=1.0)  # a's lease: 1 s after each heartbeat
    assert first.id == job.id and not resume and first.state == "running"
    assert team.claim("c:3", "machine-c", stale_after_s=60)[0].id == patient.id  # c's lease: 60 s
    assert team.heartbeat(job.id, "a:1", stale_after_s=1.0) == "ok"
    assert team.claim("b:2", "machine-b") is None  # a beats: nothing to take
    time.sleep(1.2)
    taken, _ = team.claim("b:2", "machine-b", stale_after_s=1.0)  # a's lease ran out; c's did not
    assert taken.id == job.id and taken.worker == "b:2" and taken.machine == "machine-b"
    assert [(a["machine"], a["how"]) for a in taken.attempts] == [("machine-a", "lost (no heartbeat)"),
                                                                  ("machine-b", None)]
    assert team.heartbeat(job.id, "a:1") == "lost"  # the old worker learns it must stop
    team.finish(job.id, "a:1", "failed", "too late")  # and its word no longer counts
    assert team.get(job.id).state == "running"
    team.finish(job.id, "b:2", "done", None)
    assert team.get(job.id).state == "done" and team.get(job.id).attempts[-1]["how"] == "done"
    assert team.get(patient.id).worker == "c:3"


def test_cancel_reaches_a_job_whose_worker_is_gone(team, studio_home):
    from studio.app.workers import GONE_CANCELLED

    gone = team.submit(STRIPED, overrides=["output.name=gone"], run_dir=studio_home / "gone")
    flagged = team.submit(STRIPED, overrides=["output.name=flagged"], run_dir=studio_home / "flagged")
    team.claim("a:1", "machine-a", stale_after_s=1.0)
    team.claim("b:2", "machine-b", stale_after_s=1.0)
    assert team.cancel(flagged.id, by="grace").cancel_requested  # b still holds it: flagged for its next heartbeat
    time.sleep(1.2)  # then both workers die
    stopped = team.cancel(gone.id, by="ada")  # nobody would read a flag: stopped at once, resumable
    assert (stopped.state, stopped.message, stopped.attempts[-1]["how"], stopped.cancelled_by) == (
        "stopped", GONE_CANCELLED.format(by="ada"), "lost (no heartbeat)", "ada")
    assert team.claim("c:3", "machine-c") is None  # the flagged one is settled, not started
    assert (team.get(flagged.id).state, team.get(flagged.id).message) == ("stopped", GONE_CANCELLED.format(by="grace"))
    assert team.resume(gone.id).state == "queued"


def test_each_team_job_trains_in_a_folder_of_its_own(team, studio_home):
    first = team.submit(STRIPED, run_dir=studio_home / "run")
    with pytest.raises(InvalidRequestError, match=f"belongs to team job {first.id}"):
        team.submit(STRIPED, run_dir=studio_home / "run")
    (studio_home / "old-run").mkdir(parents=True)
    (studio_home / "old-run" / "events.jsonl").write_text("{}\n")
    with pytest.raises(InvalidRequestError, match="old-run is not empty: each team job trains in a folder"):
        team.submit(STRIPED, run_dir=studio_home / "old-run")


def test_cancel_a_queued_job_and_one_a_worker_holds(team, studio_home):
    queued = team.submit(STRIPED, overrides=["output.name=q"], run_dir=studio_home / "q")
    held = team.submit(STRIPED, overrides=["output.name=h"], run_dir=studio_home / "h")
    assert team.cancel(queued.id).state == "cancelled"
    job, _ = team.claim("a:1", "machine-a")
    assert job.id == held.id  # the cancelled one is never taken
    assert team.cancel(held.id).cancel_requested
    assert team.heartbeat(held.id, "a:1") == "cancel"  # what the worker holding it reads
    team.finish(held.id, "a:1", "stopped", "stopped by SIGTERM")
    with pytest.raises(InvalidRequestError, match="already ended"):
        team.cancel(held.id)
    # A stopped or cancelled job can be queued again; a running or finished one cannot.
    assert team.resume(queued.id).state == "queued"
    claimed, resume = team.claim("b:2", "machine-b")
    assert claimed.id == queued.id and not resume  # it never ran: no checkpoint, a fresh start
    with pytest.raises(InvalidRequestError, match="is running: only a stopped, failed or cancelled"):
        team.resume(queued.id)


def test_a_queue_made_by_an_earlier_version_gains_the_new_columns(team, studio_home):
    from studio.app.workers import ADDED_COLUMNS, TeamQueue

    job = team.submit(STRIPED, run_dir=studio_home / "run")
    with team.engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE team_jobs " + ", ".join(f"DROP COLUMN {c}" for c in ADDED_COLUMNS))
    with TeamQueue() as again:  # a worker of this version starting on that database
        assert again.claim("a:1", "machine-a")[0].id == job.id and again.cancel(job.id, by="ada").cancelled_by == "ada"


def test_a_database_that_went_away_is_one_clear_error_for_users(studio_home, postgres_server):
    import sqlalchemy as sa

    from studio.app.workers import TeamQueue

    url = postgres_server.new_database()
    queue = TeamQueue(url)
    postgres_server.drop_database(url)  # the server restarted without it, or the network is gone
    for call in (queue.jobs, lambda: queue.get("x"), lambda: queue.cancel("x"), lambda: queue.submit(STRIPED)):
        with pytest.raises(StudioError, match=r"cannot reach the team's queue in postgresql\+psycopg://.*check that"):
            call()
    with pytest.raises(sa.exc.OperationalError):  # workers get the driver's error, and wait and retry
        queue.claim("a:1", "machine-a")
    queue.close()


def test_a_team_queue_needs_postgresql(studio_home):
    from studio.app.workers import TeamQueue

    with pytest.raises(InvalidRequestError, match="LORA_STUDIO_REGISTRY_URL"):
        TeamQueue()
    # A server that cannot be reached is named, without the password, with what to check.
    with pytest.raises(StudioError, match=r"(?s)cannot open the team's queue in postgresql\+psycopg://ops:\*\*\*@/"
                                          r"catalog.*check LORA_STUDIO_REGISTRY_URL") as caught:
        TeamQueue(f"postgresql+psycopg://ops:secret@/catalog?host={studio_home / 'no-server'}")
    assert "secret" not in str(caught.value)


def test_team_cli(team, studio_home, capsys):
    from studio.app.cli import main

    assert main(["team", "submit", str(STRIPED), "--set", "output.name=cli", "--run-dir", str(studio_home / "r"),
                 "--json"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["state"] == "queued" and job["run_dir"] == str((studio_home / "r").resolve())
    assert main(["team", "list"]) == 0
    assert f"{job['id']}  queued     cli" in capsys.readouterr().out
    assert main(["team", "cancel", job["id"]]) == 0
    assert "cancelled queued team job" in capsys.readouterr().out
    assert main(["team", "cancel", "nope"]) == 2
    assert "no team job 'nope'" in capsys.readouterr().err
    assert main(["team", "resume", job["id"]]) == 0
    assert f"queued team job {job['id']} (cli) again" in capsys.readouterr().out
    assert main(["team", "resume", job["id"]]) == 2
    assert "is queued: only a stopped" in capsys.readouterr().err


def _wait(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def test_a_killed_workers_job_finishes_on_another_with_the_uninterrupted_adapter(team, studio_home, tmp_path):
    import torch
    from safetensors.torch import load_file

    from trainer.events import run_state
    from trainer.loop import list_checkpoints

    # no samples: each checkpoint is validated, and 3 prompts x 2 seeds at each would only slow the test
    settings = ["training.max_train_steps=12", "training.lr_warmup_steps=0", "validation.every_n_steps=0",
                "validation.prompts=[]", "output.checkpointing_steps=4", "training.train_batch_size=1"]
    killed = team.submit(STRIPED, overrides=[*settings, "output.name=killed"], run_dir=tmp_path / "killed")
    straight = team.submit(STRIPED, overrides=[*settings, "output.name=straight"], run_dir=tmp_path / "straight")
    command = [sys.executable, "-m", "studio.app.cli", "worker", "--heartbeat", "0.5", "--stale-after", "4"]
    first = subprocess.Popen([*command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        _wait(lambda: list_checkpoints(killed.run_dir), 300, "the first worker's first checkpoint")
        os.kill(first.pid, signal.SIGKILL)  # the machine is lost: its trainer dies with it
    finally:
        first.kill()
        first.wait(timeout=30)
    time.sleep(1)
    assert run_state(killed.run_dir).state == "running"  # no result: the run was cut, not finished
    second = subprocess.run([*command, "--once"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resuming team job {killed.id}" in second.stdout
    done, other = team.get(killed.id), team.get(straight.id)
    assert (done.state, other.state) == ("done", "done"), (done.message, other.message)
    assert [a["how"] for a in done.attempts] == ["lost (no heartbeat)", "done"]
    assert len({a["worker"] for a in done.attempts}) == 2
    a = load_file(run_state(done.run_dir).result["adapter"])
    b = load_file(run_state(other.run_dir).result["adapter"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _register_from(home: str, store: str, url: str, name: str, weights: str, barrier, results) -> None:
    """In a spawned process, as another machine: its own home, the team's store and registry."""
    os.environ.update(LORA_STUDIO_HOME=home, LORA_STUDIO_STORE=store, LORA_STUDIO_REGISTRY_URL=url)
    from adapters.registry import Registry, VersionInfo

    with Registry() as reg:
        barrier.wait()
        results.put(reg.register(name, weights, VersionInfo(family="sd1")).weights_sha256)


def test_two_machines_registering_the_same_bytes_at_once_store_one_blob(team, tmp_path, monkeypatch):
    from test_registry import make_weights

    from adapters.registry import Registry, VersionInfo
    from studio.core.errors import HashMismatchError

    store, url = tmp_path / "shared-store", os.environ["LORA_STUDIO_REGISTRY_URL"]
    weights = make_weights(tmp_path / "w.safetensors", 7, size=64)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_register_from, args=(str(tmp_path / f"machine{i}"), str(store), url, f"style{i}",
                                                      str(weights), barrier, results)) for i in range(2)]
    for p in procs:
        p.start()
    shas = {results.get(timeout=120) for _ in procs}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(shas) == 1
    (sha,) = shas
    assert [p.name for p in store.rglob("*") if p.is_file()] == [sha]  # one blob, no temp file left
    monkeypatch.setenv("LORA_STUDIO_STORE", str(store))
    reload_settings()
    with Registry() as reg:
        assert reg.store.root == store and reg.get("style0").path == reg.get("style1").path == store / sha[:2] / sha
        assert reg.check() == []
        # Bytes damaged on the shared disk are refused on read, by name, not applied.
        blob = store / sha[:2] / sha
        blob.write_bytes(blob.read_bytes()[:-1] + b"\x00")
        with pytest.raises(HashMismatchError, match=f"blob {sha[:12]}.*damaged"):
            reg.get("style0")
        # Registering the original file again, as the message says, repairs the stored copy.
        assert reg.register("style0", weights, VersionInfo(family="sd1")).number == 1  # the same version
        assert reg.get("style0").path.read_bytes() == weights.read_bytes() and reg.check() == []


def _database_down():
    import sqlalchemy as sa

    return sa.exc.OperationalError("UPDATE team_jobs ...", {}, Exception("server closed the connection unexpectedly"))


class _Flaky:
    """The team queue, with heartbeats that fail ``failures`` times (None: always) after the first."""

    def __init__(self, queue, failures):
        self.queue, self.failures, self.calls = queue, failures, 0

    def heartbeat(self, job_id, worker, **kwargs):
        self.calls += 1
        if self.calls > 1 and (self.failures is None or self.calls <= 1 + self.failures):
            raise _database_down()
        return self.queue.heartbeat(job_id, worker, **kwargs)


class _Hung:
    """Heartbeats that hang, as on a network that drops packets silently."""

    def heartbeat(self, job_id, worker, **kwargs):
        time.sleep(3600)


class _Lost:
    def heartbeat(self, job_id, worker, **kwargs):
        return "lost"


def test_a_worker_cut_from_the_database_stops_its_trainer_before_others_take_the_job(team, studio_home):
    from studio.app.workers import UNREACHABLE, keep_beating

    job = team.submit(STRIPED, run_dir=studio_home / "run")
    team.claim("a:1", "machine-a")
    # A blip (two failed heartbeats, well inside half of stale_after_s) leaves the trainer running.
    trainer = subprocess.Popen(["sleep", "30"], start_new_session=True)
    beats = threading.Thread(target=keep_beating, args=(_Flaky(team, 2), job.id, "a:1", trainer),
                             kwargs={"heartbeat_s": 0.1, "stale_after_s": 10.0})
    beats.start()
    time.sleep(1.0)
    assert trainer.poll() is None
    trainer.kill()
    beats.join(timeout=10)
    # A cut longer than half of stale_after_s: the trainer gets SIGTERM (it saves a checkpoint and stops),
    # before any other worker may count this one as gone.
    trainer = subprocess.Popen(["sleep", "30"], start_new_session=True)
    started = time.monotonic()
    why = keep_beating(_Flaky(team, None), job.id, "a:1", trainer, heartbeat_s=0.1, stale_after_s=1.0)
    assert why == "unreachable" and trainer.wait(timeout=10) == -signal.SIGTERM
    assert 0.5 <= time.monotonic() - started < 1.0 + 2  # half of stale_after_s, plus a heartbeat or two
    # A heartbeat that hangs instead of failing counts the same.
    trainer = subprocess.Popen(["sleep", "30"], start_new_session=True)
    assert keep_beating(_Hung(), job.id, "a:1", trainer, heartbeat_s=0.1, stale_after_s=1.0) == "unreachable"
    assert trainer.wait(timeout=10) == -signal.SIGTERM
    # Taken over by another worker: the trainer is killed at once, the run is the other's now.
    trainer = subprocess.Popen(["sleep", "30"], start_new_session=True)
    assert keep_beating(_Lost(), job.id, "a:1", trainer, heartbeat_s=0.1, stale_after_s=10.0) == "lost"
    assert trainer.wait(timeout=10) == -signal.SIGKILL
    # When the database answers again the job goes back to the queue, and the next worker resumes it.
    team.finish(job.id, "a:1", "queued", UNREACHABLE)
    back = team.get(job.id)
    assert (back.state, back.heartbeat_at, back.attempts[-1]["how"]) == ("queued", None, UNREACHABLE)
    assert team.claim("b:2", "machine-b")[0].id == job.id
    # One cancelled meanwhile is not queued again.
    team.cancel(job.id)
    team.finish(job.id, "b:2", "queued", UNREACHABLE)
    assert team.get(job.id).state == "stopped" and "cancelled by" in team.get(job.id).message


def test_a_worker_waits_for_the_database_instead_of_dying(team, studio_home):
    from studio.app.workers import run_worker

    class Down:
        def __init__(self):
            self.calls = 0

        def claim(self, *args, **kwargs):
            self.calls += 1
            if self.calls <= 2:
                raise _database_down()
            return None

    said = []
    assert run_worker(Down(), once=True, poll_s=0.01, log=said.append) == 0
    assert len(said) == 2 and all("cannot reach the team's database (server closed the connection unexpectedly)"
                                  in line for line in said)


def test_cancel_reaches_the_worker_resume_continues_and_stopping_the_worker_queues_the_job(team, tmp_path):
    from studio.app.workers import DRAINED
    from trainer.events import run_state
    from trainer.loop import list_checkpoints

    job = team.submit(STRIPED, overrides=["training.max_train_steps=400", "training.lr_warmup_steps=0",
                                          "validation.every_n_steps=0", "output.checkpointing_steps=0",
                                          "training.train_batch_size=1", "output.name=long"],
                      run_dir=tmp_path / "long")
    worker = subprocess.Popen([sys.executable, "-m", "studio.app.cli", "worker", "--heartbeat", "0.5", "--poll", "0.3"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Cancel from another process (as from another machine) reaches the worker holding the job.
        _wait(lambda: run_state(job.run_dir).step >= 2, 300, "the job's second step")
        assert team.cancel(job.id).cancel_requested
        stopped = _wait(lambda: (j := team.get(job.id)).finished and j, 300, "the cancelled job to stop")
        assert stopped.state == "stopped", stopped.message
        assert stopped.message.startswith(f"cancelled by {stopped.cancelled_by}: stopped by SIGTERM")
        at_stop = run_state(job.run_dir).step
        assert 2 <= at_stop < 400 and list_checkpoints(job.run_dir)  # it kept a checkpoint
        assert stopped.attempts[-1]["how"] == "stopped"
        # Resume queues the same job again; the waiting worker takes it and continues from the checkpoint.
        again = team.resume(job.id)
        assert (again.state, again.message, again.cancel_requested) == ("queued", None, False)
        _wait(lambda: run_state(job.run_dir).step >= at_stop + 2, 300, "the resumed run's steps")
        # Stopping the worker (a service manager, a shutdown) drains it: checkpoint, job queued again, exit 0.
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=300)
    finally:
        worker.kill()
    assert worker.returncode == 0 and "stopped" in out.splitlines()[-1], out[-3000:]
    assert f"resuming team job {job.id}" in out
    back = team.get(job.id)
    assert (back.state, [a["how"] for a in back.attempts]) == ("queued", ["stopped", DRAINED]), out[-3000:]
    assert at_stop + 2 <= run_state(job.run_dir).step < 400
    assert team.claim("b:2", "machine-b")[1] is True  # another worker resumes it at once, without waiting


def test_a_run_that_finished_before_its_worker_died_is_not_trained_again(team, studio_home):
    from studio.app.workers import run_worker
    from trainer.events import RESULT_FILE, write_json_atomic

    job = team.submit(STRIPED, run_dir=studio_home / "run")
    # a worker took it, its trainer finished and registered, then the worker died
    team.claim("a:1", "machine-a", stale_after_s=1.0)
    write_json_atomic(Path(job.run_dir) / RESULT_FILE, {"status": "done", "message": "", "ref": "striped@1"})
    time.sleep(1.2)
    said = []
    assert run_worker(team, once=True, stale_after_s=1.0, log=said.append) == 1
    done = team.get(job.id)
    assert done.state == "done" and [a["how"] for a in done.attempts] == ["lost (no heartbeat)", "done"]
    assert not (Path(job.run_dir) / "worker-log.txt").exists()  # no trainer was started


def test_heartbeats_are_judged_by_the_database_clock_not_a_machines(team, studio_home, monkeypatch):
    import datetime as dt

    job = team.submit(STRIPED, run_dir=studio_home / "run")
    team.claim("a:1", "machine-a")

    class AnHourAhead(dt.datetime):  # machine b's clock, wrong by an hour
        @classmethod
        def now(cls, tz=None):
            return dt.datetime.now(tz) + dt.timedelta(hours=1)

    monkeypatch.setattr("studio.app.workers.datetime", AnHourAhead)
    assert team.claim("b:2", "machine-b", stale_after_s=60) is None  # a's fresh heartbeat is not stale
    assert team.heartbeat(job.id, "a:1") == "ok"


def test_a_job_a_machine_cannot_run_fails_and_the_worker_goes_on(team, studio_home):
    from studio.app.workers import run_worker

    (studio_home / "a-file").parent.mkdir(parents=True, exist_ok=True)
    (studio_home / "a-file").write_text("not a folder")
    bad = team.submit(STRIPED, overrides=["output.name=bad"], run_dir=studio_home / "a-file" / "run")
    nxt = team.submit(STRIPED, overrides=["output.name=next"], run_dir=studio_home / "a-file" / "next")
    said = []
    assert run_worker(team, once=True, heartbeat_s=0.5, log=said.append) == 2  # still there for the next job
    for job in (bad, nxt):
        failed = team.get(job.id)
        assert failed.state == "failed" and "could not run it: NotADirectoryError" in failed.message


def test_stopping_a_worker_while_its_trainer_loads_queues_the_job_again(team, tmp_path):
    from studio.app.workers import DRAINED

    job = team.submit(STRIPED, overrides=["output.name=early"], run_dir=tmp_path / "early")
    worker = subprocess.Popen([sys.executable, "-m", "studio.app.cli", "worker", "--heartbeat", "0.5"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait(lambda: team.get(job.id).state == "running", 120, "a worker to take the job")
        worker.send_signal(signal.SIGTERM)  # the trainer is still importing torch: no handler of its own yet
        out, _ = worker.communicate(timeout=120)
    finally:
        worker.kill()
    assert worker.returncode == 0, out[-3000:]
    back = team.get(job.id)
    assert (back.state, back.attempts[-1]["how"]) == ("queued", DRAINED), (back.message, out[-3000:])


def test_the_heartbeat_must_fit_the_stale_after(team, capsys):
    from studio.app.cli import main

    assert main(["worker", "--heartbeat", "20", "--once"]) == 2
    assert "--heartbeat 20 must be above 0 and at most a third of --stale-after 30" in capsys.readouterr().err


def test_a_worker_stopped_while_the_database_is_down_still_exits(team, studio_home, monkeypatch):
    import studio.app.workers as workers

    job = team.submit(STRIPED, run_dir=studio_home / "run")

    def train(*args):
        os.kill(os.getpid(), signal.SIGTERM)  # the worker is stopped while its trainer runs
        return "stopped", "stopped by SIGTERM at step 3/100"

    class DownAtTheEnd:  # the database goes away before the worker can report
        def claim(self, *args, **kwargs):
            return team.claim(*args, **kwargs)

        def finish(self, *args):
            raise _database_down()

    monkeypatch.setattr(workers, "_train", train)
    said = []
    assert workers.run_worker(DownAtTheEnd(), poll_s=0.01, log=said.append) == 1
    assert said[-1].endswith(": stopped")
    assert team.get(job.id).state == "running"  # unrecorded: its lease runs out and another worker resumes it
