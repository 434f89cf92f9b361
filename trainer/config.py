"""Training configuration: :class:`TrainConfig`, its TOML form, and ``--set key=value`` overrides.

A config is six small dataclasses, one per TOML table: ``[model]``, ``[dataset]``, ``[network]``,
``[training]``, ``[validation]``, ``[output]``. Every field carries its help text in
``metadata["help"]``; that one text serves the TOML comments :meth:`TrainConfig.to_toml` writes,
the CLI and the UI's tooltips. For the Train page's form a field also carries its name in plain words
(``metadata["label"]``), its topic (one of :data:`TOPICS`) and, where a form can offer them, a range
(``"min"``, ``"max"``) or a closed list of values (``"choices"``). Each section checks itself in
``__post_init__`` and raises :class:`~studio.core.errors.ConfigError` naming the option
(``network.rank must be >= 1, got 0``); nothing is silently corrected.

Option names are the ones users already know: diffusers' training scripts (``learning_rate``,
``lr_scheduler``, ``train_batch_size``, ``checkpointing_steps``, ``random_flip``), peft
(``rank``, ``lora_alpha``, ``target_modules``) and kohya sd-scripts (``caption_extension``,
``shuffle_caption``, ``keep_tokens``, ``caption_dropout_rate``, ``min_bucket_reso``,
``bucket_reso_steps``, ``min_snr_gamma``, ``noise_offset``). Where a value depends on the base
model (resolution, bucket step, prediction type), ``0`` or ``""`` means "the base model's own" and
:meth:`TrainConfig.resolved` fills it in, so the run directory keeps the exact values used.

This module reads and writes configs only: no torch, no datasets, no model loading. The dataset
code is ``trainer/data.py``; the training loop comes later in ``trainer/loop.py``.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import string
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

from studio.core.atomic import write_bytes_atomic
from studio.core.base_models import model_native_resolution, resolve
from studio.core.errors import ConfigError, InputFileNotFoundError, InvalidNameError
from studio.core.families import FAMILIES, get_family
from studio.core.quantize import QUANTIZATIONS
from studio.core.settings import get_settings

METHODS = ("lora", "dora", "loha", "lokr")
# Every family's target presets (UNets: attention, attention+conv; Flux: attention, attention+mlp,
# all-linear); whether the base model's family has the one chosen is checked when the run starts.
TARGET_PRESETS = tuple(dict.fromkeys(preset for family in FAMILIES.values() for preset in family.target_modules))
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "lion", "adamw_schedulefree")
# Below this, a Prodigy "learning rate" is an AdamW rate typed by habit: Prodigy estimates the step size
# itself and learning_rate only scales it (its authors use 1.0; 0.5 to 1 is the range people report).
PRODIGY_MIN_LR = 0.1
LR_SCHEDULERS = ("constant", "cosine", "linear")
MIXED_PRECISION = ("no", "fp16", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow_matching")
TIMESTEP_SAMPLING = ("logit_normal", "mode", "uniform")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")
TEMPLATE_FIELDS = ("trigger", "caption")
_UNION_TYPES = (typing.Union, types.UnionType)
# The smallest VAE downsampling factor the studio knows (the tiny model's): bucket sides must be a
# multiple of it or the latents would not cover the image exactly.
MIN_BUCKET_STEP = 4


# The topics the UI groups options under, in the order it shows them (``metadata["topic"]``).
TOPICS = ("base model", "dataset and captions", "buckets and crops", "adapter", "optimizer and schedule",
          "noise and loss", "flow-matching models", "validation and samples", "saving", "memory and precision")


def _opt(default: Any, help: str, *, label: str, topic: str, low: float | None = None, high: float | None = None,
         choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with its help text and what a form needs to draw it.

    ``label`` is the option in plain words (with its unit), ``topic`` one of :data:`TOPICS`, ``low`` /
    ``high`` the range a form offers (the section's ``__post_init__`` still judges every value, so a
    config from TOML or ``--set`` is held to the same rules), ``choices`` the values of a closed list.
    List defaults go through a factory (dataclasses need it).
    """
    if topic not in TOPICS:
        raise ValueError(f"topic {topic!r} is not one of {TOPICS}")  # a programming error in this module
    metadata = {"help": help, "label": label, "topic": topic}
    metadata.update({k: v for k, v in (("min", low), ("max", high), ("choices", choices)) if v is not None})
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=metadata)
    return field(default=default, metadata=metadata)


class _Section:
    """Shared checks; ``SECTION`` is the TOML table name used in every message."""

    SECTION: ClassVar[str] = ""

    def _name(self, option: str) -> str:
        return f"{self.SECTION}.{option}"

    def _fail(self, option: str, problem: str) -> typing.NoReturn:
        raise ConfigError(f"{self._name(option)} {problem}", option=self._name(option))

    def _at_least(self, option: str, low: float) -> None:
        value = getattr(self, option)
        if value < low:
            self._fail(option, f"must be >= {low}, got {value}")

    def _in_range(self, option: str, low: float, high: float, *, high_open: bool = False) -> None:
        value = getattr(self, option)
        if not math.isfinite(value) or value < low or (value >= high if high_open else value > high):
            bracket = ")" if high_open else "]"
            self._fail(option, f"must be in [{low}, {high}{bracket}, got {value}")

    def _one_of(self, option: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, option)
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self._fail(option, f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}{hint}")

    def _positive_finite(self, option: str) -> None:
        value = getattr(self, option)
        if not math.isfinite(value) or value <= 0:
            self._fail(option, f"must be a positive number, got {value}")


@dataclass
class ModelConfig(_Section):
    SECTION: ClassVar[str] = "model"

    base_model: str = _opt("tiny", "base model: tiny (the embedded model), a diffusers folder, a single "
                                   ".safetensors checkpoint, or a Hub id owner/name[@revision]",
                           label="Base model", topic="base model")
    quantize: str = _opt("no", "no, nf4 or int8: hold the frozen denoiser's block layers in 4-bit NF4 or 8-bit "
                               "(bitsandbytes, QLoRA) while the LoRA trains in full precision; FLUX.1's 23.8 GB "
                               "transformer takes ~6.7 GB in NF4",
                         label="Hold the frozen model in 4 or 8 bits",
                         topic="memory and precision", choices=QUANTIZATIONS)
    max_sequence_length: int = _opt(0, "T5 prompt length in tokens (FLUX.1, SD3): captions are padded or cut to "
                                       "it; 0 = the model's own (FLUX.1: 512, SD3: 256, the tiny models: 77). "
                                       "Shorter trains faster with less memory; generation reads prompts at "
                                       "the model's own length",
                                    label="T5 prompt length (tokens; 0 = the model's own)",
                                    topic="flow-matching models", low=0, high=512)

    def __post_init__(self) -> None:
        if not self.base_model.strip():
            self._fail("base_model", "is empty: use 'tiny', a local folder or file, or a Hub id")
        self._one_of("quantize", QUANTIZATIONS)
        if not 0 <= self.max_sequence_length <= 512:
            self._fail("max_sequence_length", f"must be 0 (the model's own) or 1 to 512 tokens, "
                                              f"got {self.max_sequence_length}")


@dataclass
class DatasetConfig(_Section):
    SECTION: ClassVar[str] = "dataset"

    path: str = _opt("", "the dataset folder: images with .txt captions, an imagefolder with metadata.jsonl, "
                         "kohya repeat folders N_name, or a datasets.save_to_disk folder (relative paths in a "
                         "TOML file are relative to that file)",
                     label="Dataset folder", topic="dataset and captions")
    trigger_word: str = _opt("", "trigger word / instance prompt added to every caption that lacks it "
                                 "(a rare token such as 'zkstripes'); '' = none",
                             label="Trigger word", topic="dataset and captions")
    caption_template: str = _opt("{trigger}, {caption}", "how a caption is built from {trigger} and {caption} "
                                                          "when the caption lacks the trigger word",
                                 label="Caption template", topic="dataset and captions")
    caption_extension: str = _opt(".txt", "extension of the caption file beside each image (kohya)",
                                  label="Caption file extension", topic="dataset and captions")
    caption_column: str = _opt("", "imagefolder / saved datasets: the caption column ('' = the first of "
                                   "text, caption, prompt)",
                               label="Caption column (imagefolder and saved datasets)", topic="dataset and captions")
    image_column: str = _opt("", "saved datasets: the image column ('' = the first image column)",
                             label="Image column (saved datasets)", topic="dataset and captions")
    caption_dropout_rate: float = _opt(0.0, "probability of training a sample with an empty caption "
                                            "(helps classifier-free guidance)",
                                       label="Share of steps with an empty caption (0 to 1)",
                                       topic="dataset and captions", low=0.0, high=1.0)
    shuffle_caption: bool = _opt(False, "shuffle the comma-separated tags of each caption every time it is seen",
                                 label="Shuffle the tags of each caption", topic="dataset and captions")
    keep_tokens: int = _opt(0, "with shuffle_caption: how many leading tags of each caption stay in place (a "
                               "trigger word added by caption_template always stays where the template puts it)",
                            label="Leading tags kept in place when shuffling", topic="dataset and captions", low=0)
    repeats: int = _opt(1, "times each image is seen per epoch; kohya folders N_name multiply it by N",
                        label="Times each image is seen per epoch", topic="dataset and captions", low=1)
    resolution: int = _opt(0, "training side in pixels; buckets hold about resolution^2 pixels "
                              "(0 = the base model's native resolution: tiny 32, SD-1 512)",
                           label="Training resolution (px; 0 = the model's own)", topic="buckets and crops", low=0)
    enable_bucket: bool = _opt(True, "aspect-ratio buckets; off = square resolution x resolution crops",
                               label="Aspect-ratio buckets", topic="buckets and crops")
    bucket_reso_steps: int = _opt(0, "bucket sides are multiples of this (0 = the base model's latent "
                                     "granularity: 8 for SD-1 and the tiny model; multiples of 4 allowed)",
                                  label="Bucket sides in steps of (px; 0 = the model's own)",
                                  topic="buckets and crops", low=0)
    min_bucket_reso: int = _opt(0, "smallest bucket side; smaller images are skipped (0 = resolution / 2)",
                                label="Smallest bucket side (px; 0 = half the resolution)",
                                topic="buckets and crops", low=0)
    max_bucket_reso: int = _opt(0, "largest bucket side (0 = resolution * 2)",
                                label="Largest bucket side (px; 0 = twice the resolution)",
                                topic="buckets and crops", low=0)
    max_upscale: float = _opt(1.0, "most an image may be enlarged to fill its bucket; a smaller image goes to "
                                   "a smaller bucket instead (1.0 = never upscale, kohya's bucket_no_upscale)",
                              label="Most an image may be enlarged (times; 1 = never)",
                              topic="buckets and crops", low=1.0)
    random_crop: bool = _opt(False, "crop a random window of the resized image instead of the centre",
                             label="Random crops instead of the centre", topic="buckets and crops")
    random_flip: bool = _opt(False, "mirror half of the samples horizontally (not for asymmetric subjects or text)",
                             label="Mirror half of the images", topic="buckets and crops")
    masked_loss: bool = _opt(False, "learn only where each image's mask is white: a mask image <name>-masklabel.png "
                                    "beside the image (OneTrainer's name; grey = partly), else the image's alpha "
                                    "channel; images with neither learn everywhere. The loss is averaged over "
                                    "the learned area, so a small subject is not learned more slowly",
                             label="Masked loss (learn only the mask's white area)", topic="noise and loss")
    reg_data_dir: str = _opt("", "regularisation images (kohya's reg_data_dir; DreamBooth's class images): a folder "
                                 "of images of the subject's class with their captions (any layout but a saved "
                                 "dataset), trained beside the dataset without the trigger word so the class keeps "
                                 "its look (prior preservation); each epoch takes as many of them as it has "
                                 "training samples. '' = none (relative paths in a TOML file are relative to it)",
                             label="Regularisation images folder ('' = none)", topic="dataset and captions")
    prior_loss_weight: float = _opt(1.0, "with reg_data_dir: the weight of a regularisation image's loss against a "
                                         "training image's (kohya's and diffusers' prior_loss_weight)",
                                    label="Weight of the regularisation images", topic="dataset and captions",
                                    low=0.0, high=10.0)
    unmasked_weight: float = _opt(0.0, "with masked_loss: how much the area outside the mask still counts (0 = not "
                                       "at all, 1 = as much as inside)",
                                  label="Weight outside the mask", topic="noise and loss", low=0.0, high=1.0)

    def __post_init__(self) -> None:
        self._check_template()
        if self.caption_extension and not self.caption_extension.startswith("."):
            self._fail("caption_extension", f"must start with '.', got {self.caption_extension!r}")
        self._in_range("caption_dropout_rate", 0.0, 1.0, high_open=True)
        self._at_least("keep_tokens", 0)
        self._at_least("repeats", 1)
        self._at_least("resolution", 0)
        for option in ("bucket_reso_steps", "min_bucket_reso", "max_bucket_reso"):
            self._at_least(option, 0)
        step = self.bucket_reso_steps
        if step and step % MIN_BUCKET_STEP:
            self._fail("bucket_reso_steps", f"must be a multiple of {MIN_BUCKET_STEP} (the smallest VAE factor), "
                                            f"got {step}")
        if step:
            for option in ("resolution", "min_bucket_reso", "max_bucket_reso"):
                value = getattr(self, option)
                if value and value % step:
                    self._fail(option, f"must be a multiple of dataset.bucket_reso_steps ({step}), got {value}")
        if self.resolution and self.resolution < MIN_BUCKET_STEP * 2:
            self._fail("resolution", f"must be >= {MIN_BUCKET_STEP * 2} pixels, got {self.resolution}")
        low, high = self.min_bucket_reso, self.max_bucket_reso
        if low and high and low > high:
            self._fail("min_bucket_reso", f"({low}) must be <= dataset.max_bucket_reso ({high})")
        if self.resolution and low and low > self.resolution:
            self._fail("min_bucket_reso", f"({low}) must be <= dataset.resolution ({self.resolution})")
        if self.resolution and high and high < self.resolution:
            self._fail("max_bucket_reso", f"({high}) must be >= dataset.resolution ({self.resolution})")
        if not math.isfinite(self.max_upscale) or self.max_upscale < 1.0:
            self._fail("max_upscale", f"must be >= 1.0 (1.0 = never upscale), got {self.max_upscale}")
        self._in_range("unmasked_weight", 0.0, 1.0)
        if not math.isfinite(self.prior_loss_weight) or self.prior_loss_weight < 0:
            self._fail("prior_loss_weight", f"must be >= 0, got {self.prior_loss_weight}")

    def _check_template(self) -> None:
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(self.caption_template) if name is not None]
        except ValueError as e:
            self._fail("caption_template", f"is not a valid template ({e}): write e.g. '{{trigger}}, {{caption}}'")
        unknown = [n for n in names if n not in TEMPLATE_FIELDS]
        if unknown:
            self._fail("caption_template", f"uses {{{unknown[0]}}}: only {{trigger}} and {{caption}} are known")
        if "caption" not in names:
            self._fail("caption_template", f"must contain {{caption}}, got {self.caption_template!r}")


@dataclass
class NetworkConfig(_Section):
    SECTION: ClassVar[str] = "network"

    adapter_type: str = _opt("lora", "adapter method: lora, dora (weight-decomposed LoRA), loha (Hadamard "
                                     "product) or lokr (Kronecker product)",
                             label="Adapter method", topic="adapter", choices=METHODS)
    rank: int = _opt(4, "adapter rank (kohya network_dim): capacity and file size grow with it",
                     label="Rank (adapter size)", topic="adapter", low=1, high=1024)
    lora_alpha: float = _opt(4.0, "scale numerator: the update is multiplied by lora_alpha / rank "
                                  "(kohya network_alpha)",
                             label="Alpha (the update is scaled by alpha / rank)", topic="adapter")
    dropout: float = _opt(0.0, "dropout on the adapter's input during training (peft lora_dropout / module_dropout)",
                          label="Adapter dropout (0 to 1)", topic="adapter", low=0.0, high=1.0)
    target_modules: str | list[str] = _opt("attention", "which layers get adapters: a preset ('attention'; UNets: "
                                                        "'attention+conv' = LoCon; Flux: 'attention+mlp', "
                                                        "'all-linear') or a list of module names",
                                           label="Layers that get adapters", topic="adapter")
    train_text_encoder: bool = _opt(False, "also train adapters on the text encoder (disables text-embedding caching)",
                                    label="Also train the text encoder", topic="adapter")
    text_encoder_lr: float = _opt(0.0, "learning rate of the text-encoder adapters (0 = training.learning_rate)",
                                  label="Text-encoder learning rate (0 = the same as the model's)",
                                  topic="adapter", low=0.0)

    def __post_init__(self) -> None:
        self._one_of("adapter_type", METHODS)
        self._at_least("rank", 1)
        self._positive_finite("lora_alpha")
        self._in_range("dropout", 0.0, 1.0, high_open=True)
        if isinstance(self.target_modules, str):
            self._one_of("target_modules", TARGET_PRESETS)
        else:
            if not self.target_modules:
                self._fail("target_modules", "is an empty list: name at least one module, or use a preset")
            bad = [m for m in self.target_modules if not isinstance(m, str) or not m.strip()]
            if bad:
                self._fail("target_modules", f"must hold module names, got {bad[0]!r}")
        if not math.isfinite(self.text_encoder_lr) or self.text_encoder_lr < 0:
            self._fail("text_encoder_lr", f"must be >= 0 (0 = training.learning_rate), got {self.text_encoder_lr}")


@dataclass
class TrainingConfig(_Section):
    SECTION: ClassVar[str] = "training"

    optimizer: str = _opt("adamw", "adamw (torch); adamw8bit (bitsandbytes: about a quarter of the optimizer "
                                   "memory); prodigy (estimates its own step size: learning_rate = 1.0 scales it); "
                                   "lion (sign updates: a learning_rate 3-10x below AdamW's and a weight decay "
                                   "3-10x above); adamw_schedulefree (no schedule: lr_scheduler = constant, "
                                   "lr_warmup_steps is its warmup)",
                          label="Optimizer", topic="optimizer and schedule", choices=OPTIMIZERS)
    learning_rate: float = _opt(1e-4, "peak learning rate of the UNet adapters",
                                label="Learning rate", topic="optimizer and schedule", high=10.0)
    lr_scheduler: str = _opt("constant", "learning-rate schedule after warmup: constant, cosine or linear (to 0)",
                             label="Learning-rate schedule", topic="optimizer and schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = _opt(0, "optimizer steps of linear warmup from 0 to learning_rate",
                                label="Warmup (steps)", topic="optimizer and schedule", low=0)
    max_train_steps: int = _opt(500, "optimizer steps to train (0 = set by num_train_epochs)",
                                label="Training steps", topic="optimizer and schedule", low=0, high=1_000_000)
    num_train_epochs: int = _opt(0, "passes over the dataset, repeats included (0 = set by max_train_steps)",
                                 label="Epochs", topic="optimizer and schedule", low=0, high=10_000)
    train_batch_size: int = _opt(4, "images per forward pass (all from one bucket)",
                                 label="Batch size (images per step)", topic="optimizer and schedule", low=1, high=1024)
    gradient_accumulation_steps: int = _opt(1, "forward passes per optimizer step: the effective batch is "
                                               "train_batch_size x this",
                                            label="Gradient accumulation (passes per step)",
                                            topic="optimizer and schedule", low=1)
    max_grad_norm: float = _opt(1.0, "clip the gradient norm to this (0 = no clipping)",
                                label="Gradient clipping norm (0 = off)", topic="optimizer and schedule", low=0.0)
    gradient_checkpointing: bool = _opt(False, "recompute activations in the backward pass: less memory, ~30% slower",
                                        label="Gradient checkpointing (less memory, slower)",
                                        topic="memory and precision")
    mixed_precision: str = _opt("no", "no, fp16 or bf16 (where the hardware has it)",
                                label="Mixed precision", topic="memory and precision", choices=MIXED_PRECISION)
    min_snr_gamma: float = _opt(0.0, "min-SNR loss weighting gamma (5 is the paper's value; 0 = off)",
                                label="Min-SNR loss weighting (gamma; 0 = off)", topic="noise and loss", low=0.0)
    noise_offset: float = _opt(0.0, "offset noise strength (e.g. 0.05) for very dark or bright images; 0 = off",
                               label="Noise offset (0 = off)", topic="noise and loss", low=0.0, high=1.0)
    prediction_type: str = _opt("", "epsilon or v_prediction ('' = the base model's scheduler setting); "
                                    "flow-matching models (Flux, SD3) predict the flow: leave it ''",
                                label="What the model predicts (empty = the model's own)",
                                topic="noise and loss", choices=("", *PREDICTION_TYPES))
    timestep_sampling: str = _opt("logit_normal", "flow-matching models: how noise levels are drawn: logit_normal "
                                                  "(SD3's default), mode, or uniform",
                                  label="How noise levels are drawn",
                                  topic="flow-matching models", choices=TIMESTEP_SAMPLING)
    flow_shift: float = _opt(0.0, "flow-matching models: shift drawn noise levels up, s' = k s / (1 + (k - 1) s); "
                                  "0 = by image size (Flux's rule from the token count), 1 = none, e.g. 3.1582 "
                                  "(kohya's Flux value)",
                             label="Noise-level shift (0 = by image size, 1 = none)",
                             topic="flow-matching models", low=0.0)
    loss_weighting: str = _opt("none", "flow-matching models: per-sample loss weight: none, sigma_sqrt or cosmap "
                                       "(as diffusers' SD3 and Flux scripts name them)",
                               label="Per-sample loss weight", topic="flow-matching models", choices=LOSS_WEIGHTING)
    precondition_outputs: bool = _opt(False, "flow-matching models: diffusers' SD3 script's preconditioning: the "
                                             "loss is taken on x = noisy - s * prediction against the clean latents, "
                                             "which is the flow loss weighted by s^2",
                                      label="Precondition the outputs (diffusers' SD3 script)",
                                      topic="flow-matching models")
    seed: int = _opt(0, "seed of every random choice: data order, augmentation, noise, timesteps",
                     label="Seed", topic="noise and loss", low=0, high=2**32 - 1)
    adam_beta1: float = _opt(0.9, "AdamW beta1",
                             label="AdamW beta1", topic="optimizer and schedule", low=0.0, high=1.0)
    adam_beta2: float = _opt(0.999, "AdamW beta2",
                             label="AdamW beta2", topic="optimizer and schedule", low=0.0, high=1.0)
    adam_weight_decay: float = _opt(1e-2, "AdamW decoupled weight decay",
                                    label="Weight decay", topic="optimizer and schedule", low=0.0)
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon",
                               label="AdamW epsilon", topic="optimizer and schedule")
    ema_decay: float = _opt(0.0, "keep an exponential moving average (EMA) of the adapter weights and sample, "
                                 "validate and save it instead of the last step's weights (OneTrainer, "
                                 "SimpleTuner): smoother results, less dependent on where a run stops; training "
                                 "itself goes on with the raw weights. 0 = off; 0.999 is usual for thousands of "
                                 "steps, 0.99 for hundreds. The n-th update uses min(ema_decay, n / (n + 9)), as "
                                 "diffusers' EMAModel does, so early averages are not held at the start",
                            label="EMA of the adapter weights (decay; 0 = off)", topic="optimizer and schedule",
                            low=0.0, high=0.9999)

    def __post_init__(self) -> None:
        self._one_of("optimizer", OPTIMIZERS)
        self._positive_finite("learning_rate")
        self._one_of("lr_scheduler", LR_SCHEDULERS)
        if self.optimizer == "prodigy" and self.learning_rate < PRODIGY_MIN_LR:
            self._fail("learning_rate", f"is {self.learning_rate:g}, an AdamW-sized rate: Prodigy estimates the step "
                                        f"size itself and learning_rate scales it; use 1.0")
        if self.optimizer == "adamw_schedulefree" and self.lr_scheduler != "constant":
            self._fail("lr_scheduler", f"is {self.lr_scheduler!r}: schedule-free AdamW replaces the schedule; use "
                                       f"constant (lr_warmup_steps becomes its own warmup)")
        self._at_least("lr_warmup_steps", 0)
        self._at_least("max_train_steps", 0)
        self._at_least("num_train_epochs", 0)
        if self.max_train_steps and self.num_train_epochs:
            self._fail("max_train_steps", f"({self.max_train_steps}) and training.num_train_epochs "
                                          f"({self.num_train_epochs}) are both set: set max_train_steps = 0 to "
                                          f"train by epochs, or num_train_epochs = 0 to train by steps")
        if not self.max_train_steps and not self.num_train_epochs:
            self._fail("max_train_steps", "and training.num_train_epochs are both 0: set one of them")
        if self.max_train_steps and self.lr_warmup_steps >= self.max_train_steps:
            self._fail("lr_warmup_steps", f"({self.lr_warmup_steps}) must be < training.max_train_steps "
                                          f"({self.max_train_steps})")
        self._at_least("train_batch_size", 1)
        self._at_least("gradient_accumulation_steps", 1)
        if not math.isfinite(self.max_grad_norm) or self.max_grad_norm < 0:
            self._fail("max_grad_norm", f"must be >= 0 (0 = no clipping), got {self.max_grad_norm}")
        self._one_of("mixed_precision", MIXED_PRECISION)
        if not math.isfinite(self.min_snr_gamma) or self.min_snr_gamma < 0:
            self._fail("min_snr_gamma", f"must be >= 0 (0 = off), got {self.min_snr_gamma}")
        self._in_range("noise_offset", 0.0, 1.0)
        if self.prediction_type:
            self._one_of("prediction_type", PREDICTION_TYPES)
        self._one_of("timestep_sampling", TIMESTEP_SAMPLING)
        if not math.isfinite(self.flow_shift) or self.flow_shift < 0:
            self._fail("flow_shift", f"must be >= 0 (0 = by image size, 1 = none), got {self.flow_shift}")
        self._one_of("loss_weighting", LOSS_WEIGHTING)
        if not 0 <= self.seed < 2**32:
            self._fail("seed", f"must be in [0, 2**32), got {self.seed}")
        self._in_range("adam_beta1", 0.0, 1.0, high_open=True)
        self._in_range("adam_beta2", 0.0, 1.0, high_open=True)
        if not math.isfinite(self.adam_weight_decay) or self.adam_weight_decay < 0:
            self._fail("adam_weight_decay", f"must be >= 0, got {self.adam_weight_decay}")
        self._positive_finite("adam_epsilon")
        self._in_range("ema_decay", 0.0, 1.0, high_open=True)
        if self.ema_decay and self.optimizer == "adamw_schedulefree":
            self._fail("ema_decay", "is set with adamw_schedulefree, which averages the weights itself: use one of "
                                    "the two")


@dataclass
class ValidationConfig(_Section):
    SECTION: ClassVar[str] = "validation"

    prompts: list[str] = _opt([], "prompts sampled during training, through the same code the studio "
                                  "generates with; use the trigger word",
                              label="Sample prompts (one per line)", topic="validation and samples")
    seeds: list[int] = _opt([0, 1], "one sample image per prompt and seed, the same seeds at every validation",
                            label="Sample seeds (comma-separated)", topic="validation and samples")
    every_n_steps: int = _opt(100, "sample images and validation loss every N optimizer steps, and at the end "
                                   "(0 = only at the end)",
                              label="Samples every N steps (0 = only at the end)",
                              topic="validation and samples", low=0)
    held_out_count: int = _opt(0, "images kept out of training to measure a validation loss",
                               label="Images held out for a validation loss", topic="validation and samples", low=0)
    held_out_fraction: float = _opt(0.0, "the same as a fraction of the images (use one of the two)",
                                    label="... or the share held out (0 to 1)",
                                    topic="validation and samples", low=0.0, high=1.0)

    def __post_init__(self) -> None:
        bad = [p for p in self.prompts if not isinstance(p, str) or not p.strip()]
        if bad:
            self._fail("prompts", f"must hold non-empty prompts, got {bad[0]!r}")
        if self.prompts and not self.seeds:
            self._fail("seeds", "is empty: give at least one seed for the validation prompts")
        bad_seeds = [s for s in self.seeds if not 0 <= s < 2**32]
        if bad_seeds:
            self._fail("seeds", f"must hold seeds in [0, 2**32), got {bad_seeds[0]}")
        self._at_least("every_n_steps", 0)
        self._at_least("held_out_count", 0)
        self._in_range("held_out_fraction", 0.0, 1.0, high_open=True)
        if self.held_out_count and self.held_out_fraction:
            self._fail("held_out_count", f"({self.held_out_count}) and validation.held_out_fraction "
                                         f"({self.held_out_fraction}) are both set: use one of them")


@dataclass
class OutputConfig(_Section):
    SECTION: ClassVar[str] = "output"

    name: str = _opt("", "adapter name in the registry and file names ('' = the dataset folder's name)",
                     label="Adapter name", topic="saving")
    dir: str = _opt("", "folder that receives the run directory ('' = $LORA_STUDIO_HOME/runs; relative paths "
                        "in a TOML file are relative to that file)",
                    label="Runs folder (empty = $LORA_STUDIO_HOME/runs)", topic="saving")
    checkpointing_steps: int = _opt(100, "save a resumable checkpoint every N optimizer steps (0 = only at the end); "
                                         "each is validated and keeps its adapter file, a candidate to compare "
                                         "and register (lora-studio runs)",
                                    label="Checkpoint every N steps (0 = only at the end)", topic="saving", low=0)
    checkpoints_total_limit: int = _opt(3, "keep the newest K checkpoints (0 = keep all)",
                                        label="Checkpoints kept (0 = all)", topic="saving", low=0)

    def __post_init__(self) -> None:
        if self.name:
            from adapters.registry import check_name  # lazy: the registry module imports SQLAlchemy

            try:
                check_name(self.name)
            except InvalidNameError as e:
                self._fail("name", f"is invalid: {e}")
        self._at_least("checkpointing_steps", 0)
        self._at_least("checkpoints_total_limit", 0)


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig,
    "dataset": DatasetConfig,
    "network": NetworkConfig,
    "training": TrainingConfig,
    "validation": ValidationConfig,
    "output": OutputConfig,
}

# Names other trainers use, so a pasted kohya / diffusers option gets a useful hint.
FOREIGN_NAMES: dict[str, str] = {
    "pretrained_model_name_or_path": "model.base_model",
    "train_data_dir": "dataset.path",
    "class_data_dir": "dataset.reg_data_dir",
    "with_prior_preservation": "dataset.reg_data_dir (a folder of class images)",
    "instance_data_dir": "dataset.path",
    "instance_prompt": "dataset.trigger_word",
    "class_tokens": "dataset.trigger_word",
    "caption_dropout": "dataset.caption_dropout_rate",
    "num_repeats": "dataset.repeats",
    "flip_aug": "dataset.random_flip",
    "alpha_mask": "dataset.masked_loss",
    "center_crop": "dataset.random_crop (false = centre crop)",
    "bucket_no_upscale": "dataset.max_upscale (1.0 = never upscale)",
    "network_dim": "network.rank",
    "network_alpha": "network.lora_alpha",
    "network_module": "network.adapter_type",
    "lora_dropout": "network.dropout",
    "use_dora": "network.adapter_type = \"dora\"",
    "lr": "training.learning_rate",
    "unet_lr": "training.learning_rate",
    "batch_size": "training.train_batch_size",
    "use_8bit_adam": "training.optimizer = \"adamw8bit\"",
    "use_ema": "training.ema_decay",
    "optimizer_type": "training.optimizer",
    "snr_gamma": "training.min_snr_gamma",
    "v_parameterization": "training.prediction_type = \"v_prediction\"",
    "lr_warmup": "training.lr_warmup_steps",
    "validation_prompt": "validation.prompts",
    "sample_every_n_steps": "validation.every_n_steps",
    "output_dir": "output.dir",
    "output_name": "output.name",
    "save_every_n_steps": "output.checkpointing_steps",
    "save_last_n_steps": "output.checkpoints_total_limit",
}

# Options holding paths: relative values in a TOML file are taken relative to that file, so a
# dataset's train.toml works from any working directory.
_PATH_OPTIONS = (("dataset", "path"), ("dataset", "reg_data_dir"), ("output", "dir"))


def _help_of(cls: type, name: str) -> str:
    return next(f.metadata.get("help", "") for f in fields(cls) if f.name == name)


def _all_options() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in fields(cls)]


def _unknown_option(key: str) -> ConfigError:
    """An error for an unknown option, with a close match or the name our config uses for it."""
    bare = key.rsplit(".", 1)[-1]
    if bare in FOREIGN_NAMES:
        hint = f"; the studio calls it {FOREIGN_NAMES[bare]}"
    else:
        options = _all_options()
        close = difflib.get_close_matches(key, options, n=1, cutoff=0.6) or difflib.get_close_matches(
            bare, [o.split(".", 1)[1] for o in options], n=1, cutoff=0.6
        )
        if close and "." not in close[0]:
            close = [o for o in options if o.endswith("." + close[0])][:1]
        hint = f"; did you mean {close[0]}?" if close else f"; known sections: {', '.join(SECTIONS)}"
    return ConfigError(f"unknown option {key}{hint}", option=key)


# --------------------------------------------------------------------------------------------
# value conversion: TOML values and --set strings to field types
# --------------------------------------------------------------------------------------------


def _coerce(option: str, value: Any, tp: Any) -> Any:
    """Check a TOML value against the field type ``tp``; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in _UNION_TYPES:
        # str | list[str]: a preset name or an explicit list
        if isinstance(value, list):
            return _coerce(option, value, next(a for a in typing.get_args(tp) if typing.get_origin(a) is list))
        return _coerce(option, value, str)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{option} must be a list, got {value!r}", option=option)
        return [_coerce(f"{option}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{option} must be true or false, got {value!r}", option=option)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{option} must be a whole number, got {value!r}", option=option)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{option} must be a number, got {value!r}", option=option)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{option} must be a string, got {value!r}", option=option)
        return value
    raise TypeError(f"no conversion for {tp}")  # a programming error: a field type we do not handle


def _parse_text(option: str, text: str, tp: Any) -> Any:
    """Turn the text of ``--set option=text`` into a value of type ``tp``.

    Strings are taken as typed (``output.name=123`` is the string "123"). Lists are a TOML array
    (``validation.prompts=["a", "b"]``) or, for numbers and module names, comma-separated
    (``validation.seeds=0,1,2``, ``network.target_modules=to_q,to_v``); a list of prompts written
    without brackets is one prompt, since prompts contain commas.
    """
    text = text.strip()
    origin = typing.get_origin(tp)
    if tp is str:
        return text
    if tp is bool:
        words = {"true": True, "yes": True, "on": True, "1": True,
                 "false": False, "no": False, "off": False, "0": False}
        if text.lower() not in words:
            raise ConfigError(f"{option} must be true or false, got {text!r}", option=option)
        return words[text.lower()]
    if tp is int:
        try:
            return int(text, 10)
        except ValueError:
            raise ConfigError(f"{option} must be a whole number, got {text!r}", option=option) from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{option} must be a number, got {text!r}", option=option) from None
    if origin in _UNION_TYPES:  # str | list[str]: a preset name, or module names
        if not text.startswith("[") and "," not in text:
            return text
        return _parse_list(option, text, str, split=True)
    if origin is list:
        (item,) = typing.get_args(tp)
        return _parse_list(option, text, item, split=item is not str)
    raise TypeError(f"no conversion for {tp}")  # a programming error: a field type we do not handle


def _parse_list(option: str, text: str, item: Any, *, split: bool) -> list:
    if text.startswith("["):
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            if item is not str:
                raise ConfigError(f"{option} must be a list such as [0, 1], got {text!r}", option=option) from None
            value = [p.strip().strip("'\"") for p in text[1:].rstrip("]").split(",") if p.strip()]
        return _coerce(option, value, list[item])
    parts = [p.strip() for p in text.split(",")] if split else [text]
    return [_parse_text(f"{option}[{i}]", p, item) for i, p in enumerate(parts) if p]


# --------------------------------------------------------------------------------------------
# TOML writing (strings, numbers, booleans and lists of them are all a config holds)
# --------------------------------------------------------------------------------------------


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # repr() is the shortest text that reads back to the same float (1e-05, 0.0001, 4.0); the
        # section checks reject inf and nan, which TOML could hold but no option accepts.
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


# --------------------------------------------------------------------------------------------
# TrainConfig
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """A whole training run's configuration; each attribute is one TOML table."""

    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    # ---- reading ------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base_dir: str | Path | None = None) -> TrainConfig:
        """Build from ``{section: {option: value}}``; unknown keys and wrong types raise ConfigError.

        ``base_dir`` anchors relative ``dataset.path`` / ``output.dir`` values (the TOML file's folder).
        """
        for top, value in data.items():
            if top in SECTIONS:
                if not isinstance(value, dict):
                    raise ConfigError(f"{top} must be a table ([{top}]), got {value!r}", option=top)
                continue
            owners = [s for s, c in SECTIONS.items() if top in {f.name for f in fields(c)}]
            if owners and not isinstance(value, dict):
                raise ConfigError(f"option {top} is outside its table: write it under [{owners[0]}]",
                                  option=f"{owners[0]}.{top}")
            if isinstance(value, dict):
                close = difflib.get_close_matches(top, list(SECTIONS), n=1)
                hint = f"did you mean [{close[0]}]?" if close else f"sections are {', '.join(SECTIONS)}"
                raise ConfigError(f"unknown section [{top}]; {hint}", option=top)
            raise _unknown_option(top)
        sections = {}
        for name, section_cls in SECTIONS.items():
            given = dict(data.get(name, {}))
            hints = typing.get_type_hints(section_cls)
            known = {f.name for f in fields(section_cls)}
            for key in given:
                if key not in known:
                    raise _unknown_option(f"{name}.{key}")
            values = {key: _coerce(f"{name}.{key}", given[key], hints[key]) for key in given}
            if base_dir is not None:
                for section, option in _PATH_OPTIONS:
                    if section == name and values.get(option):
                        path = Path(values[option]).expanduser()
                        values[option] = str(path if path.is_absolute() else (Path(base_dir) / path).resolve())
            sections[name] = section_cls(**values)
        return cls(**sections)

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        """Read a TOML file; relative paths in it are taken relative to the file's folder."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputFileNotFoundError(f"training config {path} not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read training config {path}: {e}") from None
        return cls.from_toml_text(text, base_dir=path.resolve().parent, source=str(path))

    @classmethod
    def from_toml_text(cls, text: str, *, base_dir: str | Path | None = None, source: str = "config") -> TrainConfig:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source} is not valid TOML: {e}") from None
        return cls.from_dict(data, base_dir=base_dir)

    # ---- writing ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {
            name: {f.name: _copy(getattr(getattr(self, name), f.name)) for f in fields(SECTIONS[name])}
            for name in SECTIONS
        }

    def to_toml(self, *, comments: bool = True) -> str:
        """Every option with its value (defaults included), so the text is the exact config.

        With ``comments``, each option is preceded by its help text, which makes a run directory's
        ``config.toml`` self-explanatory.
        """
        lines: list[str] = []
        for name, section_cls in SECTIONS.items():
            if lines:
                lines.append("")
            lines.append(f"[{name}]")
            section = getattr(self, name)
            for f in fields(section_cls):
                if comments and f.metadata.get("help"):
                    lines.append(f"# {f.metadata['help']}")
                lines.append(f"{f.name} = {_toml_value(getattr(section, f.name))}")
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write the config as TOML to ``path``, atomically: a job's page reading it never sees half a file."""
        return write_bytes_atomic(path, self.to_toml().encode("utf-8"))

    # ---- changing -----------------------------------------------------------------------

    def apply_overrides(self, overrides: list[str] | tuple[str, ...]) -> TrainConfig:
        """A new config with ``["network.rank=8", "training.learning_rate=5e-4", ...]`` applied.

        A bare option name (``rank=8``) is accepted when exactly one section has it. Values are
        converted to the option's type; every section's checks run again on the result. Paths are
        taken as typed (a relative one is relative to the working directory, as on a command line).
        """
        data = self.to_dict()
        for item in overrides:
            key, sep, text = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"override {item!r} must look like section.option=value, e.g. network.rank=8")
            section, option = _locate(key)
            tp = typing.get_type_hints(SECTIONS[section])[option]
            data[section][option] = _parse_text(f"{section}.{option}", text.strip(), tp)
        return TrainConfig.from_dict(data)

    def resolved(
        self,
        *,
        native_resolution: int | None = None,
        latent_granularity: int | None = None,
        prediction_type: str | None = None,
    ) -> TrainConfig:
        """The config with every "base model's own" value (0 or "") replaced by the value used.

        The three keyword arguments describe the base model; left out, they are read from
        ``model.base_model`` without loading weights (:func:`base_model_defaults`). The result is
        what a run directory should keep: it trains the same way whatever the defaults become.
        """
        if None in (native_resolution, latent_granularity, prediction_type):
            facts = base_model_defaults(self.model.base_model)
            native_resolution = native_resolution or facts["native_resolution"]
            latent_granularity = latent_granularity or facts["latent_granularity"]
            prediction_type = prediction_type or facts["prediction_type"]
        d = self.dataset
        if not d.path:
            raise ConfigError("dataset.path is not set: point it at a folder of images", option="dataset.path")
        step = d.bucket_reso_steps or latent_granularity
        resolution = d.resolution or native_resolution
        low, high = default_bucket_bounds(resolution, step)
        low, high = d.min_bucket_reso or low, d.max_bucket_reso or high
        dataset = replace(d, bucket_reso_steps=step, resolution=resolution, min_bucket_reso=low, max_bucket_reso=high)
        network = replace(self.network, text_encoder_lr=self.network.text_encoder_lr or self.training.learning_rate)
        training = replace(self.training, prediction_type=self.training.prediction_type or prediction_type)
        output = self.output
        if not output.name:
            output = replace(output, name=_name_from_folder(d.path))
        if not output.dir:
            output = replace(output, dir=str(get_settings().home / "runs"))
        return replace(self, dataset=dataset, network=network, training=training, output=output)

    @staticmethod
    def help(option: str) -> str:
        """The help text of ``section.option`` (for the CLI and the UI's tooltips)."""
        section, name = _locate(option)
        return _help_of(SECTIONS[section], name)


def default_bucket_bounds(resolution: int, step: int) -> tuple[int, int]:
    """Smallest and largest bucket side when the config leaves them at 0.

    kohya's defaults at 512 px are min 256 / max 1024: half and twice the resolution, kept on the
    bucket grid (rounded down for the minimum, never below one step; rounded up for the maximum).
    """
    return max(step, (resolution // 2) // step * step), -(-resolution * 2 // step) * step


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def _locate(key: str) -> tuple[str, str]:
    """``"network.rank"`` or a unique bare ``"rank"`` -> ``("network", "rank")``."""
    if "." in key:
        section, _, option = key.partition(".")
        if section in SECTIONS and option in {f.name for f in fields(SECTIONS[section])}:
            return section, option
        raise _unknown_option(key)
    owners = [s for s, cls in SECTIONS.items() if key in {f.name for f in fields(cls)}]
    if len(owners) == 1:
        return owners[0], key
    if len(owners) > 1:
        raise ConfigError(f"option {key} is ambiguous: write one of {', '.join(f'{s}.{key}' for s in owners)}",
                          option=key)
    raise _unknown_option(key)


def _name_from_folder(path: str) -> str:
    """An adapter name from the dataset folder's name: registry-safe characters only."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(path).name).strip(".-")[:64]
    return name or "lora"


def base_model_defaults(ref: str) -> dict[str, Any]:
    """Native resolution, latent granularity and prediction type of a base model, without its weights.

    The embedded tiny model and diffusers folders are read from their config files (the denoiser's
    ``sample_size`` x the VAE factor 2^(blocks - 1); the scheduler's ``prediction_type``); single
    files and Hub ids fall back to their family's values.
    """
    resolved = resolve(ref)
    family = get_family(resolved.family)
    facts = {
        "native_resolution": family.native_resolution,
        "latent_granularity": family.latent_granularity,
        "prediction_type": "epsilon",
    }
    if resolved.kind in ("tiny", "diffusers"):
        folder = Path(resolved.location)
        try:
            denoiser = json.loads((folder / family.denoiser / "config.json").read_text())
            vae = json.loads((folder / "vae" / "config.json").read_text())
            facts["native_resolution"] = int(denoiser["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
        except (OSError, ValueError, KeyError, TypeError):
            pass
        # a transformer has no sample_size: its model record says
        facts["native_resolution"] = model_native_resolution(folder) or facts["native_resolution"]
        try:
            scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
            facts["prediction_type"] = scheduler.get("prediction_type") or "epsilon"
        except (OSError, ValueError):
            pass
    if family.objective == "flow_matching":
        facts["prediction_type"] = "flow_matching"  # what the model predicts is the family's, not a setting
    return facts


__all__ = [
    "DatasetConfig",
    "ModelConfig",
    "NetworkConfig",
    "OutputConfig",
    "SECTIONS",
    "TOPICS",
    "TrainConfig",
    "TrainingConfig",
    "ValidationConfig",
    "base_model_defaults",
    "default_bucket_bounds",
]
