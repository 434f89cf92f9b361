"""studio.app.jobs with the real trainer: the queue runs jobs one after another, cancel, resume, settling
records a dead runner left behind, and the ``lora-studio jobs`` commands."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from studio.app import jobs
from studio.app.cli import main
from studio.core.errors import ConfigError, InvalidRequestError

ROOT = Path(__file__).resolve().parent.parent
STRIPED = ROOT / "datasets" / "striped" / "train.toml"
# No samples: these tests are about the queue, and 3 prompts x 2 seeds at the end of each run only cost time.
QUICK = ["training.max_train_steps=6", "training.lr_warmup_steps=0", "validation.every_n_steps=0",
         "validation.prompts=[]", "output.checkpointing_steps=0", "training.train_batch_size=2"]


def _wait(predicate, timeout_s=180, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def test_queued_jobs_run_one_after_another_and_register(studio_home):
    first = jobs.submit(STRIPED, overrides=[*QUICK, "output.name=first"], start_runner=False)
    second = jobs.submit(STRIPED, overrides=[*QUICK, "output.name=second"], start_runner=False)
    assert [j.state for j in jobs.list_jobs(start_runner=False)] == ["queued", "queued"]
    assert first.argv[1:3] == ["-m", "trainer"] and "--json" in first.argv  # an argument list, no shell
    assert Path(first.config).parent == studio_home / "jobs" / first.id

    assert jobs.run_queue() == 2
    a, b = jobs.get_job(first.id), jobs.get_job(second.id)
    assert (a.state, b.state) == ("done", "done"), (a.message, b.message, a.log_tail(), b.log_tail())
    assert a.ended_at <= b.started_at  # one after another, oldest first
    assert a.progress().result["ref"] == "first@1" and b.progress().result["ref"] == "second@1"
    assert a.returncode == 0 and a.progress().step == 6


def test_cancel_running_then_resume_continues_from_the_checkpoint(studio_home):
    job = jobs.submit(STRIPED, overrides=["training.max_train_steps=400", "training.lr_warmup_steps=0",
                                          "validation.every_n_steps=0", "validation.prompts=[]",
                                          "output.checkpointing_steps=5",
                                          "training.train_batch_size=1"])
    queued = jobs.submit(STRIPED, overrides=QUICK)  # waits behind the first
    _wait(lambda: jobs.get_job(job.id).progress().step >= 6, what="the first job's 6th step")
    assert jobs.get_job(queued.id).state == "queued"
    removed = jobs.cancel(queued.id)
    assert removed.state == "cancelled" and not (studio_home / "jobs" / queued.id).exists()

    jobs.cancel(job.id)
    stopped = _wait(lambda: (j := jobs.get_job(job.id)).finished and j, what="the cancelled job to stop")
    assert stopped.state == "stopped", (stopped.message, stopped.log_tail())
    at_stop = stopped.progress().step
    assert 6 <= at_stop < 400

    with pytest.raises(InvalidRequestError, match="already ended"):
        jobs.cancel(job.id)
    # Resume with a lower target so the test stays short: the new job continues the same run directory.
    config = Path(stopped.config)
    config.write_text(config.read_text().replace("max_train_steps = 400", f"max_train_steps = {at_stop + 4}"))
    again = jobs.resume(job.id)
    assert again.run_dir == job.run_dir and again.argv[-2:] == ["--resume", "latest"] and again.resume_of == job.id
    done = _wait(lambda: (j := jobs.get_job(again.id)).finished and j, what="the resumed job to end")
    assert done.state == "done", (done.message, done.log_tail())
    assert done.progress().step == at_stop + 4
    with pytest.raises(InvalidRequestError, match="nothing to resume"):
        jobs.resume(again.id)


def test_bad_input_is_refused_before_anything_is_queued(studio_home, tmp_path):
    with pytest.raises(ConfigError, match="network.rank"):
        jobs.submit(STRIPED, overrides=["network.rank=0"])
    bad = tmp_path / "train.toml"
    bad.write_text('[dataset]\npath = "missing"\n')
    with pytest.raises(Exception, match="missing"):
        jobs.submit(bad)
    assert jobs.list_jobs() == []
    for job_id in ("../etc", "20260101-000000-zzzz", "x"):
        with pytest.raises(jobs.JobNotFoundError, match="not a job id"):
            jobs.get_job(job_id)
    with pytest.raises(jobs.JobNotFoundError, match="no job"):
        jobs.cancel("20260101-000000-abcd")


def test_a_running_record_left_by_a_dead_runner_is_settled(studio_home):
    job = jobs.submit(STRIPED, overrides=QUICK, start_runner=False)
    record = jobs.get_job(job.id)
    record.state, record.pid, record.started_at = "running", 2**22 + 12345, time.time()  # no such process
    jobs._write(record)
    settled = jobs.get_job(job.id)
    assert settled.state == "failed" and "runner ended" in settled.message
    # The resume refusal names the missing checkpoint instead of queueing a run that cannot start.
    with pytest.raises(InvalidRequestError, match="no checkpoint"):
        jobs.resume(job.id)


def test_jobs_cli(studio_home, capsys):
    assert main(["jobs", "start", str(STRIPED), *sum([["--set", o] for o in QUICK], []), "--json"]) == 0
    started = json.loads(capsys.readouterr().out)
    _wait(lambda: jobs.get_job(started["id"]).finished, what="the CLI job to end")
    assert main(["jobs", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["id"] == started["id"] and listed[0]["state"] == "done"
    assert listed[0]["progress"]["result"]["ref"] == "striped@1"
    assert main(["jobs", "cancel", started["id"]]) == 2
    assert "already ended" in capsys.readouterr().err
    assert main(["jobs", "list"]) == 0
    assert f"{started['id']}  done" in capsys.readouterr().out
    assert os.path.isfile(Path(started["run_dir"]) / "result.json")


# ---- a pid that is no longer the job's trainer (the machine restarted and the pid was reused) ------


def _running_record(pid: int) -> jobs.Job:
    job = jobs.submit(STRIPED, overrides=QUICK, start_runner=False)
    record = jobs.get_job(job.id)
    record.state, record.pid, record.started_at = "running", pid, time.time()
    jobs._write(record)
    return record


def _another_users_process(monkeypatch, pid: int, cmdline: list[bytes] | None = None) -> None:
    """``pid`` is a live process of another user: signalling it is refused (what a non-root studio
    sees) and its command line is ``cmdline`` (default: another program, naming no run directory)."""
    cmdline = cmdline or [b"/usr/sbin/cupsd", b"-l", b""]
    real_kill, real_killpg = os.kill, os.killpg

    def refuse(target, sig):
        if target == pid:
            raise PermissionError(1, "Operation not permitted")
        return real_kill(target, sig)

    def refuse_group(target, sig):
        if target == pid:
            raise PermissionError(1, "Operation not permitted")
        return real_killpg(target, sig)

    monkeypatch.setattr(jobs.os, "kill", refuse)
    monkeypatch.setattr(jobs.os, "killpg", refuse_group)
    real_cmdline = jobs._read_cmdline
    monkeypatch.setattr(jobs, "_read_cmdline",
                        lambda p: cmdline if p == pid else real_cmdline(p))


@pytest.mark.parametrize("runner_is_alive", [False, True], ids=["no-runner", "runner-restarted"])
def test_a_pid_now_owned_by_another_users_process_is_not_the_job(studio_home, monkeypatch, runner_is_alive):
    pid = 2**22 + 4321
    record = _running_record(pid)
    _another_users_process(monkeypatch, pid)
    assert not jobs._pid_alive(pid, record.run_dir)
    # After a restart a runner may already be alive again for queued jobs: it cannot be running a
    # job whose pid is held by another program (its own child keeps the pid until it is reaped).
    if runner_is_alive:
        with jobs._flock("runner.lock"):
            assert jobs.runner_alive()
            settled = jobs.get_job(record.id)
    else:
        settled = jobs.get_job(record.id)
    assert settled.state == "failed" and "another" in settled.message, settled.message
    assert [j.state for j in jobs.list_jobs(start_runner=False)] == ["failed"]


@pytest.mark.parametrize("same_cmdline", [False, True], ids=["another-program", "same-command-line"])
def test_cancel_of_a_job_whose_pid_is_another_users_process_marks_it_lost(studio_home, monkeypatch, same_cmdline,
                                                                           capsys):
    pid = 2**22 + 4322
    record = _running_record(pid)
    # Even a process that runs the job's own command line is not the job when it is another user's.
    _another_users_process(monkeypatch, pid, [os.fsencode(a) for a in record.argv] if same_cmdline else None)
    with jobs._flock("runner.lock"):  # a runner alive again after the restart: no settling by list_jobs
        assert main(["jobs", "cancel", record.id]) == 0
    out = capsys.readouterr().out
    assert "is failed" in out and "asked job" not in out, out  # the command says what happened, not "stopping"
    left = jobs.get_job(record.id)
    assert left.state == "failed" and f"pid {pid}" in left.message and "another" in left.message, left.message
    assert jobs.get_job(record.id).state == "failed"
    with pytest.raises(InvalidRequestError, match="already ended"):
        jobs.cancel(record.id)


def test_a_pid_reused_by_another_program_is_settled_while_a_runner_lives(studio_home):
    # A real process of ours whose command line is not the job's trainer: read from /proc.
    other = subprocess.Popen(["sleep", "60"])
    try:
        record = _running_record(other.pid)
        assert not jobs._pid_alive(other.pid, record.run_dir)
        with jobs._flock("runner.lock"):
            settled = jobs.get_job(record.id)
        assert settled.state == "failed" and "another" in settled.message, settled.message
        assert other.poll() is None  # never signalled: it is not the job's process
    finally:
        other.kill()
        other.wait()
