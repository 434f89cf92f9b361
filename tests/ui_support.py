"""Helpers for the UI tests: real LoRA files for the tiny model, registered the way users register them.

Not a test module (pytest collects test_*.py only); the UI tests import it by name.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import torch
from PIL import Image


def save_lora(out_dir: Path, *, seed: int, rank: int = 4, alpha: float = 4.0) -> Path:
    """A random (non-identity) UNet LoRA for the tiny model, saved as diffusers does (alpha metadata kept).

    Built on a private float32 copy of the tiny model, so the shared cached pipeline stays clean.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from studio.core.base_models import load_fresh_pipeline

    pipe = load_fresh_pipeline("tiny")
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                     init_lora_weights=False)
    pipe.unet.add_adapter(cfg, adapter_name=f"new{seed}")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet, adapter_name=f"new{seed}"))
    out_dir.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=layers,
                                              unet_lora_adapter_metadata=cfg.to_dict())
    named = out_dir / f"style{seed}.safetensors"
    (out_dir / "pytorch_lora_weights.safetensors").rename(named)
    return named


def sample_png(color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def register(reg, name: str, weights: Path, *, trigger_words=(), tags=(), samples=0, parents=()):
    """Register ``weights`` as a new version of ``name`` (origin 'trained', with sample images)."""
    from adapters.registry import SampleImage, VersionInfo

    info = VersionInfo(family="sd1", adapter_type="lora", rank=4, alpha=4.0, components=["unet"],
                       target_modules=["to_q", "to_k", "to_v", "to_out.0"], trigger_words=list(trigger_words),
                       tags=list(tags), base_model="tiny", origin="trained", parents=list(parents),
                       dataset_fingerprint="fp-test", training_config={"network": {"rank": 4}},
                       samples=[SampleImage(image=sample_png((40 * i, 0, 0)), recipe={"prompt": f"sample {i}"})
                                for i in range(samples)], weights_format="peft")
    return reg.register(name, weights, info)


def wait_for_jobs(at, timeout: float = 180):
    """Rerun an AppTest page until its session's generation jobs have finished and joined the page (the
    studio's queue runs them on its worker thread, beside the page, as it does for a browser)."""
    deadline = time.monotonic() + timeout
    while _open_jobs(at):
        if time.monotonic() > deadline:
            raise AssertionError(f"generation jobs still open after {timeout} s: {_open_jobs(at)}")
        time.sleep(0.05)
        at.run()
    return at


def _open_jobs(at) -> list:
    try:
        return list(at.session_state["jobs"])
    except KeyError:
        return []
