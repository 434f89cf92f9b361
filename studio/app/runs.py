"""Training runs as the studio lists them: each run's checkpoints as candidates to compare and register.

"Which checkpoint, at which strength, should I keep?" A run keeps the adapter file of every checkpoint
step (``snapshots/``, never rotated) with its training loss, validation loss and validation samples
(``snapshot`` events), and its final adapter (``adapter/``, ``result.json``). :func:`run_summary` reads
them into :class:`Candidate` rows and marks the one with the lowest validation loss;
:func:`register_checkpoint` makes any of them a registry version through ``adapters.ingest`` (the one
path to register), with lineage to the run and the step. ``lora-studio runs list|show|register`` and
the run view of the Train page are faces of this module; ``lora-studio grid --x checkpoint=RUN`` draws
candidates x strengths (:func:`checkpoint_axis`).

Runs are found under ``$LORA_STUDIO_HOME/runs`` (the default ``output.dir``) and in the job queue's
records (a job may train elsewhere). A run is named by its folder name, a job id, or a path.

Does not hold: writing runs (``trainer.loop``), reading progress while a run goes (``trainer.events``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from studio.core.errors import InputFileNotFoundError, InvalidRequestError
from studio.core.settings import get_settings
from trainer.config import TrainConfig
from trainer.events import CONFIG_FILE, EVENTS_FILE, read_events, read_result

RUNS = "runs"
FINAL = "final"


@dataclass(frozen=True)
class Candidate:
    """One adapter a run produced: a checkpoint step's snapshot, or the final adapter."""

    step: int
    path: Path  # the adapter file
    loss: float | None  # training loss of that optimizer step
    val_loss: float | None  # held-out loss, where the run keeps images out
    samples: tuple[Path, ...]  # validation images made with these weights
    final: bool = False
    best: bool = False  # the lowest validation loss of the run
    ref: str | None = None  # the registry version made from it by the run itself (the final adapter)

    def to_dict(self) -> dict:
        return {"step": self.step, "path": str(self.path), "loss": self.loss, "val_loss": self.val_loss,
                "samples": [str(p) for p in self.samples], "final": self.final, "best": self.best, "ref": self.ref}


@dataclass
class RunSummary:
    """A run directory, read: its adapter name, base model, state and candidates (oldest step first)."""

    run_dir: Path
    name: str  # the adapter name it trains (output.name)
    base_model: str
    state: str  # pending, running, done, stopped, failed
    step: int
    total_steps: int
    started_at: float | None
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def run(self) -> str:
        return self.run_dir.name

    @property
    def best(self) -> Candidate | None:
        return next((c for c in self.candidates if c.best), None)

    def candidate(self, step: int) -> Candidate:
        """The candidate of ``step``; a clear error listing the run's steps otherwise."""
        for c in self.candidates:
            if c.step == step:
                return c
        have = ", ".join(f"{c.step}{' (final)' if c.final else ''}" for c in self.candidates) or "none yet"
        raise InvalidRequestError(f"run {self.run} has no checkpoint at step {step}; its checkpoints: {have}")

    def to_dict(self) -> dict:
        best = self.best
        return {"run": self.run, "run_dir": str(self.run_dir), "name": self.name, "base_model": self.base_model,
                "state": self.state, "step": self.step, "total_steps": self.total_steps,
                "started_at": self.started_at, "best_step": best.step if best else None,
                "checkpoints": [c.to_dict() for c in self.candidates]}


def runs_root() -> Path:
    """``$LORA_STUDIO_HOME/runs``: where runs go unless a config names another ``output.dir``."""
    return get_settings().home / RUNS


def _is_run(folder: Path) -> bool:
    return folder.is_dir() and ((folder / EVENTS_FILE).is_file() or (folder / CONFIG_FILE).is_file())


def _run_dirs() -> list[Path]:
    from studio.app import jobs  # local: jobs imports the trainer's config only, but keep `runs` light

    found: dict[Path, None] = {}
    root = runs_root()
    if root.is_dir():
        for d in root.iterdir():
            if _is_run(d):
                found[d.resolve()] = None
    for job in jobs.list_jobs(start_runner=False):
        d = Path(job.run_dir)
        if _is_run(d):
            found[d.resolve()] = None
    return list(found)


def list_runs() -> list[RunSummary]:
    """Every run the studio knows, newest first."""
    summaries = [run_summary(d) for d in _run_dirs()]
    return sorted(summaries, key=lambda s: (s.started_at or 0.0, s.run), reverse=True)


def find_run(run: str) -> Path:
    """The run directory ``run`` names: a folder name under :func:`runs_root`, a job id, or a path."""
    from studio.app import jobs

    text = (run or "").strip()
    if not text:
        raise InvalidRequestError("name a run: its folder name (lora-studio runs list), a job id or a path")
    candidates = []
    if "/" not in text and text not in (".", ".."):
        candidates.append(runs_root() / text)
        try:
            candidates.append(Path(jobs.get_job(text).run_dir))
        except Exception:  # noqa: BLE001 - not a job id (or no such job): the other readings remain
            pass
    candidates.append(Path(text).expanduser())
    for folder in candidates:
        if _is_run(folder):
            return folder.resolve()
    raise InputFileNotFoundError(f"no run {text!r}: give a run's folder name from `lora-studio runs list`, a job id, "
                                 f"or the path of a run directory")


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def run_summary(run_dir: str | Path) -> RunSummary:
    """Read a run directory: config, events and result (cheap: no weights are opened)."""
    run_dir = Path(run_dir)
    try:
        config = TrainConfig.from_toml(run_dir / CONFIG_FILE)
        name, base = config.output.name, config.model.base_model
    except Exception:  # noqa: BLE001 - a run that failed before writing its config still lists
        name, base = run_dir.name, "?"
    state, step, total, started = "pending", 0, 0, None
    snapshots: dict[int, Candidate] = {}
    for e in read_events(run_dir):
        kind = e["event"]
        if kind == "start":
            state, started = "running", started or e.get("time")
            total = int(e.get("total_steps") or total)
            step = int(e.get("step") or step)
        elif kind == "step":
            step = int(e.get("step") or step)
        elif kind == "snapshot":
            path = run_dir / str(e.get("path", ""))
            if path.is_file():  # a resumed run writes the same step again: the newest event wins
                snapshots[int(e["step"])] = Candidate(
                    step=int(e["step"]), path=path, loss=_finite(e.get("loss")), val_loss=_finite(e.get("val_loss")),
                    samples=tuple(run_dir / p for p in e.get("samples") or ()))
        elif kind in ("done", "stopped", "failed"):
            state = kind
    result = read_result(run_dir)
    if result is not None:
        state = result.get("status", state)
        if result.get("status") == "done" and result.get("adapter") and Path(result["adapter"]).is_file():
            final_step = int(result.get("steps") or step)
            snapshots[final_step] = Candidate(
                step=final_step, path=Path(result["adapter"]), loss=_finite(result.get("final_loss")),
                val_loss=_finite(result.get("val_loss")),
                samples=tuple(run_dir / p for p in result.get("samples") or ()), final=True, ref=result.get("ref"))
    rows = [snapshots[s] for s in sorted(snapshots)]
    scored = [c for c in rows if c.val_loss is not None]
    if scored:
        best = min(scored, key=lambda c: (c.val_loss, c.step))
        rows = [replace(c, best=c is best) for c in rows]
    return RunSummary(run_dir=run_dir, name=name, base_model=base, state=state, step=step, total_steps=total,
                      started_at=started, candidates=rows)


def register_checkpoint(registry, run: str | Path, step: int, *, name: str | None = None):
    """Register the candidate of ``step`` of ``run`` as the next version of ``name`` (default: the run's
    adapter name), with its validation samples, losses and the run's config; its record's source names
    the run and the step. Returns the :class:`~adapters.ingest.IngestResult` (``created`` False when
    these tensors are that adapter's version already)."""
    from adapters import formats
    from adapters.ingest import ingest
    from trainer.loop import sample_records

    run_dir = find_run(str(run))
    summary = run_summary(run_dir)
    candidate = summary.candidate(step)
    config = TrainConfig.from_toml(run_dir / CONFIG_FILE)
    name = (name or "").strip() or config.output.name
    info = formats.detect(candidate.path)
    samples = [p.relative_to(run_dir) for p in candidate.samples if p.is_file()]
    return ingest(
        registry, candidate.path, name=name, origin="trained", base=config.model.base_model, detected=info,
        trigger_words=info.trigger_words, description=info.metadata.get("modelspec.description") or "",
        source_info={"run_dir": str(run_dir), "run": run_dir.name, "step": step, "dataset": config.dataset.path},
        samples=sample_records(run_dir, [str(p) for p in samples], name, step), training_config=config.to_dict(),
        metrics={"steps": step, "final_loss": candidate.loss, "val_loss": candidate.val_loss})


def checkpoint_axis(run: str | Path, steps: list[int] | None = None) -> tuple[list[str], list[str]]:
    """(adapter file paths, labels) of a run's candidates for a grid axis: every candidate, or those of
    ``steps``, oldest first; the best is labelled so in the grid."""
    summary = run_summary(find_run(str(run)))
    chosen = summary.candidates if steps is None else [summary.candidate(s) for s in steps]
    if not chosen:
        raise InvalidRequestError(f"run {summary.run} has no checkpoints yet: its first comes at its first "
                                  f"output.checkpointing_steps, or when it ends")
    labels = [f"step {c.step}" + (" (final)" if c.final else "") + (" best" if c.best else "") for c in chosen]
    return [str(c.path) for c in chosen], labels


def parse_checkpoint_axis(text: str) -> tuple[list[str], list[str]]:
    """The grid's ``checkpoint=RUN`` (every candidate) or ``checkpoint=RUN:100,200,final`` values."""
    run, _, steps = text.partition(":")
    if not steps.strip():
        return checkpoint_axis(run.strip())
    summary = run_summary(find_run(run.strip()))
    chosen = []
    for value in (v.strip() for v in steps.split(",")):
        if value == FINAL:
            final = next((c.step for c in summary.candidates if c.final), None)
            if final is None:
                raise InvalidRequestError(f"run {summary.run} has no final adapter ({summary.state}): name checkpoint "
                                          f"steps instead")
            chosen.append(final)
        elif value.isdigit():
            chosen.append(int(value))
        else:
            raise InvalidRequestError(f"checkpoint step {value!r} must be a whole number or 'final'")
    return checkpoint_axis(summary.run_dir, chosen)


__all__ = ["FINAL", "Candidate", "RunSummary", "checkpoint_axis", "find_run", "list_runs", "parse_checkpoint_axis",
           "register_checkpoint",
           "run_summary", "runs_root"]
