"""The :class:`Family` description every base-model family fills in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Family:
    """Everything the studio needs to know about one base-model architecture.

    ``pipelines`` maps a task (``text2img``, ``img2img``, ``inpaint``) to a diffusers pipeline class
    name; ``target_modules`` maps a preset name to module names for the denoiser;
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
    single_file_config_dir: Path | None = None
    extra_pipeline_class_names: tuple[str, ...] = field(default=())
    # (tokenizer, text_encoder, prompts) -> the denoiser's conditioning; training encodes prompts
    # without a pipeline, exactly as the family's pipeline does at inference.
    encode_prompts: Callable[..., Any] | None = None

    @property
    def pipeline_class_names(self) -> tuple[str, ...]:
        return tuple(self.pipelines.values()) + self.extra_pipeline_class_names

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
