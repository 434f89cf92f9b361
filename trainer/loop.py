"""The training loop: a :class:`~trainer.config.TrainConfig` in, an adapter file (and registry version) out.

:func:`train` runs one run directory (layout in ``trainer/events.py``) under ``accelerate``: one
process, or several started by ``accelerate launch --multi_gpu --num_processes N`` (gloo on a CPU
machine), each training on its shard of every epoch's batches while only the main process writes.

The order of work, and why:

1. Scan the dataset and split off held-out images, before any model is loaded: a bad dataset
   fails in a second, not after a minute of loading.
2. Load the base model the studio's way (``studio.core.base_models.load_fresh_pipeline``), freeze it,
   inject peft adapter layers (``trainer/methods.py``) into the family's denoiser and optionally its
   LoRA-bearing text encoders. Modules are held, saved and restored by their pipeline component
   names (``unet``, ``text_encoder``, ...), which are also the key prefixes of checkpoints and adapters.
3. Every random choice is a pure function of (seed, step): data order and augmentation come from
   ``trainer/data.py`` per (seed, epoch, sample), and the noise, timesteps and adapter dropout of a
   micro-batch from a generator seeded by (seed, optimizer step, micro-batch, process). So a run
   resumed from a checkpoint continues the same trajectory bit for bit, without pickled RNG state.
4. VAE latents and frozen text embeddings come from ``trainer/caches.py``.
5. Every ``validation.every_n_steps`` and at the end: a validation loss on held-out images at fixed
   timesteps and noise (comparable across steps and runs), and sample images made by
   ``studio.generation.run`` (the code the studio serves with) from the training modules themselves.
6. Checkpoints (adapter tensors, optimizer and schedule state; safetensors + JSON, nothing
   pickled) are written to a temporary folder and renamed into place, then rotated. SIGINT/SIGTERM
   finish the current step, save a checkpoint and stop cleanly; a NaN/inf loss stops the run and
   keeps the last good checkpoint.
7. The finished adapter is written in diffusers/peft format with kohya ``ss_*``, ModelSpec and the
   studio's own metadata, and registered as a new version with its lineage.

Not here: the config (``trainer/config.py``), datasets (``trainer/data.py``), adapter methods
(``trainer/methods.py``), the event file format (``trainer/events.py``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import shutil
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from tqdm.auto import tqdm

from adapters.formats import build_metadata, to_diffusers
from studio.core.atomic import write_bytes_atomic, write_folder_atomic
from studio.core.base_models import (
    component_sha256,
    load_fresh_pipeline,
    model_hash,
    recommended_settings,
    resolve,
)
from studio.core.errors import (
    AdapterNotFoundError,
    CheckpointError,
    ConfigError,
    StudioError,
    TrainingDivergedError,
    TrainingOutOfMemoryError,
)
from studio.core.families import get_family
from studio.core.jsonutil import jsonable
from studio.core.quantize import quantize_blocks
from studio.core.thirdparty import allow_bitsandbytes
from trainer import memory, methods
from trainer.caches import TensorCache, cache_root
from trainer.config import TrainConfig
from trainer.events import CONFIG_FILE, REPORT_FILE, RESULT_FILE, EventLog, write_json_atomic

# torch, diffusers, accelerate and safetensors.torch (seconds), and the modules that pull in PIL or
# SQLAlchemy (trainer.data, the registry, generation) are imported inside the functions that use them:
# trainer.cli and studio.app.cleanup import this module, so `python -m trainer --help` and every
# `lora-studio` command would otherwise pay for them.

CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
# Adapter files of the checkpoint steps, kept when the full states rotate: the candidates a user compares.
SNAPSHOTS = "snapshots"
EMA_PREFIX = "ema."  # a checkpoint's EMA tensors, beside the adapter's <component>.<key> tensors
ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
# Fixed points of the validation loss: 4 timesteps spread over the schedule (centres of 4 equal
# slices: 125, 375, 625, 875 of 1000), one fixed noise per (image, timestep).
VALIDATION_TIMESTEP_SLICES = 4
# Options that may change between a checkpoint and the run resuming it (the rest must match).
RESUMABLE_CHANGES = {("training", "max_train_steps"), ("training", "num_train_epochs"), ("validation", "prompts"),
                     ("validation", "seeds"), ("validation", "every_n_steps"), ("output", "checkpointing_steps"),
                     ("output", "checkpoints_total_limit"), ("output", "dir")}
METADATA_NAMESPACE = "lora_studio.training"


@dataclass
class TrainResult:
    """How a run ended; ``result.json`` and the ``--json`` line hold :meth:`to_dict`."""

    status: str  # done | stopped | failed
    run_dir: str
    message: str = ""
    adapter: str | None = None
    ref: str | None = None
    steps: int = 0
    total_steps: int = 0
    final_loss: float | None = None
    val_loss: float | None = None
    checkpoint: str | None = None
    seconds: float = 0.0
    samples: list[str] = field(default_factory=list)
    stopped_by: str | None = None  # SIGINT, SIGTERM or stop_at_step, when status is "stopped"

    def to_dict(self) -> dict:
        return asdict(self)


class _Stop:
    """SIGINT/SIGTERM (or a test's ``stop_at_step``) asks the loop to stop after the current step."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. not in a UI worker)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        self.requested = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _derive_seed(*parts: int) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------
# run directories and checkpoints
# ------------------------------------------------------------------------------------------


def new_run_dir(config: TrainConfig) -> Path:
    """``<output.dir>/<output.name>-<UTC time>`` (a suffix keeps two runs in one second apart)."""
    root = Path(config.output.dir)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        candidate = root / (f"{config.output.name}-{stamp}" + (f"-{i}" if i else ""))
        if not candidate.exists():
            return candidate
    raise StudioError(f"cannot find a free run directory name under {root}")


def snapshot_path(run_dir: str | Path, name: str, step: int) -> Path:
    """Where the adapter file of checkpoint ``step`` goes: ``snapshots/<name>-step-NNNNNN.safetensors``."""
    return Path(run_dir) / SNAPSHOTS / f"{name}-step-{step:06d}.safetensors"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary, half-written folders are ignored)."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / STATE_FILE).is_file():
            try:
                found.append((int(p.name[len(CHECKPOINT_PREFIX):]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(found)]


def find_resume_point(resume: str, config: TrainConfig | None, run_dir: str | Path | None) -> Path:
    """The checkpoint folder ``--resume`` means.

    ``latest``: the newest checkpoint of ``run_dir`` if given, else of the newest run of
    ``output.name`` under ``output.dir``. A path: a checkpoint folder, or a run directory (its newest
    checkpoint).
    """
    if resume == "latest":
        if run_dir is not None:
            runs = [Path(run_dir)]
        else:
            if config is None:
                raise CheckpointError("--resume latest needs a config or --run-dir to know which run to continue")
            root = Path(config.output.dir)
            runs = sorted((p for p in root.glob(f"{config.output.name}-*") if p.is_dir()),
                          key=lambda p: p.stat().st_mtime, reverse=True) if root.is_dir() else []
        for run in runs:
            checkpoints = list_checkpoints(run)
            if checkpoints:
                return checkpoints[-1]
        where = run_dir if run_dir is not None else f"{config.output.dir} (runs named {config.output.name}-*)"
        raise CheckpointError(f"no checkpoint to resume in {where}: start the run without --resume")
    path = Path(resume).expanduser()
    if (path / STATE_FILE).is_file():
        return path
    checkpoints = list_checkpoints(path)
    if checkpoints:
        return checkpoints[-1]
    if not path.exists():
        raise CheckpointError(f"--resume {resume}: no such folder; give a run directory, a checkpoint folder or "
                              f"'latest'")
    raise CheckpointError(f"--resume {resume}: neither a checkpoint (no {STATE_FILE}) nor a run directory with "
                          f"checkpoints")


def _config_changes(saved: dict, current: dict) -> list[str]:
    changed = []
    for section, options in current.items():
        for option, value in options.items():
            if (section, option) in RESUMABLE_CHANGES:
                continue
            if saved.get(section, {}).get(option) != value:
                changed.append(f"{section}.{option} ({saved.get(section, {}).get(option)!r} -> {value!r})")
    return changed


def _flatten_optimizer(state: dict) -> tuple[dict[str, Any], dict]:
    """An optimizer ``state_dict`` -> (tensors for safetensors, the rest as JSON). Nothing pickled."""
    import torch  # lazy: keeps torch off `python -m trainer --help`

    tensors: dict[str, Any] = {}
    plain: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
    for pid, entry in state["state"].items():
        kept = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}/{name}"] = value.detach().to("cpu").contiguous()
            else:
                kept[name] = value
        plain["state"][str(pid)] = kept
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, Any], plain: dict) -> dict:
    state: dict[int, dict[str, Any]] = {int(pid): dict(kept) for pid, kept in plain["state"].items()}
    for key, value in tensors.items():
        pid, _, name = key.partition("/")
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, *, adapter: dict[str, Any], optimizer_state: dict,
                    state: dict) -> Path:
    """Write checkpoint ``step`` atomically: a temporary folder, fsynced, then renamed into place.

    A crash mid-save leaves only a dot-folder that :func:`list_checkpoints` ignores, so the previous
    checkpoint stays the one ``--resume latest`` uses; a full disk raises
    :class:`~studio.core.errors.DiskFullError` with the temporary folder already removed.
    """
    from safetensors.torch import save  # lazy: safetensors.torch imports torch

    # Serialized in memory, then written by the atomic writer: safetensors' own save_file reports a
    # full disk as a SafetensorError with no errno, which the one place that names full disks
    # (studio.core.atomic) could not recognise. A checkpoint is the adapter plus ~2x it of AdamW state.
    tensors, plain = _flatten_optimizer(optimizer_state)
    files = {ADAPTER_FILE: save(adapter), OPTIMIZER_FILE: save(tensors),
             "optimizer.json": json.dumps(plain, sort_keys=True).encode(),
             STATE_FILE: json.dumps(state, sort_keys=True, indent=2).encode()}

    def fill(tmp: Path) -> None:
        for name, data in files.items():
            write_bytes_atomic(tmp / name, data)

    # A checkpoint of the same step may exist (a stop right after a periodic save): it is replaced.
    return write_folder_atomic(run_dir / CHECKPOINTS / f"{CHECKPOINT_PREFIX}{step:06d}", fill)


def load_checkpoint(folder: Path) -> tuple[dict[str, Any], dict, dict]:
    """(adapter tensors, optimizer state_dict, state) of a checkpoint; a damaged one is a clear error."""
    from safetensors.torch import load_file  # lazy: safetensors.torch imports torch

    try:
        state = json.loads((folder / STATE_FILE).read_text())
        adapter = load_file(str(folder / ADAPTER_FILE))
        optimizer = _unflatten_optimizer(load_file(str(folder / OPTIMIZER_FILE)),
                                         json.loads((folder / "optimizer.json").read_text()))
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise CheckpointError(f"checkpoint {folder} is unreadable ({e}); resume from an earlier one "
                              f"(--resume <run>/checkpoints/checkpoint-N)") from None
    return adapter, optimizer, state


def rotate_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (0 = keep all); returns what was removed."""
    if keep <= 0:
        return []
    checkpoints = list_checkpoints(run_dir)
    removed = checkpoints[:-keep]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    for p in (run_dir / CHECKPOINTS).glob(".tmp-*"):  # leftovers of a crash mid-save
        shutil.rmtree(p, ignore_errors=True)
    return removed


# ------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------


def _select_dtype(mixed_precision: str):
    import torch  # lazy: keeps torch off `python -m trainer --help`

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


# training.optimizer -> the class kohya's metadata names (ss_optimizer), as A1111 and Civitai show it.
OPTIMIZER_CLASSES = {"adamw": "torch.optim.AdamW", "adamw8bit": "bitsandbytes.optim.AdamW8bit",
                     "prodigy": "prodigyopt.Prodigy", "lion": "lion_pytorch.Lion",
                     "adamw_schedulefree": "schedulefree.AdamWScheduleFree"}


def _make_optimizer(config: TrainConfig, groups: list[dict]):
    t = config.training
    options = {"lr": t.learning_rate, "betas": (t.adam_beta1, t.adam_beta2), "weight_decay": t.adam_weight_decay,
               "eps": t.adam_epsilon}
    if t.optimizer == "prodigy":
        from prodigyopt import Prodigy

        # Decoupled weight decay and bias correction as kohya's Prodigy presets; d is estimated per group.
        return Prodigy(groups, use_bias_correction=True, safeguard_warmup=t.lr_warmup_steps > 0, decouple=True,
                       **options)
    if t.optimizer == "lion":
        from lion_pytorch import Lion

        return Lion(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.adam_weight_decay)
    if t.optimizer == "adamw_schedulefree":
        from schedulefree import AdamWScheduleFree

        return AdamWScheduleFree(groups, warmup_steps=t.lr_warmup_steps, **options)
    if t.optimizer == "adamw8bit":
        try:
            bnb = allow_bitsandbytes()  # heavy, optional and noisy at import: only when asked for
        except ImportError:
            raise ConfigError("training.optimizer = \"adamw8bit\" needs bitsandbytes: pip install bitsandbytes "
                              "(or use \"adamw\")", option="training.optimizer") from None
        return bnb.optim.AdamW8bit(groups, **options)
    import torch  # lazy: keeps torch off `python -m trainer --help`

    # fused: one kernel over every adapter tensor instead of a Python loop over hundreds of small
    # ones; the per-tensor loop took 32 ms of a 290 ms tiny-model step on CPU (LoCon, rank 8).
    return torch.optim.AdamW(groups, fused=True, **options)


def _resolution_shift(scheduler_config, latent_size) -> float:
    """Flux's resolution-dependent shift, exp(mu), mu linear in the packed token count between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift): 1.0 for a scheduler without
    dynamic shifting (its static ``shift`` is then used)."""
    if not scheduler_config.get("use_dynamic_shifting"):
        return float(scheduler_config.get("shift", 1.0))
    tokens = (latent_size[0] // 2) * (latent_size[1] // 2)
    lo, hi = scheduler_config.get("base_image_seq_len", 256), scheduler_config.get("max_image_seq_len", 4096)
    lo_mu, hi_mu = scheduler_config.get("base_shift", 0.5), scheduler_config.get("max_shift", 1.15)
    return math.exp(lo_mu + (tokens - lo) * (hi_mu - lo_mu) / (hi - lo))


def _flow_loss_weight(scheme: str, sigmas):
    """diffusers' ``compute_loss_weighting_for_sd3``: none, sigma_sqrt (1 / s^2) or cosmap."""
    import torch

    if scheme == "sigma_sqrt":
        return (sigmas.float() ** -2.0).clamp(max=1e4)
    if scheme == "cosmap":
        bot = 1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2
        return 2 / (math.pi * bot)
    return torch.ones_like(sigmas, dtype=torch.float32)


def _compute_snr(alphas_cumprod, timesteps):
    # SNR(t) = alpha_bar / (1 - alpha_bar) (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR")
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


class Trainer:
    """One run: build with a resolved config, then :meth:`run`. :func:`train` is the usual entry."""

    def __init__(self, config: TrainConfig, *, run_dir: Path, resume_from: Path | None = None,
                 register: bool = True, console: bool = True, stop_at_step: int | None = None) -> None:
        self.config = config
        self.run_dir = run_dir
        self.resume_from = resume_from
        self.register_result = register
        self.console = console
        self.stop_at_step = stop_at_step
        self.stop = _Stop()
        self._started = time.time()

    # ---- setup -------------------------------------------------------------------------

    def _setup(self) -> None:
        # lazy: keeps torch, accelerate and diffusers off `python -m trainer --help` and `lora-studio`
        import diffusers
        import torch
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from diffusers.optimization import get_scheduler

        from trainer.data import open_training_dataset  # lazy: imports PIL and numpy

        c = self.config
        # 1. data first: a bad dataset stops before any model is loaded
        dataset = open_training_dataset(c.dataset, seed=c.training.seed)
        self.train_set, self.held_out = dataset.split_held_out(count=c.validation.held_out_count,
                                                               fraction=c.validation.held_out_fraction)
        self.report = dataset.report

        log_with = None
        try:
            import tensorboard  # noqa: F401  (a dependency; still optional for an install that dropped it)

            # Loss, learning rate, validation loss and sample images under <run>/lora_studio:
            # tensorboard --logdir $LORA_STUDIO_HOME/runs shows every run.
            log_with = "tensorboard"
        except ImportError:
            pass
        mixed = c.training.mixed_precision
        if mixed != "no" and not torch.cuda.is_available():
            # fp16/bf16 autocast on CPU is slower than fp32 and fp16 is unsupported for many ops:
            # train in fp32 and say so, rather than fail.
            self.precision_note = f"training.mixed_precision = {mixed} needs a GPU; training in fp32 on CPU"
            mixed = "no"
        else:
            self.precision_note = ""
        # cpu=True on a machine without CUDA: accelerate only sets up gloo for several CPU processes
        # (`accelerate launch --multi_gpu` or torchrun) when told the run is on CPU; without it each
        # process would silently train alone on the whole dataset.
        self.accelerator = Accelerator(mixed_precision=mixed, log_with=log_with, project_dir=str(self.run_dir),
                                       cpu=not torch.cuda.is_available())
        acc = self.accelerator
        self.main = acc.is_main_process
        self.rank, self.world = acc.process_index, acc.num_processes
        set_seed(c.training.seed)
        self.log = EventLog(self.run_dir) if self.main else None

        # 2. the base model, frozen, with adapters injected
        self.resolved = resolve(c.model.base_model)
        self.family = family = get_family(self.resolved.family)
        pipe = load_fresh_pipeline(c.model.base_model)
        self.pipe = pipe
        self.weight_dtype = _select_dtype(mixed)
        device = acc.device
        self.vae = pipe.vae
        # The denoiser and the text encoders by component name (accelerate-prepared once they train),
        # the tokenizers the same way: the family's conditioning hook takes them as the pipeline names them.
        self.models: dict[str, Any] = {family.denoiser: getattr(pipe, family.denoiser)}
        self.models.update({te.component: getattr(pipe, te.component) for te in family.text_encoders})
        self.tokenizers = {te.tokenizer: getattr(pipe, te.tokenizer) for te in family.text_encoders}
        for m in (*self.models.values(), self.vae):
            m.requires_grad_(False)
            m.to(device, dtype=self.weight_dtype)
        if c.model.max_sequence_length and not family.t5_max_length:
            raise ConfigError(f"model.max_sequence_length is the T5 prompt length of FLUX.1 and SD3; "
                              f"{family.display_name} has no T5 encoder: leave it 0",
                              option="model.max_sequence_length")
        if family.objective == "flow_matching":
            if c.training.prediction_type not in ("", "flow_matching") or c.training.min_snr_gamma:
                option = "training.min_snr_gamma" if c.training.min_snr_gamma else "training.prediction_type"
                raise ConfigError(f"{family.display_name} is a flow-matching model: it predicts the flow, so "
                                  f"{option} does not apply; leave it unset (see training.timestep_sampling, "
                                  f"flow_shift and loss_weighting)", option=option)
            self.noise_scheduler = getattr(diffusers, family.training_scheduler).from_config(pipe.scheduler.config)
        else:
            if c.training.precondition_outputs:
                raise ConfigError(f"training.precondition_outputs is for flow-matching models (SD3, Flux); "
                                  f"{family.display_name} predicts {family.objective}: leave it false",
                                  option="training.precondition_outputs")
            self.noise_scheduler = getattr(diffusers, family.training_scheduler).from_config(
                pipe.scheduler.config, prediction_type=c.training.prediction_type)
        # channels_last: a UNet's convolutions run faster in NHWC on CPUs and on GPU tensor cores
        # (diffusers recommends it for inference too); 0.24 -> 0.20 s per tiny-model step on CPU.
        # Before injecting: the adapter weights stay contiguous, as peft's DoRA conv path needs
        # (it reshapes them with .view).
        self.denoiser.to(memory_format=torch.channels_last)
        self.quantized = None
        if c.model.quantize != "no":
            # Frozen block layers in NF4/int8 (QLoRA); the LoRA injected next wraps them and trains in fp32.
            self.quantized = quantize_blocks(self.denoiser, c.model.quantize, device=device,
                                             compute_dtype=self.weight_dtype)
        # The components that train, denoiser first: its peft config per component name.
        trained = [family.denoiser]
        if c.network.train_text_encoder:
            text_encoders = [name for name in family.lora_components if name != family.denoiser]
            if not text_encoders:
                raise ConfigError(f"{family.display_name} has no text encoder the studio trains adapters on: "
                                  f"set network.train_text_encoder = false", option="network.train_text_encoder")
            trained += text_encoders
        self.peft_configs = {name: methods.peft_config(c.network, family, name) for name in trained}
        params = {name: methods.inject(self.models[name], config) for name, config in self.peft_configs.items()}
        denoiser_params = params[family.denoiser]
        te_params = [p for name in trained[1:] for p in params[name]]
        # Trainable adapter weights stay fp32 even when the frozen base runs in fp16/bf16 (as the
        # diffusers scripts' cast_training_params does): fp16 master weights lose small updates.
        for p in denoiser_params + te_params:
            p.data = p.data.float()
        if c.training.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()  # diffusers' name
            for name in trained[1:]:
                self.models[name].gradient_checkpointing_enable()  # transformers' name
        for name, model in self.models.items():
            model.train(name in self.peft_configs)
        self.vae.eval()
        self.param_count = sum(p.numel() for p in denoiser_params + te_params)
        self._estimate_memory(pipe, device)

        groups = [{"params": denoiser_params, "lr": c.training.learning_rate}]
        if te_params:
            groups.append({"params": te_params, "lr": c.network.text_encoder_lr})
        optimizer = _make_optimizer(c, groups)

        # 3. steps: each epoch's bucket batches are dealt round-robin to the processes, trimmed to
        # a multiple of the process count so that every process steps the same number of times.
        self.ga = c.training.gradient_accumulation_steps
        self.micro_per_epoch = len(self._epoch_batches(0))
        if self.micro_per_epoch == 0:
            raise ConfigError(f"{len(self.train_set)} training sample(s) make fewer batches than the {self.world} "
                              f"processes: add images or repeats, or use fewer processes",
                              option="training.train_batch_size")
        self.updates_per_epoch = math.ceil(self.micro_per_epoch / self.ga)
        t = c.training
        self.total_steps = t.max_train_steps or t.num_train_epochs * self.updates_per_epoch
        # Not passed through accelerator.prepare: it steps once per optimizer step, whatever the
        # process count (prepare would step it once per process).
        # Schedule-free AdamW warms up inside the optimizer: the outer schedule stays flat.
        warmup = 0 if t.optimizer == "adamw_schedulefree" else t.lr_warmup_steps
        self.lr_scheduler = get_scheduler(t.lr_scheduler, optimizer=optimizer, num_warmup_steps=warmup,
                                          num_training_steps=self.total_steps)
        *prepared, self.optimizer = acc.prepare(*(self.models[name] for name in trained), optimizer)
        self.models.update(zip(trained, prepared, strict=True))
        self.trainable = denoiser_params + te_params
        # The EMA's copies live beside the parameters, in float32 whatever the training precision.
        self.ema = [p.detach().float().clone() for p in self.trainable] if t.ema_decay else None

        # 4. caches
        self.cache_latents = not c.dataset.random_crop
        vae_hash = component_sha256(self.resolved, "vae") or model_hash(self.resolved) or c.model.base_model
        te_hashes = [component_sha256(self.resolved, name) for name in family.text_encoder_components]
        if te_hashes and all(te_hashes):
            # one text encoder: its own hash; several: one key over all (any of them changes the embeddings)
            te_hash = te_hashes[0] if len(te_hashes) == 1 else TensorCache.key(*te_hashes)
        else:
            te_hash = model_hash(self.resolved) or c.model.base_model
        self.latent_cache = TensorCache(cache_root() / "latents" / vae_hash[:16])
        # "conditioning": entries hold the family's denoiser kwargs by name (an older "text" cache
        # held one unnamed tensor per caption)
        self.text_cache = TensorCache(cache_root() / "conditioning" / te_hash[:16])
        self.model_hash = model_hash(self.resolved)

    def _estimate_memory(self, pipe, device) -> None:
        """The run's memory estimate (:mod:`trainer.memory`), logged at the start; on a GPU, the
        device's memory and, when the estimate exceeds it, the settings that would fit."""
        import torch  # lazy: keeps torch off `python -m trainer --help`

        text_tokens = min(512, max((int(getattr(t, "model_max_length", 77)) for t in self.tokenizers.values()),
                                   default=77))
        self.memory_sizes = memory.sizes_of(pipe.components, self.family, self.param_count, text_tokens)
        on_gpu = device.type == "cuda"
        self.memory_estimate = memory.estimate(self.config, self.memory_sizes, on_gpu=on_gpu)
        self.memory_available = torch.cuda.mem_get_info(device)[1] if on_gpu else None
        self.memory_note = f"memory estimate {self.memory_estimate.describe()}"
        if self.memory_available is not None:
            self.memory_note += f" of the GPU's {self.memory_available / memory.GIB:.1f} GiB"
            if self.memory_estimate.total > self.memory_available:
                self.memory_note += "; " + self._what_would_fit()

    def _what_would_fit(self) -> str:
        changes = memory.settings_that_fit(self.config, self.memory_sizes, self.memory_available)
        if changes is None:
            return ("no combination of gradient checkpointing, 8-bit AdamW, bf16, NF4 and batch 1 fits: lower "
                    "dataset.resolution or network.rank")
        return "settings that would fit: " + ", ".join(changes) if changes else "the estimate fits"

    def _out_of_memory(self, step: int) -> TrainingOutOfMemoryError:
        what = (f"the GPU ran out of memory at step {step + 1} ({self.memory_note})" if self.memory_available else
                f"out of memory at step {step + 1} ({self.memory_note})")
        if self.memory_available is not None and "settings that would fit" not in what:
            what += "; " + self._what_would_fit()
        return TrainingOutOfMemoryError(what + "; the last checkpoint is kept")

    @property
    def denoiser(self):
        """The denoiser (UNet or transformer), as accelerate prepared it."""
        return self.models[self.family.denoiser]

    @property
    def trains_text_encoders(self) -> bool:
        """Whether text-encoder adapters train (then text embeddings are computed, not cached)."""
        return len(self.peft_configs) > 1

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        batches = self.train_set.bucket_batches(self.config.training.train_batch_size, epoch=epoch)
        usable = len(batches) // self.world * self.world
        return batches[:usable][self.rank::self.world]

    # ---- one step ----------------------------------------------------------------------

    def _unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def _latents(self, samples: list[dict], generator, *, deterministic: bool = False):
        """Scaled latents of a batch: cached posteriors sampled with ``generator`` (or their mean)."""
        import torch  # lazy: keeps torch off `python -m trainer --help`

        vae = self.vae
        moments = []
        missing = []
        keys = []
        for s in samples:
            key = self.latent_cache.key(s["sha256"], s["target_size"], s["crop_top_left"], s["flipped"],
                                        self.config.dataset.resolution)
            keys.append(key)
            entry = self.latent_cache.get(key) if self.cache_latents else None
            moments.append(entry)
            if entry is None:
                missing.append(len(moments) - 1)
        if missing:
            pixels = torch.stack([samples[i]["pixel_values"] for i in missing]).to(self.accelerator.device,
                                                                                    dtype=self.weight_dtype)
            with torch.no_grad():
                dist = vae.encode(pixels).latent_dist
            for j, i in enumerate(missing):
                entry = {"mean": dist.mean[j].float().cpu(), "std": dist.std[j].float().cpu()}
                moments[i] = entry
                if self.cache_latents:
                    self.latent_cache.put(keys[i], entry)
        mean = torch.stack([m["mean"] for m in moments])
        std = torch.stack([m["std"] for m in moments])
        if deterministic:
            latents = mean
        else:
            latents = mean + std * torch.randn(mean.shape, generator=generator)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = (latents - shift) * vae.config.scaling_factor
        return latents.to(self.accelerator.device, dtype=self.weight_dtype)

    def _text(self, captions: list[str]) -> dict:
        """The denoiser's conditioning for ``captions`` (the family's hook): cached per caption while
        the text encoders are frozen, else computed with grad."""
        import torch  # lazy: keeps torch off `python -m trainer --help`

        components = {**self.tokenizers, **{name: self.models[name] for name in self.family.text_encoder_components}}
        length = self.config.model.max_sequence_length or None
        if self.trains_text_encoders:
            return self.family.conditioning(components, captions, length)
        out: list[dict | None] = []
        missing = []
        for caption in captions:
            entry = self.text_cache.get(self._text_key(caption))
            out.append(entry)
            if entry is None:
                missing.append(len(out) - 1)
        if missing:
            with torch.no_grad():
                fresh = self.family.conditioning(components, [captions[i] for i in missing], length)
            for j, i in enumerate(missing):
                out[i] = {name: value[j].float().cpu() for name, value in fresh.items()}
                self.text_cache.put(self._text_key(captions[i]), out[i])
        return {name: torch.stack([row[name] for row in out]).to(self.accelerator.device, dtype=self.weight_dtype)
                for name in out[0]}

    def _text_key(self, caption: str) -> str:
        """A caption's conditioning-cache key; a set T5 length is part of it (the rows' shapes change)."""
        length = self.config.model.max_sequence_length
        return self.text_cache.key(caption, f"t5={length}") if length else self.text_cache.key(caption)

    def _sizes(self, samples: list[dict]) -> dict:
        """The family's per-image size conditioning (SDXL's ``time_ids``), batched; ``{}`` for families
        without any. Each image's original size, crop and bucket come from the bucketing that made it,
        so the model learns what a crop looks like instead of learning the crops."""
        import torch  # lazy: keeps torch off `python -m trainer --help`

        hook = self.family.size_conditioning
        if hook is None:
            return {}
        rows = [hook(tuple(s["original_size"]), tuple(s["crop_top_left"]), tuple(s["target_size"])) for s in samples]
        return {name: torch.stack([row[name] for row in rows]).to(self.accelerator.device, dtype=self.weight_dtype)
                for name in rows[0]}

    def _sample_sigmas(self, b: int, generator, latent_size) -> Any:
        """Noise levels for a flow-matching batch: drawn by ``training.timestep_sampling`` (diffusers'
        densities: logit-normal mean 0 std 1, "mode" with scale 1.29, uniform), then shifted by
        ``training.flow_shift`` (0: Flux's rule, k = exp(mu) with mu from the packed token count)."""
        import torch  # lazy: keeps torch off `python -m trainer --help`

        c = self.config.training
        if c.timestep_sampling == "logit_normal":
            u = torch.sigmoid(torch.randn(b, generator=generator))
        elif c.timestep_sampling == "mode":
            u = torch.rand(b, generator=generator)
            u = 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        else:
            u = torch.rand(b, generator=generator)
        k = c.flow_shift or _resolution_shift(self.noise_scheduler.config, latent_size)
        return k * u / (1 + (k - 1) * u)

    def _per_sample_mse(self, pred, target, samples: list[dict]):
        """Each sample's mean squared error; with ``dataset.masked_loss``, weighted by its mask brought to the
        latent grid (area average: a latent cell half covered counts half) and averaged over the weight, so
        a pixel outside the mask (weight ``unmasked_weight``, 0 by default) gives the adapter no gradient; a
        regularisation image's times ``dataset.prior_loss_weight``."""
        import torch
        import torch.nn.functional as F

        error = F.mse_loss(pred.float(), target.float(), reduction="none")
        d = self.config.dataset
        if not d.masked_loss:
            per_sample = error.mean(dim=(1, 2, 3))
        else:
            masks = torch.stack([s["mask"] for s in samples]).to(error.device, dtype=torch.float32)
            coverage = F.interpolate(masks, size=error.shape[-2:], mode="area")
            weight = d.unmasked_weight + (1.0 - d.unmasked_weight) * coverage  # b x 1 x h x w
            # sum over channels and cells / (channels x the weight's sum): a plain mean where the weight is all ones
            per_sample = (error * weight).sum(dim=(1, 2, 3)) / (weight.sum(dim=(1, 2, 3))
                                                                * error.shape[1]).clamp_min(1e-12)
        if any(s.get("reg") for s in samples):  # prior preservation: a class image's loss counts prior_loss_weight
            prior = torch.tensor([d.prior_loss_weight if s.get("reg") else 1.0 for s in samples], device=error.device)
            per_sample = per_sample * prior
        return per_sample

    def _loss(self, samples: list[dict], generator, *, timesteps=None, noise=None, denoiser=None, reduce=True):
        # lazy: keeps torch off `python -m trainer --help`
        import torch

        c = self.config.training
        sched = self.noise_scheduler
        latents = self._latents(samples, generator, deterministic=timesteps is not None)
        b = latents.shape[0]
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator)
            if c.noise_offset:
                # Offset noise (Guttenberg 2023): a per-channel constant lets the model shift overall brightness.
                noise = noise + c.noise_offset * torch.randn((b, latents.shape[1], 1, 1), generator=generator)
        noise = noise.to(latents.device, dtype=latents.dtype)
        conditioning = {**self._text([s["caption"] for s in samples]), **self._sizes(samples)}
        if self.family.objective == "flow_matching":
            # Rectified flow: x_s = (1 - s) x + s e, the model predicts the flow e - x at noise level s.
            sigmas = (timesteps.float() / sched.config.num_train_timesteps if timesteps is not None
                      else self._sample_sigmas(b, generator, latents.shape[-2:]))
            s = sigmas.view(-1, 1, 1, 1).to(latents.device, dtype=latents.dtype)
            pred = self.family.predict(denoiser or self.denoiser, (1 - s) * latents + s * noise,
                                       sigmas.to(latents.device), conditioning)
            if c.precondition_outputs:
                # diffusers' SD3 script: x_pred = noisy - s * pred against x. Since noisy - x = s (e - x), the
                # error is s * (e - x - pred): the flow loss with each sample weighted by s^2, computed so.
                pred, target = (1 - s) * latents + s * noise - s * pred, latents
            else:
                target = noise - latents
            per_sample = self._per_sample_mse(pred, target, samples)
            per_sample = per_sample * _flow_loss_weight(c.loss_weighting, sigmas).to(per_sample.device)
            return per_sample.mean() if reduce else per_sample
        if timesteps is None:
            timesteps = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator)
        timesteps = timesteps.to(latents.device).long()
        noisy = sched.add_noise(latents, noise, timesteps)
        if sched.config.prediction_type == "v_prediction":
            target = sched.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        pred = self.family.predict(denoiser or self.denoiser, noisy, timesteps, conditioning)
        per_sample = self._per_sample_mse(pred, target, samples)
        if c.min_snr_gamma:
            snr = _compute_snr(sched.alphas_cumprod, timesteps)
            clipped = torch.clamp(snr, max=c.min_snr_gamma)
            # epsilon: min(SNR, gamma) / SNR; v-prediction: min(SNR, gamma) / (SNR + 1)
            weight = clipped / (snr + 1) if sched.config.prediction_type == "v_prediction" else clipped / snr
            per_sample = per_sample * weight
        return per_sample.mean() if reduce else per_sample

    # ---- validation ----------------------------------------------------------------------

    def validation_loss(self) -> float | None:
        """Mean loss on the held-out images at fixed timesteps and fixed noise (no augmentation, no dropout)."""
        import torch  # lazy: keeps torch off `python -m trainer --help`

        if self.held_out is None or len(self.held_out) == 0:
            return None
        denoiser = self._unwrap(self.denoiser)
        was_training = denoiser.training
        denoiser.eval()
        T = self.noise_scheduler.config.num_train_timesteps
        fixed = [int(T * (k + 0.5) / VALIDATION_TIMESTEP_SLICES) for k in range(VALIDATION_TIMESTEP_SLICES)]
        total, count = 0.0, 0
        try:
            with torch.no_grad():
                for i in range(len(self.held_out)):
                    sample = self.held_out[i]
                    for k, t in enumerate(fixed):
                        seed = _derive_seed(self.config.training.seed, "val", sample["sha256"], k)
                        g = torch.Generator().manual_seed(seed)
                        lat_shape = self._latents([sample], None, deterministic=True).shape
                        noise = torch.randn(lat_shape, generator=g)
                        loss = self._loss([sample], None, timesteps=torch.tensor([t]), noise=noise,
                                          denoiser=denoiser)
                        total += float(loss)
                        count += 1
        finally:
            denoiser.train(was_training)
        return total / count

    def _sample_pipeline(self):
        """The family's text-to-image pipeline over the base's components, with the training modules in it."""
        pipe_cls = self.family.pipeline_class("text2img")
        # The options the base pipeline was built with (SD-1: requires_safety_checker=False), as
        # diffusers' from_pipe keeps them. from_pipe itself is not used: it casts every module to one
        # dtype (float32 unless told), and these modules are shared with training (the frozen base in
        # the weight dtype, the adapters in fp32).
        accepted = inspect.signature(pipe_cls.__init__).parameters
        options = {k: v for k, v in self.pipe.config.items() if k in accepted and k not in self.pipe.components}
        pipe = pipe_cls(**{**self.pipe.components, **{name: self._unwrap(m) for name, m in self.models.items()}},
                        **options)
        pipe.set_progress_bar_config(disable=True)  # the run's own bar is the one to watch
        return pipe

    def sample_images(self, step: int) -> list[str]:
        """Validation prompts x seeds through the generation path with the training modules; paths are run-relative."""
        # lazy: torch, and generation's SQLAlchemy and PIL, stay off `python -m trainer --help`
        import torch

        from studio.generation.requests import GenerationRequest
        from studio.generation.run import generate_with_pipeline

        v = self.config.validation
        if not v.prompts:
            return []
        models = {name: self._unwrap(m) for name, m in self.models.items()}
        states = {name: m.training for name, m in models.items()}
        for m in models.values():
            m.eval()
        out_dir = self.run_dir / "samples" / f"step-{step:06d}"
        paths = []
        size = self.config.dataset.resolution
        try:
            pipe = self._sample_pipeline()
            recommended = recommended_settings(self.resolved)
            with torch.no_grad():
                for p_i, prompt in enumerate(v.prompts):
                    for seed in v.seeds:
                        request = GenerationRequest(prompt=prompt, seed=seed, base_model=self.config.model.base_model,
                                                    width=size, height=size)
                        result = generate_with_pipeline(pipe, request, model_hash=self.model_hash,
                                                        recommended=recommended)
                        saved = result.save(out_dir, stem=f"p{p_i:02d}")
                        paths += [str(Path(p).relative_to(self.run_dir)) for p in saved]
        finally:
            for name, m in models.items():
                m.train(states[name] and name in self.peft_configs)
        return paths

    def _validate(self, step: int) -> tuple[float | None, list[str]]:
        val_loss = self.validation_loss()
        samples = self.sample_images(step)
        if self.log is not None:
            self.log.append("validation", step=step, val_loss=val_loss, samples=samples)
        if val_loss is not None:
            self.accelerator.log({"val_loss": val_loss}, step=step)
        self._log_sample_images(samples, step)
        return val_loss, samples

    def _log_sample_images(self, samples: list[str], step: int) -> None:
        """The validation samples beside the loss curves in TensorBoard (one image per prompt and seed, in
        the order the prompts are listed), so a run's progress can be seen as well as read."""
        tracker = next((t for t in self.accelerator.trackers if t.name == "tensorboard"), None)
        if tracker is None or not samples:
            return
        import numpy as np
        from PIL import Image

        for i, path in enumerate(samples):
            with Image.open(self.run_dir / path) as im:
                pixels = np.asarray(im.convert("RGB"))
            tracker.log_images({f"samples/{i}": pixels[None]}, step=step, dataformats="NHWC")

    # ---- checkpoints -----------------------------------------------------------------------

    def _adapter_states(self) -> dict[str, dict[str, Any]]:
        """Each training component's adapter tensors (peft key names), by component name."""
        return {name: methods.adapter_state_dict(self._unwrap(self.models[name])) for name in self.peft_configs}

    def _adapter_state(self) -> dict[str, Any]:
        """A checkpoint's adapter tensors: ``<component>.<peft key>`` (``unet.``, ``text_encoder.``...)."""
        return {f"{name}.{k}": v for name, sd in self._adapter_states().items() for k, v in sd.items()}

    def _checkpoint(self, step: int, epoch: int, last_loss: float | None) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        if self.main:
            state = {"step": step, "epoch": epoch, "total_steps": self.total_steps,
                     "lr_scheduler": self.lr_scheduler.state_dict(), "config": self.config.to_dict(),
                     "dataset_fingerprint": self.train_set.fingerprint, "last_loss": last_loss,
                     "num_processes": self.world, "saved_at": _now()}
            path = save_checkpoint(self.run_dir, step, adapter={**self._adapter_state(), **self._ema_state()},
                                   optimizer_state=self.optimizer.state_dict(), state=state)
            rotate_checkpoints(self.run_dir, self.config.output.checkpoints_total_limit)
            self.log.append("checkpoint", step=step, path=str(path.relative_to(self.run_dir)))
        acc.wait_for_everyone()
        return path

    def _restore(self, folder: Path) -> int:
        adapter, optimizer_state, state = load_checkpoint(folder)
        saved = state.get("config") or {}
        changed = _config_changes(saved, self.config.to_dict())
        if changed:
            raise CheckpointError(f"checkpoint {folder} was trained with other settings: {'; '.join(changed[:5])}. "
                                  f"Resume with the run's own config ({self.run_dir / CONFIG_FILE}) or start a new run")
        if state.get("dataset_fingerprint") != self.train_set.fingerprint:
            raise CheckpointError(f"the dataset changed since checkpoint {folder.name} (images added, removed or "
                                  f"edited): resuming would not continue the same run; start a new run")
        if state.get("num_processes", 1) != self.world:
            raise CheckpointError(f"checkpoint {folder.name} was made with {state.get('num_processes')} process(es), "
                                  f"this run has {self.world}: resume with the same number (each epoch's batches "
                                  f"are dealt to the processes)")
        for name in self.peft_configs:
            prefix = f"{name}."
            state_dict = {k.removeprefix(prefix): v for k, v in adapter.items() if k.startswith(prefix)}
            methods.load_adapter_state_dict(self._unwrap(self.models[name]), state_dict)
        if self.ema is not None:
            saved_ema = [adapter.get(key) for key in self._ema_state()]
            if any(t is None or t.shape != e.shape for t, e in zip(saved_ema, self.ema)):
                raise CheckpointError(f"checkpoint {folder.name} holds no EMA of these weights: resume with the run's "
                                      f"own config")
            self.ema = [t.float().clone() for t in saved_ema]
        try:
            self.optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {folder.name}: optimizer state does not fit this network ({e})") \
                from None
        self._match_state_layout()
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        return int(state["step"])

    def _ema_update(self, n: int) -> None:
        """Move the EMA towards the weights after the ``n``-th optimizer step: ema = d ema + (1 - d) w with
        d = min(ema_decay, n / (n + 9)) (diffusers' EMAModel warm-up: 0.1 at the first step, 0.5 at the 9th)."""
        if self.ema is None:
            return
        import torch

        decay = min(self.config.training.ema_decay, n / (n + 9))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.trainable], 1.0 - decay)

    def _ema_state(self) -> dict[str, Any]:
        """The EMA for a checkpoint, by position among the trainable parameters (the config, which a resume
        must match, fixes their order)."""
        return {f"{EMA_PREFIX}{i:06d}": t for i, t in enumerate(self.ema or ())}

    @contextmanager
    def _evaluation_weights(self):
        """The adapter as it should be evaluated and saved. Schedule-free AdamW trains on one sequence of
        weights (y) and averages another (x), the one to use: ``eval()`` swaps x in, ``train()`` back.
        Every process swaps (not only the main one, which samples), so the processes stay identical;
        a resumed run swaps at the same steps as an uninterrupted one, so it stays on its trajectory.
        Other optimizers train and evaluate the same weights: nothing happens."""
        swap = self.config.training.optimizer == "adamw_schedulefree"
        if swap:
            self.optimizer.eval()
        raw = self._swap_in_ema()
        try:
            yield
        finally:
            self._swap_back(raw)
            if swap:
                self.optimizer.train()

    def _swap_in_ema(self) -> list | None:
        """Put the EMA into the parameters (every process, as the schedule-free swap); returns the raw weights."""
        if self.ema is None:
            return None
        import torch

        with torch.no_grad():
            raw = [p.detach().clone() for p in self.trainable]
            for p, e in zip(self.trainable, self.ema):
                p.copy_(e)
        return raw

    def _swap_back(self, raw: list | None) -> None:
        if raw is None:
            return
        import torch

        with torch.no_grad():
            for p, r in zip(self.trainable, raw):
                p.copy_(r)

    def _match_state_layout(self) -> None:
        """Give restored optimizer moments their parameter's memory layout (strides).

        Checkpoints store tensors contiguous; conv adapter weights live channels_last. The fused
        AdamW kernel walks a parameter and its moments in storage order, so moments in another
        layout would be paired with the wrong elements: resumed runs drifted until this copy.
        """
        import torch  # lazy: keeps torch off `python -m trainer --help`

        for group in self.optimizer.param_groups:
            for p in group["params"]:
                entry = self.optimizer.state.get(p, {})
                for key, value in entry.items():
                    if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                        entry[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)

    # ---- the loop ----------------------------------------------------------------------------

    def run(self) -> TrainResult:
        import torch  # lazy: keeps torch off `python -m trainer --help`

        t_start = time.perf_counter()
        self._setup()
        acc = self.accelerator
        c = self.config
        step = 0
        if self.resume_from is not None:
            step = self._restore(self.resume_from)
        if hasattr(self.optimizer, "train"):
            self.optimizer.train()  # schedule-free AdamW steps only in train mode (a no-op for the others)
        total = self.total_steps
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            c.save(self.run_dir / CONFIG_FILE)
            write_json_atomic(self.run_dir / REPORT_FILE, self.report.to_dict())
            self.log.append("start", step=step, total_steps=total, resumed_from=str(self.resume_from or "") or None,
                            num_processes=self.world, samples_per_epoch=len(self.train_set),
                            held_out=len(self.held_out) if self.held_out is not None else 0,
                            trainable_parameters=self.param_count, precision_note=self.precision_note,
                            memory_note=self.memory_note,
                            quantized=asdict(self.quantized) if self.quantized else None,
                            skipped_files=[asdict(s) for s in self.report.bad_files])
            if self.console:
                for note in (self.precision_note, self.memory_note):
                    if note:
                        print(note, file=sys.stderr)
        if acc.trackers == [] and acc.log_with:
            acc.init_trackers("lora_studio", config={f"{s}.{k}": str(v) for s, o in c.to_dict().items()
                                                     for k, v in o.items()})
        self.stop.install()
        bar = None
        if self.console and self.main:
            bar = tqdm(total=total, initial=step, desc=c.output.name, unit="step", dynamic_ncols=True,
                       file=sys.stderr)
        last_loss: float | None = None
        val_loss: float | None = None
        samples: list[str] = []
        last_checkpoint: Path | None = None
        status, message, stopped_by = "done", "", None
        step_times: list[float] = []
        try:
            epoch = step // self.updates_per_epoch
            while step < total:
                self.train_set.set_epoch(epoch)
                batches = self._epoch_batches(epoch)
                skip = (step - epoch * self.updates_per_epoch) * self.ga
                # micro-batches of this epoch grouped into optimizer steps (the last may be short)
                groups = [list(range(i, min(i + self.ga, len(batches)))) for i in range(0, len(batches), self.ga)]
                for group in groups:
                    if group[0] < skip:
                        continue
                    if step >= total:
                        break
                    t0 = time.perf_counter()
                    loss_sum = 0.0
                    for n, mi in enumerate(group):
                        samples_b = [self.train_set[i] for i in batches[mi]]
                        g = torch.Generator().manual_seed(_derive_seed(c.training.seed, step, mi, self.rank))
                        # adapter dropout draws from the global generator: seed it per micro-batch too
                        torch.manual_seed(_derive_seed(c.training.seed, "dropout", step, mi, self.rank))
                        sync = n == len(group) - 1
                        ctx = acc.no_sync(self.denoiser) if not sync and self.world > 1 else _null()
                        with ctx:
                            loss = self._loss(samples_b, g) / len(group)
                            acc.backward(loss)
                        loss_sum += float(loss.detach())
                    if not math.isfinite(loss_sum):
                        raise TrainingDivergedError(
                            f"the loss became {loss_sum} at step {step + 1}: training diverged. Lower "
                            f"training.learning_rate (now {c.training.learning_rate}) or enable "
                            f"training.max_grad_norm; the last good checkpoint is kept"
                            + (f" ({last_checkpoint.name})" if last_checkpoint else ""))
                    if c.training.max_grad_norm:
                        acc.clip_grad_norm_(self.trainable, c.training.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    step += 1
                    self._ema_update(step)
                    if self.world > 1:
                        loss_sum = float(acc.reduce(torch.tensor(loss_sum), reduction="mean"))
                    last_loss = loss_sum
                    step_times.append(time.perf_counter() - t0)
                    recent = step_times[-20:]
                    sec = sum(recent) / len(recent)
                    lr = self.lr_scheduler.get_last_lr()[0]
                    if self.main:
                        self.log.append("step", step=step, total_steps=total, epoch=epoch, loss=loss_sum, lr=lr,
                                        sec_per_step=round(sec, 4), eta_s=round(sec * (total - step), 1))
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}")
                    acc.log({"loss": loss_sum, "lr": lr}, step=step)
                    v = c.validation
                    # A checkpoint step is a candidate the user may keep instead of the final adapter: it is
                    # validated too (whatever every_n_steps says) and its adapter file is kept.
                    checkpoint_due = bool(c.output.checkpointing_steps) and step % c.output.checkpointing_steps == 0
                    if step < total and (checkpoint_due or (v.every_n_steps and step % v.every_n_steps == 0)):
                        with self._evaluation_weights():
                            val_loss, samples = self._run_on_main(lambda s=step: self._validate(s), (None, []))
                            if checkpoint_due:
                                self._run_on_main(lambda s=step, lo=last_loss, vl=val_loss, sa=samples:
                                                  self._snapshot(s, lo, vl, sa), None)
                    if checkpoint_due and step < total:
                        last_checkpoint = self._checkpoint(step, epoch, last_loss) or last_checkpoint
                    if self._stop_requested(step):
                        raise _Stopped(self.stop.requested or "stop")
                else:
                    epoch += 1
                    continue
                break
            with self._evaluation_weights():
                val_loss, samples = self._run_on_main(lambda: self._validate(step), (None, []))
                adapter_path, ref = self._finish(step, last_loss, val_loss, samples)
        except torch.OutOfMemoryError:
            # Freed before the message is built: the traceback holds the step's tensors.
            raise self._out_of_memory(step) from None
        except _Stopped as s:
            status, stopped_by = "stopped", s.args[0]
            last_checkpoint = self._checkpoint(step, step // self.updates_per_epoch, last_loss)
            message = (f"stopped by {s.args[0]} at step {step}/{total}; resume with --resume latest"
                       + (f" (checkpoint {last_checkpoint.name})" if last_checkpoint else ""))
            adapter_path, ref = None, None
        finally:
            self.stop.restore()
            if bar is not None:
                bar.close()
        result = TrainResult(status=status, run_dir=str(self.run_dir), message=message,
                             adapter=str(adapter_path) if adapter_path else None, ref=ref, steps=step,
                             total_steps=total, final_loss=last_loss, val_loss=val_loss,
                             checkpoint=str(last_checkpoint) if last_checkpoint else None,
                             seconds=round(time.perf_counter() - t_start, 2), samples=samples,
                             stopped_by=stopped_by)
        if self.main:
            caches = {"latents": {"hits": self.latent_cache.hits, "misses": self.latent_cache.misses,
                                  "enabled": self.cache_latents},
                      "text": {"hits": self.text_cache.hits, "misses": self.text_cache.misses,
                               "enabled": not self.trains_text_encoders}}
            self.log.append(status, step=step, message=message, adapter=result.adapter, ref=ref, caches=caches)
            write_json_atomic(self.run_dir / RESULT_FILE, result.to_dict())
        acc.end_training()
        return result

    def _stop_requested(self, step: int) -> bool:
        import torch  # lazy: keeps torch off `python -m trainer --help`

        if self.stop_at_step is not None and step >= self.stop_at_step:
            self.stop.requested = self.stop.requested or "stop_at_step"
        flag = self.stop.requested is not None
        if self.world > 1:
            # Every process must stop at the same step, whichever one got the signal.
            flag = bool(self.accelerator.reduce(torch.tensor(float(flag)), reduction="sum") > 0)
            if flag and self.stop.requested is None:
                self.stop.requested = "signal on another process"
        return flag

    def _run_on_main(self, fn, default):
        acc = self.accelerator
        acc.wait_for_everyone()
        out = fn() if self.main else default
        acc.wait_for_everyone()
        return out

    # ---- output ------------------------------------------------------------------------------

    def _metadata(self, step: int, last_loss, val_loss) -> dict[str, str]:
        c = self.config
        d, t, n = c.dataset, c.training, c.network
        report = self.report
        dirs, reg_dirs = {}, {}  # kohya's ss_dataset_dirs and ss_reg_dataset_dirs
        for r in self.train_set.records:
            entry = (reg_dirs if r.reg else dirs).setdefault(r.folder or ".", {"n_repeats": r.repeats, "img_count": 0})
            entry["img_count"] += 1
        kohya = {
            "ss_session_id": str(uuid.uuid4().int % 2**31),
            "ss_training_started_at": str(self._started),
            "ss_training_finished_at": str(time.time()),
            "ss_output_name": c.output.name,
            "ss_sd_model_name": c.model.base_model,
            "ss_new_sd_model_hash": self.model_hash,
            "ss_v2": "False",
            "ss_resolution": f"({d.resolution}, {d.resolution})",
            "ss_num_train_images": str(len(self.train_set)),
            "ss_num_reg_images": str(sum(r.reg for r in self.train_set.records)),
            "ss_num_batches_per_epoch": str(self.micro_per_epoch),
            "ss_num_epochs": str(math.ceil(step / self.updates_per_epoch)),
            "ss_epoch": str(math.ceil(step / self.updates_per_epoch)),
            "ss_steps": str(step),
            "ss_max_train_steps": str(self.total_steps),
            "ss_batch_size_per_device": str(t.train_batch_size),
            "ss_total_batch_size": str(t.train_batch_size * t.gradient_accumulation_steps * self.world),
            "ss_gradient_accumulation_steps": str(t.gradient_accumulation_steps),
            "ss_gradient_checkpointing": str(t.gradient_checkpointing),
            "ss_learning_rate": str(t.learning_rate),
            "ss_unet_lr": str(t.learning_rate),
            "ss_text_encoder_lr": str(n.text_encoder_lr if n.train_text_encoder else 0.0),
            "ss_lr_scheduler": t.lr_scheduler,
            "ss_lr_warmup_steps": str(t.lr_warmup_steps),
            "ss_optimizer": OPTIMIZER_CLASSES[t.optimizer],
            "ss_max_grad_norm": str(t.max_grad_norm),
            "ss_mixed_precision": t.mixed_precision,
            "ss_seed": str(t.seed),
            "ss_noise_offset": str(t.noise_offset) if t.noise_offset else "None",
            "ss_min_snr_gamma": str(t.min_snr_gamma) if t.min_snr_gamma else "None",
            "ss_network_dropout": str(n.dropout) if n.dropout else "None",
            "ss_caption_dropout_rate": str(d.caption_dropout_rate),
            "ss_shuffle_caption": str(d.shuffle_caption),
            "ss_keep_tokens": str(d.keep_tokens),
            "ss_flip_aug": str(d.random_flip),
            "ss_random_crop": str(d.random_crop),
            "ss_enable_bucket": str(d.enable_bucket),
            "ss_min_bucket_reso": str(d.min_bucket_reso),
            "ss_max_bucket_reso": str(d.max_bucket_reso),
            "ss_bucket_no_upscale": str(d.max_upscale <= 1.0),
            "ss_bucket_info": json.dumps({"buckets": report.buckets}),
            "ss_dataset_dirs": json.dumps(dirs),
            "ss_reg_dataset_dirs": json.dumps(reg_dirs),
            "ss_tag_frequency": json.dumps(report.tag_frequency),
            "ss_v_parameterization": str(self.noise_scheduler.config.get("prediction_type") == "v_prediction"),
            "ss_training_comment": f"trained with LoRA Studio on {c.model.base_model}",
            "modelspec.resolution": f"{d.resolution}x{d.resolution}",
        }
        ours = {
            "config": c.to_dict(),
            "dataset_fingerprint": self.train_set.fingerprint,
            "base_model": c.model.base_model,
            "base_model_hash": self.model_hash,
            "metrics": {"steps": step, "final_loss": last_loss, "val_loss": val_loss},
            "run_dir": str(self.run_dir),
        }
        trigger = self.trigger_words()
        md = build_metadata(adapter_type=n.adapter_type, rank=n.rank, alpha=n.lora_alpha, family=self.family.name,
                            name=c.output.name, trigger_words=trigger, description=self._description(step),
                            base=kohya)
        # jsonable: a diverged run's non-finite losses are written as null (a checkpoint's snapshot of a
        # run about to diverge can carry them)
        md[METADATA_NAMESPACE] = json.dumps(jsonable(ours), sort_keys=True, allow_nan=False, default=str)
        return md

    def trigger_words(self) -> list[str]:
        """The configured trigger word, else the tags every training caption carries.

        kohya-style datasets write the trigger into each caption file ("..., zkstripes") instead of
        the config; a tag present in every image's caption is that trigger (at most 3 are kept, the
        length of a prompt box's worth), so the adapter never loses it.
        """
        d = self.config.dataset
        if d.trigger_word:
            return [d.trigger_word]
        counts: Counter[str] = Counter()
        for tags in self.report.tag_frequency.values():
            counts.update(tags)
        images = self.report.usable_count
        return [tag for tag, n in counts.most_common() if n >= images and images][:3]

    def _description(self, step: int) -> str:
        c, n = self.config, self.config.network
        return (f"{n.adapter_type} rank {n.rank} trained on {Path(c.dataset.path).name} "
                f"({len(self.train_set.records)} images, {step} steps)")

    def _canonical(self, step: int, last_loss, val_loss):
        """(canonical adapter weights, their file metadata) as of ``step``."""
        weights = methods.canonical_weights(self._adapter_states(), self.peft_configs,
                                            self.config.network.adapter_type)
        last = None if last_loss is None or not math.isfinite(last_loss) else last_loss
        return weights, self._metadata(step, last, val_loss)

    def _snapshot(self, step: int, last_loss, val_loss, samples: list[str]) -> Path:
        """Keep checkpoint ``step``'s adapter as a file beside the run (main process): a candidate that
        ``lora-studio runs register --step`` can make a version of after the full states rotated away.
        A ``snapshot`` event records its losses and validation samples for ``runs show``."""
        weights, metadata = self._canonical(step, last_loss, val_loss)
        path = to_diffusers(weights, snapshot_path(self.run_dir, self.config.output.name, step), metadata=metadata)
        self.log.append("snapshot", step=step, path=str(path.relative_to(self.run_dir)), loss=last_loss,
                        val_loss=val_loss, samples=samples)
        return path

    def _finish(self, step: int, last_loss, val_loss, samples: list[str]) -> tuple[Path | None, str | None]:
        """Write the adapter file (main process) and register it; returns (path, registry ref)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if not self.main:
            return None, None
        weights, metadata = self._canonical(step, last_loss, val_loss)
        last = None if last_loss is None or not math.isfinite(last_loss) else last_loss
        out = self.run_dir / "adapter" / f"{self.config.output.name}.safetensors"
        if not self.register_result:
            return to_diffusers(weights, out, metadata=metadata), None
        return out, self._register(weights, out, metadata, step, last, val_loss, samples)

    def _register(self, weights, out: Path, metadata: dict[str, str], step: int, last_loss, val_loss,
                  samples: list[str]) -> str:
        """Register the trained weights through :func:`adapters.ingest.ingest` (origin "trained"), which writes
        the run's adapter file at ``out`` and registers that same file."""
        # lazy: the registry and generation import SQLAlchemy and PIL
        from adapters.ingest import ingest
        from adapters.registry import Registry

        c = self.config
        recipes = sample_records(self.run_dir, samples, c.output.name, step)
        with Registry() as reg:
            if (done := registered_by_run(reg, c.output.name, self.run_dir, step)) is not None:
                return done
            # validate=False: the weights were taken from this base's own modules, and loading the base
            # pipeline a second time in the training process would only cost memory.
            result = ingest(
                reg, weights, name=c.output.name, origin="trained", base=c.model.base_model, family=self.family,
                validate=False, pipeline=self.pipe, trigger_words=self.trigger_words(),
                description=self._description(step),
                source_info={"run_dir": str(self.run_dir), "dataset": c.dataset.path}, samples=recipes,
                training_config=c.to_dict(), dataset_fingerprint=self.train_set.fingerprint,
                base_model_sha256=self.model_hash or None,
                metrics={"steps": step, "final_loss": last_loss, "val_loss": val_loss}, metadata=metadata,
                target_modules=sorted(set(methods_targets(self))), out=out)
        return result.version.ref


def registered_by_run(registry, name: str, run_dir: str | Path, step: int) -> str | None:
    """The reference of the version this run's final ``step`` already registered, or None. A run resumed
    after its trainer registered but before it wrote ``result.json`` (its worker or machine died in
    between) trains its tail again and must not register a second version: resumed on other hardware
    its bytes differ by rounding, so the registry's dedupe by tensor hash would not catch it."""
    try:
        versions = registry.versions(name)
    except AdapterNotFoundError:
        return None
    for v in versions:
        source, metrics = v.source or {}, v.metrics or {}
        if v.origin == "trained" and source.get("run_dir") == str(run_dir) and "step" not in source \
                and metrics.get("steps") == step:
            return v.ref
    return None


def sample_records(run_dir: str | Path, samples: list[str], name: str, step: int) -> list:
    """The validation images of ``step`` (paths relative to ``run_dir``) as registry samples: each recipe
    names the adapter being registered (``name``) instead of the run's in-training weights."""
    from adapters.registry import SampleImage  # lazy: the registry imports SQLAlchemy
    from studio.generation.recipes import read_recipe  # lazy: PIL

    records = []
    for rel in samples:
        request = read_recipe(Path(run_dir) / rel)
        recipe = {**request.to_dict(), "adapters": [{"ref": name, "weight": 1.0}], "training_step": step}
        records.append(SampleImage(image=Path(run_dir) / rel, recipe=recipe))
    return records


def methods_targets(trainer: Trainer) -> list[str]:
    """The module names adapters were injected into, over every training component."""
    return [target for name in trainer.peft_configs
            for target in methods.target_modules(trainer.config.network, trainer.family, name)]


class _Stopped(Exception):
    pass


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def train(config: TrainConfig, *, run_dir: str | Path | None = None, resume: str | None = None,
          register: bool = True, console: bool = True, stop_at_step: int | None = None) -> TrainResult:
    """Train ``config`` (resolved here) and return how the run ended.

    ``run_dir``: the run directory to use (default: a new one under ``output.dir``). ``resume``:
    ``"latest"`` or a run/checkpoint folder. ``stop_at_step``: behave as if SIGINT arrived after
    that optimizer step (tests of stop-and-resume). Raises ConfigError / DatasetError /
    CheckpointError before training starts, TrainingDivergedError on a NaN/inf loss (after writing
    the failure to the run directory).
    """
    config = config.resolved()
    given = run_dir is not None
    resume_from = None
    if resume:
        resume_from = find_resume_point(resume, config, run_dir)
        run_dir = run_dir or resume_from.parent.parent
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(config)
    trainer = Trainer(config, run_dir=run_dir, resume_from=resume_from, register=register, console=console,
                      stop_at_step=stop_at_step)
    try:
        return trainer.run()
    except Exception as e:
        acc = getattr(trainer, "accelerator", None)
        # A run directory given by the caller (a UI job) always learns why it failed; a new one is
        # only created for a failure once training had started in it.
        if (acc is None or acc.is_main_process) and (given or run_dir.exists()):
            message = str(e) if isinstance(e, StudioError) else f"{type(e).__name__}: {e}"
            record_failure(run_dir, message)
        raise


def record_failure(run_dir: str | Path, message: str) -> None:
    """Mark a run failed (``failed`` event + result.json), so the UI and CLI say why."""
    run_dir = Path(run_dir)
    EventLog(run_dir).append("failed", message=message)
    write_json_atomic(run_dir / RESULT_FILE, TrainResult(status="failed", run_dir=str(run_dir),
                                                         message=message).to_dict())


__all__ = [
    "TrainResult",
    "Trainer",
    "find_resume_point",
    "list_checkpoints",
    "load_checkpoint",
    "new_run_dir",
    "record_failure",
    "rotate_checkpoints",
    "sample_records",
    "save_checkpoint",
    "snapshot_path",
    "train",
]
