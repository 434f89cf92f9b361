"""The :class:`Family` description every base-model family fills in, and its parts.

A family is data plus a few hooks: which pipeline components exist and which of them carry LoRA
layers (as diffusers' loader mixins name them: ``unet`` or ``transformer``, ``text_encoder``,
``text_encoder_2``, ...), how kohya-style files prefix each of them, how prompts become the
denoiser's keyword arguments, what the denoiser is trained to predict, how latents are packed, and
how other tools name the family. Code outside ``studio/core/families`` asks the family instead of
spelling ``"unet"`` or a width like 768.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.core.families.architectures import Architecture

OBJECTIVES = ("epsilon", "v_prediction", "flow_matching")
# The effort levels of the Train page's presets, in the order it offers them.
PRESET_LEVELS = ("quick", "balanced", "high quality")


@dataclass(frozen=True)
class TrainingPreset:
    """One effort level of a LoRA run on a family's full-size models: the numbers a first run starts from.

    Option names are the training config's (``training.max_train_steps``, ``network.rank``, ...).
    ``quick`` tries a dataset and shows whether the style takes; ``balanced`` is the family's usual run;
    ``high quality`` trains longer at a higher rank. The embedded tiny models learn in far fewer steps
    and use their own counts (``studio.core.embedded.EMBEDDED_PRESET_OVERRIDES``).
    """

    max_train_steps: int
    rank: int
    learning_rate: float
    train_batch_size: int
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.max_train_steps < 1 or self.rank < 1 or self.train_batch_size < 1 or self.learning_rate <= 0:
            raise ValueError(f"training preset {self}: steps, rank, batch size and learning rate must be positive")
        if not 0 <= self.lr_warmup_steps < self.max_train_steps:
            raise ValueError(f"training preset {self}: warmup must be shorter than the run")


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family, named as the diffusers pipeline names its components.

    ``kohya_prefixes`` are the key prefixes kohya-style files use for it; the first is the one the
    studio writes (SD-1: ``lora_te_``; SDXL: ``lora_te1_``/``lora_te2_``; T5: ``lora_te3_``).
    ``lora`` says whether the studio trains and loads LoRA layers on it.
    """

    component: str
    tokenizer: str
    kohya_prefixes: tuple[str, ...]
    kind: str = "clip"  # "clip" | "clip_with_projection" | "t5"
    lora: bool = True
    target_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class SingleFileComponent:
    """One pipeline component as the family's original single-file checkpoints hold it.

    ``converter`` names the renaming (in ``studio.core.single_file``) that takes the component's
    diffusers/transformers keys to the file's, without ``prefix``; ``class_name`` is the class the
    component must be (diffusers' ``_class_name``), and for a transformers model ``model_type`` is
    what its config must declare, so a file's embedded configs can never build another class.
    """

    component: str
    prefix: str
    class_name: str
    converter: str
    library: str = "diffusers"  # "diffusers" | "transformers": how its config is written and checked
    model_type: str | None = None


@dataclass(frozen=True)
class SingleFileLayout:
    """How a family's pipeline is written as one ``.safetensors`` file in its original key layout.

    ``format`` is the value the studio writes under ``lora_studio.format`` (``read_formats`` lists
    older values it still reads); ``config_dir`` holds the component configs (and ``model_index.json``)
    used for files that carry none; ``tokenizers`` maps a tokenizer component to a folder holding its
    files, since single files carry no tokenizer (files the studio exports record their tokenizers'
    pad tokens, which can differ); ``scheduler`` is the component whose config an
    exported file carries beside the weights' own.
    """

    format: str
    components: tuple[SingleFileComponent, ...]
    config_dir: Path
    tokenizers: Mapping[str, Path] = field(default_factory=dict)
    # Special tokens the family's reference tokenizers set differently from the shared folder's, for
    # files that do not record their own (SDXL's second tokenizer pads with "!", not <|endoftext|>).
    tokenizer_options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    scheduler: str = "scheduler"
    read_formats: tuple[str, ...] = ()

    @property
    def formats(self) -> tuple[str, ...]:
        """Every ``lora_studio.format`` value a file of this layout may carry."""
        return (self.format, *self.read_formats)

    def component(self, name: str) -> SingleFileComponent:
        for part in self.components:
            if part.component == name:
                return part
        raise KeyError(f"the single-file layout {self.format!r} has no component {name!r}")


@dataclass(frozen=True)
class OriginalModule:
    """A module of the family's reference implementation (the names its authors' code, ComfyUI and kohya's
    files use) that diffusers holds as several modules, or in another row order.

    ``targets`` are the diffusers modules, in the order their outputs are stacked in the original's
    weight (FLUX's ``img_attn.qkv`` is ``attn.to_q``, ``to_k``, ``to_v``); each takes as many rows as
    the base model's own module has outputs, so a file is split by the sizes of the model it loads
    into, never by the full-size model's. ``swap_halves``: the original's two output halves are
    diffusers' in reverse order (shift and scale of a final modulation). ``widths``: each target's
    output count relative to the others' (FLUX's ``linear1``: q, k, v at 1 and the MLP at 4), so that an
    adapter patching only some of them can be written fused, the rest as zeros, with no base at hand.
    """

    targets: tuple[str, ...]
    swap_halves: bool = False
    widths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.widths:
            object.__setattr__(self, "widths", (1,) * len(self.targets))
        if len(self.widths) != len(self.targets):
            raise ValueError(f"OriginalModule: {len(self.targets)} targets but {len(self.widths)} widths")


def in_block(block: str, ours: str | OriginalModule) -> str | OriginalModule:
    """A block-relative diffusers name (or :class:`OriginalModule`) under the block ``block``."""
    if isinstance(ours, str):
        return f"{block}.{ours}"
    return OriginalModule(tuple(f"{block}.{t}" for t in ours.targets), ours.swap_halves, ours.widths)


@dataclass(frozen=True)
class Family:
    """Everything the studio needs to know about one base-model architecture.

    ``pipelines`` maps a task (``text2img``, ``img2img``, ``inpaint``) to a diffusers pipeline class
    name; ``target_modules`` maps a preset name to module names for the denoiser, from the fewest
    layers to the most;
    ``text_encoder_target_modules`` is the same for the text encoder(s).
    """

    name: str
    display_name: str
    pipelines: dict[str, str]
    native_resolution: int
    latent_granularity: int
    target_modules: dict[str, tuple[str, ...]]
    text_encoder_target_modules: tuple[str, ...]
    kohya_base_model_version: str
    modelspec_architecture: str
    default_guidance_scale: float = 7.5
    extra_pipeline_class_names: tuple[str, ...] = field(default=())
    # What identifies the family in files (key patterns, widths, single-file prefixes, pipeline classes).
    architecture: Architecture | None = None
    # The conditioning hook: (components by pipeline name, prompts) -> the denoiser's keyword
    # arguments for those prompts, batched along dim 0 (SD-1: {"encoder_hidden_states": ...}).
    # Training calls it without a pipeline, exactly as the family's pipeline encodes at inference;
    # every value is a tensor with one row per prompt, so rows can be cached per prompt.
    # Families with a T5 encoder take a third argument, the T5 prompt length (None: the family's own).
    condition: Callable[..., dict[str, Any]] | None = None
    # The longest T5 prompt, in tokens, the family's pipeline accepts or defaults to (FLUX.1: 512,
    # SD3: 256); 0 for families without a T5 encoder.
    t5_max_length: int = 0
    # Latent packing: (latents) -> what the denoiser takes, and back (latents, height, width);
    # None for families whose denoiser takes the VAE's latents as they are (UNets).
    pack_latents: Callable[[Any], Any] | None = None
    unpack_latents: Callable[[Any, int, int], Any] | None = None
    # Per-image conditioning from sizes: (original (h, w), crop top-left (top, left), target (h, w))
    # -> extra denoiser kwargs for that image, one row (SDXL's ``time_ids``); None when the family has none.
    size_conditioning: Callable[[tuple[int, int], tuple[int, int], tuple[int, int]], dict[str, Any]] | None = None
    # How the denoiser is called: (denoiser, latents as packed, timesteps, conditioning, latent (h, w))
    # -> prediction; None for ``denoiser(latents, timesteps, **conditioning)`` (SD-1's UNet).
    call_denoiser: Callable[..., Any] | None = None
    # The pipeline-call options a request's CFG scale and negative prompt become: (pipe, guidance
    # scale, negative prompt, the model's recommended settings) -> kwargs; None for SD's
    # ``guidance_scale`` and ``negative_prompt`` as they are.
    sampling_options: Callable[..., dict] | None = None
    # Sampler name (A1111's) -> (diffusers scheduler class, extra config) where the family samples with
    # its own schedulers (flow matching); None for the studio's SD samplers.
    samplers: Mapping[str, tuple[str, dict]] | None = None
    # The denoiser's component name in the pipeline and in peft/diffusers keys ("unet" | "transformer").
    denoiser: str = "unet"
    # What a page calls the denoiser when it labels its strength ("UNet" for SD-1, "transformer" for Flux).
    denoiser_label: str = "denoiser"
    # kohya-style key prefixes of the denoiser; the first is the one the studio writes.
    denoiser_kohya_prefixes: tuple[str, ...] = ("lora_unet_",)
    text_encoders: tuple[TextEncoder, ...] = ()
    # What the denoiser is trained to predict (one of OBJECTIVES) and the scheduler class it trains with.
    objective: str = "epsilon"
    training_scheduler: str = "DDPMScheduler"
    # Tags the Hub puts on a repo of this family (beside the generic LoRA tags).
    hub_tags: tuple[str, ...] = ()
    # Hub base models whose license an adapter inherits -> the card's license fields (``license``,
    # ``license_name``, ``license_link``), used when the user names none.
    base_model_licenses: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # Settings a first run should start from (keys as in the training config's sections).
    recommended: Mapping[str, Any] = field(default_factory=dict)
    # The Train page's presets on the family's full-size models: one per PRESET_LEVELS entry.
    training_presets: Mapping[str, TrainingPreset] = field(default_factory=dict)
    # The original (A1111/ComfyUI) single-file layout; None when the studio has none for the family.
    single_file: SingleFileLayout | None = None
    # The full-size reference model's component configs (``configs/<name>/``: model_index.json and one
    # folder per component), from which its architecture is built on the meta device to check a
    # real-size adapter's names and shapes with no weights downloaded.
    reference_config_dir: Path | None = None
    # The denoiser's original (reference-implementation) module names: (denoiser config) -> original dotted
    # name -> the diffusers module it is, or an :class:`OriginalModule` when diffusers splits or reorders
    # it. kohya-style files spell these names flat after a denoiser prefix (lora_unet_double_blocks_0_...),
    # ComfyUI's dotted after ``diffusion_model.``; None when the family's files use diffusers' names.
    original_modules: Callable[[Any], Mapping[str, str | OriginalModule]] | None = None
    # Keyword arguments every load of the family's pipelines passes (SD-1: no safety checker; a
    # keyword a pipeline class does not take would be ignored with a warning, so each family names its own).
    pipeline_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def single_file_config_dir(self) -> Path | None:
        """The component configs for single files that carry none (see :class:`SingleFileLayout`)."""
        return self.single_file.config_dir if self.single_file else None

    @property
    def pipeline_class_names(self) -> tuple[str, ...]:
        return tuple(self.pipelines.values()) + self.extra_pipeline_class_names

    @property
    def lora_components(self) -> tuple[str, ...]:
        """The pipeline components that carry LoRA layers, denoiser first (diffusers' ``_lora_loadable_modules``)."""
        return (self.denoiser,) + tuple(te.component for te in self.text_encoders if te.lora)

    @property
    def text_encoder_components(self) -> tuple[str, ...]:
        return tuple(te.component for te in self.text_encoders)

    def kohya_prefix_map(self) -> dict[str, str]:
        """Every kohya-style key prefix of this family -> the component it names."""
        out = {prefix: self.denoiser for prefix in self.denoiser_kohya_prefixes}
        for te in self.text_encoders:
            out.update({prefix: te.component for prefix in te.kohya_prefixes})
        return out

    def kohya_prefix(self, component: str) -> str:
        """The prefix the studio writes for ``component`` in a kohya-style file."""
        if component == self.denoiser:
            return self.denoiser_kohya_prefixes[0]
        for te in self.text_encoders:
            if te.component == component:
                return te.kohya_prefixes[0]
        raise KeyError(f"{self.display_name} has no component {component!r}")

    def is_denoiser(self, component: str) -> bool:
        return component == self.denoiser

    def text_encoder(self, component: str) -> TextEncoder:
        for te in self.text_encoders:
            if te.component == component:
                return te
        raise KeyError(f"{self.display_name} has no text encoder {component!r}")

    def conditioning(self, components: Mapping[str, Any], prompts: list[str],
                     max_sequence_length: int | None = None) -> dict[str, Any]:
        """The denoiser's keyword arguments for ``prompts`` (see ``condition``); ``max_sequence_length``
        sets the T5 prompt length of families that have one and is refused by the others."""
        if self.condition is None:
            raise NotImplementedError(f"{self.display_name} has no conditioning hook")
        if not self.t5_max_length:
            if max_sequence_length:
                raise ValueError(f"{self.display_name} has no T5 encoder: a T5 prompt length does not apply")
            return self.condition(components, prompts)
        return self.condition(components, prompts, max_sequence_length)

    def t5_length(self, tokenizer, requested: int | None = None) -> int:
        """How many tokens T5 prompts are padded (and cut) to: ``requested``, else the tokenizer's own
        length; never past the family's pipeline limit (the real tokenizers say 512, the tiny one 77)."""
        if not self.t5_max_length:
            raise ValueError(f"{self.display_name} has no T5 encoder")
        length = requested or int(tokenizer.model_max_length)
        return min(length, self.t5_max_length)

    def predict(self, denoiser, latents, timesteps, conditioning: Mapping[str, Any]):
        """The denoiser's output for noisy ``latents`` at ``timesteps`` under ``conditioning``.

        Latents go in and come out as the VAE makes them: packing, if the family has any, happens here.
        """
        height, width = latents.shape[-2:]
        packed = self.pack_latents(latents) if self.pack_latents else latents
        if self.call_denoiser is not None:
            out = self.call_denoiser(denoiser, packed, timesteps, conditioning, (height, width))
        else:
            out = denoiser(packed, timesteps, **conditioning, return_dict=False)[0]
        return self.unpack_latents(out, height, width) if self.unpack_latents else out

    def pipeline_class(self, task: str = "text2img"):
        """The diffusers pipeline class for ``task`` (imports diffusers)."""
        import diffusers

        try:
            return getattr(diffusers, self.pipelines[task])
        except KeyError:
            raise ValueError(
                f"{self.display_name} has no {task!r} pipeline; tasks: {', '.join(self.pipelines)}"
            ) from None

    def modelspec_lora_architecture(self, adapter_type: str = "lora") -> str:
        """``modelspec.architecture`` for an adapter of this family, e.g. ``stable-diffusion-v1/lora``."""
        return f"{self.modelspec_architecture}/{adapter_type}"

    def __post_init__(self) -> None:
        if self.architecture is not None and self.architecture.name != self.name:
            raise ValueError(f"family {self.name}: its architecture is {self.architecture.name!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"family {self.name}: objective {self.objective!r} is not one of {OBJECTIVES}")
        if self.training_presets and tuple(self.training_presets) != PRESET_LEVELS:
            raise ValueError(f"family {self.name}: training presets must be {PRESET_LEVELS} in that order, "
                             f"got {tuple(self.training_presets)}")
