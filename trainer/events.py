"""Run directories and their progress events: what a training run writes for the CLI and the UI to read.

A run directory holds (the trainer writes, everything else only reads):

- ``config.toml``: the exact effective config (resolved; re-running it trains the same way);
- ``events.jsonl``: one JSON object per line, appended and flushed as the run goes
  (``start``, ``step``, ``validation``, ``snapshot``, ``checkpoint``, ``done``, ``stopped``, ``error``);
- ``dataset_report.json``: the dataset scan (skipped files with reasons, buckets, tags);
- ``samples/step-NNNNNN/*.png``: validation images, made by ``studio.generation.run`` with their recipes;
- ``checkpoints/checkpoint-NNNNNN/``: resumable states (rotated);
- ``snapshots/<name>-step-NNNNNN.safetensors``: each checkpoint step's adapter (kept: the candidates
  ``lora-studio runs`` lists and registers);
- ``adapter/<name>.safetensors``: the finished adapter;
- ``result.json``: written atomically when the run ends, whatever the way; its presence is the
  completion marker (a gloo teardown can abort a finished process, so an exit code alone is not).

Every event has ``event`` and ``time`` (Unix seconds). ``step`` events carry ``step``,
``total_steps``, ``epoch``, ``loss``, ``lr``, ``sec_per_step`` and ``eta_s``; ``validation``
events carry ``step``, ``val_loss`` (or None) and ``samples`` (paths relative to the run directory);
``snapshot`` events carry ``step``, ``path``, ``loss``, ``val_loss`` and ``samples``.

Not here: the training loop (``trainer/loop.py``) and background jobs (``studio/app/jobs.py``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.core.atomic import write_bytes_atomic
from studio.core.jsonutil import jsonable

EVENTS_FILE = "events.jsonl"
RESULT_FILE = "result.json"
CONFIG_FILE = "config.toml"
REPORT_FILE = "dataset_report.json"
STATES = ("pending", "running", "done", "stopped", "failed")


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename (never half a file)."""
    text = json.dumps(jsonable(data), indent=2, sort_keys=True, allow_nan=False)
    return write_bytes_atomic(path, text.encode("utf-8"))


class EventLog:
    """Appends events to ``run_dir/events.jsonl`` (one line each, flushed at once)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / EVENTS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, event: str, **fields: Any) -> dict:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        line = json.dumps(jsonable(record), sort_keys=True, allow_nan=False)
        # One write of a whole line in append mode: a reader never sees a torn line mid-file, and
        # tolerates (skips) a torn last line if the process dies mid-write.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
        return record


def read_events(run_dir: str | Path) -> list[dict]:
    """Every complete event of a run, in order ([] when the run has not started writing)."""
    path = Path(run_dir) / EVENTS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    events = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if isinstance(record, dict) and "event" in record:
            events.append(record)
    return events


def read_result(run_dir: str | Path) -> dict | None:
    """The run's ``result.json``, or None while it runs (or if it died before writing one)."""
    try:
        return json.loads((Path(run_dir) / RESULT_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


@dataclass
class RunState:
    """A run's progress summarised from its files: what a progress bar and charts need."""

    run_dir: str
    state: str  # one of STATES
    step: int = 0
    total_steps: int = 0
    eta_s: float | None = None
    sec_per_step: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    lrs: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[tuple[int, list[str]]] = field(default_factory=list)  # (step, absolute paths)
    checkpoints: list[str] = field(default_factory=list)
    message: str = ""
    result: dict | None = None
    notes: list[str] = field(default_factory=list)  # what the run said at its start (precision, memory)

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    @property
    def finished(self) -> bool:
        return self.state in ("done", "stopped", "failed")


def run_state(run_dir: str | Path) -> RunState:
    """Summarise a run directory (cheap enough to poll every second while a run goes)."""
    run_dir = Path(run_dir)
    state = RunState(run_dir=str(run_dir), state="pending")
    for e in read_events(run_dir):
        kind = e["event"]
        if kind == "start":
            state.state = "running"
            state.total_steps = int(e.get("total_steps") or 0)
            state.step = int(e.get("step") or 0)
            state.notes = [str(e[k]) for k in ("precision_note", "memory_note") if e.get(k)]
        elif kind == "step":
            state.step = int(e["step"])
            state.total_steps = int(e.get("total_steps") or state.total_steps)
            state.eta_s = e.get("eta_s")
            state.sec_per_step = e.get("sec_per_step")
            if e.get("loss") is not None:
                state.losses.append((state.step, float(e["loss"])))
            if e.get("lr") is not None:
                state.lrs.append((state.step, float(e["lr"])))
        elif kind == "validation":
            if e.get("val_loss") is not None:
                state.val_losses.append((int(e["step"]), float(e["val_loss"])))
            if e.get("samples"):
                state.samples.append((int(e["step"]), [str(run_dir / p) for p in e["samples"]]))
        elif kind == "checkpoint":
            state.checkpoints.append(str(e.get("path", "")))
        elif kind in ("done", "stopped", "failed"):
            state.state = kind
            state.message = str(e.get("message", ""))
    state.result = read_result(run_dir)
    if state.result is not None:
        state.state = state.result.get("status", state.state)
        state.message = state.result.get("message", state.message) or state.message
    return state


__all__ = [
    "CONFIG_FILE",
    "EVENTS_FILE",
    "EventLog",
    "REPORT_FILE",
    "RESULT_FILE",
    "RunState",
    "STATES",
    "read_events",
    "read_result",
    "run_state",
    "write_json_atomic",
]
