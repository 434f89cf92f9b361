"""Presets and time estimates for a training run: what a first run starts from, and how long it takes here.

A preset is a whole :class:`~trainer.config.TrainConfig` for a (dataset, base model, effort level):

- the base is the dataset's own ``train.toml`` when it has one (its trigger word, captions, buckets,
  sample prompts and adapter layers are facts about that dataset), else the config's defaults;
- the level (``quick``, ``balanced``, ``high quality``: ``PRESET_LEVELS``) sets steps, rank, learning rate,
  batch size, schedule and warmup from the base model's family (``Family.training_presets``), or, on an
  embedded tiny model, from ``studio.core.embedded.EMBEDDED_PRESET_OVERRIDES`` (tens of steps, not
  thousands), with samples and checkpoints every fifth of the run;
- a dataset with a ``train.toml`` offers one more preset, :data:`OWN`: that file as it is.

A base model other than the one a ``train.toml`` names keeps the dataset's facts but not what belongs
to the other model: its resolution and bucket sizes (when the native resolutions differ), target
modules its family lacks (the family's widest preset instead) and, across families, the adapter name
(``striped-tiny-sdxl``: an adapter's versions keep one family).

An estimate scales this machine's earlier runs of the same base model (run directories under
``$LORA_STUDIO_HOME/runs`` and the job queue's: ``config.toml`` for batch and resolution,
``events.jsonl`` for seconds per step) by steps and by images x pixels per step. With no earlier run it
says so instead of inventing a number. It counts training steps only: loading the model and drawing
samples come on top.

Not here: widgets (``studio/app/ui/train_page.py``), the queue (``studio.app.jobs``).
"""

from __future__ import annotations

import functools
import re
import statistics
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from studio.core.base_models import resolve
from studio.core.embedded import EMBEDDED_MODELS, EMBEDDED_PRESET_OVERRIDES
from studio.core.errors import InvalidRequestError, StudioError
from studio.core.families import get_family
from studio.core.families.base import PRESET_LEVELS, Family, TrainingPreset
from studio.core.settings import get_settings
from trainer.config import TrainConfig, base_model_defaults
from trainer.events import CONFIG_FILE, EVENTS_FILE, read_events

OWN = "own"  # the preset that is the dataset's own train.toml
TRAIN_TOML = "train.toml"
LABELS = {"quick": "quick", "balanced": "balanced", "high quality": "high quality",
          OWN: "the dataset's own settings (train.toml)"}
NO_HISTORY = "no run of this model on this machine yet: the quick preset measures it"
# The newest runs of a model speak for it (the machine, drivers and the studio change); five is enough
# for a median to ignore one run slowed by other work.
MAX_RUNS = 5
# A run shorter than this measured mostly its first, slow steps (allocation, caches warming up).
MIN_MEASURED_STEPS = 5
# Prodigy's own authors' value: the config refuses an AdamW-sized rate with it (trainer.config.PRODIGY_MIN_LR).
PRODIGY_LR = 1.0
# Options a base model decides when left at 0: the dataset's values for another native resolution
# would train at the wrong size.
_MODEL_SIZED = ("resolution", "bucket_reso_steps", "min_bucket_reso", "max_bucket_reso")


# ---- presets ----------------------------------------------------------------------------------


def dataset_settings(folder: str | Path) -> TrainConfig | None:
    """The dataset's own ``train.toml`` as a config (relative paths taken from its folder), or None.

    Raises :class:`~studio.core.errors.ConfigError` for a file that is there but wrong, naming the option.
    """
    toml = Path(folder) / TRAIN_TOML
    return TrainConfig.from_toml(toml) if toml.is_file() else None


def preset_keys(settings: TrainConfig | None) -> tuple[str, ...]:
    """The presets a dataset offers: the levels, and :data:`OWN` when it has its own settings."""
    return PRESET_LEVELS + ((OWN,) if settings is not None else ())


def family_of(base_model: str) -> Family:
    """The family of a base model as typed (reads config files only, never weights)."""
    return get_family(resolve(base_model).family)


def level_numbers(level: str, base_model: str) -> TrainingPreset:
    """Steps, rank, learning rate, batch, schedule and warmup of ``level`` on ``base_model``."""
    family = family_of(base_model)
    if level not in family.training_presets:
        raise InvalidRequestError(f"unknown preset {level!r}: choose one of {', '.join(PRESET_LEVELS)}")
    numbers = family.training_presets[level]
    if base_model.strip() in EMBEDDED_MODELS:
        numbers = replace(numbers, **EMBEDDED_PRESET_OVERRIDES[level])
    return numbers


def every_n(steps: int) -> int:
    """Samples and checkpoints every fifth of a run (20 steps: at 10 and 20; 1,500: every 300)."""
    return max(10, steps // 5)


def preset_config(key: str, *, dataset: str | Path, base_model: str,
                  settings: TrainConfig | None = None) -> TrainConfig:
    """The config of preset ``key`` (a level or :data:`OWN`) for ``dataset`` on ``base_model``.

    ``settings`` is the dataset's own config (:func:`dataset_settings`), read once by the caller.
    """
    base_model = base_model.strip()
    if key == OWN and settings is None:
        raise InvalidRequestError(f"{dataset} has no {TRAIN_TOML}: choose one of {', '.join(PRESET_LEVELS)}")
    own = settings if settings is not None else TrainConfig()
    data = own.to_dict()
    if settings is None:
        data["dataset"]["path"] = str(dataset)
    family = family_of(base_model)
    data["model"]["base_model"] = base_model
    name = own.output.name or _name_from_folder(data["dataset"]["path"])
    if settings is not None and base_model != own.model.base_model:
        if _native_resolution(base_model) != _native_resolution(own.model.base_model):
            data["dataset"].update(dict.fromkeys(_MODEL_SIZED, 0))
        if _family_name(own.model.base_model) not in (None, family.name):
            name = f"{name}-{base_model if base_model in EMBEDDED_MODELS else family.name}"
    data["output"]["name"] = name
    targets = data["network"]["target_modules"]
    if isinstance(targets, str) and targets not in family.target_modules:
        # e.g. LoCon's convolutions on a transformer: the family's widest preset (listed last)
        data["network"]["target_modules"] = list(family.target_modules)[-1]
    if key != OWN:
        numbers = level_numbers(key, base_model)
        training = data["training"]
        training.update(max_train_steps=numbers.max_train_steps, num_train_epochs=0,
                        learning_rate=numbers.learning_rate, train_batch_size=numbers.train_batch_size,
                        lr_scheduler=numbers.lr_scheduler, lr_warmup_steps=numbers.lr_warmup_steps)
        if training["optimizer"] == "prodigy":  # it sizes its own steps; learning_rate scales them
            training["learning_rate"] = PRODIGY_LR
        if training["optimizer"] == "adamw_schedulefree":  # it replaces the schedule
            training["lr_scheduler"] = "constant"
        network = data["network"]
        # The dataset's alpha / rank ratio is kept, so a larger rank does not change the update's scale.
        network["lora_alpha"] = float(numbers.rank * own.network.lora_alpha / own.network.rank)
        network["rank"] = numbers.rank
        data["validation"]["every_n_steps"] = every_n(numbers.max_train_steps)
        data["output"]["checkpointing_steps"] = every_n(numbers.max_train_steps)
    return TrainConfig.from_dict(data)


def _name_from_folder(path: str) -> str:
    # The name the trainer gives a run with no output.name (trainer.config), shown so the user sees it.
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(path).name).strip(".-")[:64]
    return name or "lora"


def _native_resolution(base_model: str) -> int | None:
    try:
        return base_model_defaults(base_model)["native_resolution"]
    except StudioError:  # a train.toml naming a model this machine lacks: its sizes cannot be trusted
        return None


def _family_name(base_model: str) -> str | None:
    try:
        return family_of(base_model).name
    except StudioError:
        return None


# ---- time estimates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpeed:
    """How fast one earlier run trained, read from its run directory."""

    run_dir: str
    base_model: str
    sec_per_step: float  # the trainer's mean over its last 20 optimizer steps
    images_per_step: int  # batch x gradient accumulation x processes
    resolution: int  # training side in pixels
    measured_at: float  # when its events file was last written (Unix seconds)

    @property
    def sec_per_image_megapixel(self) -> float:
        """Seconds per image of one megapixel: what scales to another batch size or resolution."""
        return self.sec_per_step / (self.images_per_step * self.resolution**2 / 1e6)


@dataclass(frozen=True)
class TimeEstimate:
    """A run's training time on this machine, or why there is none (``seconds`` None)."""

    seconds: float | None
    runs: int  # earlier runs it is drawn from
    text: str  # one line for a page or a command's output


def run_speeds(run_dirs: Iterable[str | Path] = ()) -> list[RunSpeed]:
    """The measured speed of every run under ``$LORA_STUDIO_HOME/runs`` and in ``run_dirs`` (e.g. the
    job queue's run directories), newest first. Runs without enough steps or a readable config are left out.
    """
    candidates: list[Path] = []
    root = get_settings().home / "runs"
    if root.is_dir():
        candidates += sorted(p for p in root.iterdir() if p.is_dir())
    candidates += [Path(d) for d in run_dirs]
    speeds, seen = [], set()
    for folder in candidates:
        key = str(folder.resolve())
        if key in seen:
            continue
        seen.add(key)
        events = folder / EVENTS_FILE
        try:
            stat = events.stat()
        except OSError:
            continue  # never started
        speed = _speed_of(key, stat.st_mtime_ns, stat.st_size)
        if speed is not None:
            speeds.append(speed)
    speeds.sort(key=lambda s: s.measured_at, reverse=True)
    return speeds


@functools.lru_cache(maxsize=512)
def _speed_of(run_dir: str, mtime_ns: int, size: int) -> RunSpeed | None:
    # mtime and size are the cache key only: a run still writing events is read again.
    try:
        config = tomllib.loads((Path(run_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
        base_model = str(config["model"]["base_model"])
        batch = int(config["training"]["train_batch_size"])
        accumulation = int(config["training"].get("gradient_accumulation_steps", 1))
        resolution = int(config["dataset"]["resolution"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    events = read_events(run_dir)
    steps = [e for e in events if e["event"] == "step" and e.get("sec_per_step")]
    starts = [e for e in events if e["event"] == "start"]
    if len(steps) < MIN_MEASURED_STEPS or batch < 1 or accumulation < 1 or resolution < 1:
        return None
    processes = int((starts[-1].get("num_processes") if starts else None) or 1)
    return RunSpeed(run_dir=run_dir, base_model=base_model, sec_per_step=float(steps[-1]["sec_per_step"]),
                    images_per_step=batch * accumulation * processes, resolution=resolution,
                    measured_at=mtime_ns / 1e9)


def estimate(config: TrainConfig, speeds: list[RunSpeed]) -> TimeEstimate:
    """How long ``config`` trains on this machine, from earlier runs of its base model (:func:`run_speeds`).

    Each of the newest :data:`MAX_RUNS` runs of the same base model gives its seconds per image-megapixel;
    their median times this config's images x pixels per step times its steps is the estimate. A rough
    guide: rank, precision and memory options change the cost too, and attention grows faster than the
    pixel count. A config that trains by epochs gets no number: its steps depend on the buckets the
    dataset makes, which the trainer counts when it starts (the job's progress then shows the time left).
    """
    base_model = config.model.base_model.strip()
    mine = [s for s in speeds if s.base_model == base_model][:MAX_RUNS]
    if not mine:
        return TimeEstimate(None, 0, NO_HISTORY)
    steps = config.training.max_train_steps
    if not steps:
        return TimeEstimate(None, len(mine), "trains by epochs: the steps are counted when the run starts")
    resolution = config.dataset.resolution or _native_resolution(base_model)
    if not resolution:
        return TimeEstimate(None, len(mine), f"the native resolution of {base_model} is unknown here")
    t = config.training
    per_image_mp = statistics.median(s.sec_per_image_megapixel for s in mine)
    seconds = steps * per_image_mp * t.train_batch_size * t.gradient_accumulation_steps * resolution**2 / 1e6
    runs = f"{len(mine)} earlier run{'s' if len(mine) > 1 else ''}"
    return TimeEstimate(seconds, len(mine), f"about {duration(seconds)} of training (from {runs} of {base_model} "
                                            f"here)")


def duration(seconds: float) -> str:
    """``12 s``, ``4 min``, ``2 h 05 min``: as precise as an estimate deserves."""
    if seconds < 59.5:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


__all__ = [
    "LABELS",
    "NO_HISTORY",
    "OWN",
    "RunSpeed",
    "TimeEstimate",
    "dataset_settings",
    "duration",
    "estimate",
    "every_n",
    "family_of",
    "level_numbers",
    "preset_config",
    "preset_keys",
    "run_speeds",
]
