"""Training Flux with less memory: NF4/int8 bases (QLoRA) through the same trainer, the memory estimate
every run logs, and the out-of-memory message with the settings that would fit.

The quantized path runs here on CPU (bitsandbytes 0.50 has CPU kernels) on a smoke build of tiny-flux;
the estimate is checked against FLUX.1-dev built on the meta device, where the published figure is
known: an NF4 transformer, 8-bit AdamW and gradient checkpointing train a Flux LoRA in 24 GB.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from studio.core.families import get_family
from trainer.config import TrainConfig

FLUX = get_family("flux")
TOML = Path(__file__).resolve().parents[1] / "datasets" / "outlined_txt" / "train.toml"


@pytest.fixture(scope="module")
def smoke(flux_smoke):
    """The session's smoke build of tiny-flux (conftest)."""
    return flux_smoke


def _common(tmp_path, smoke):
    return [f"output.dir={tmp_path / 'runs'}", "validation.every_n_steps=0", "output.checkpointing_steps=0",
            "training.lr_warmup_steps=0", "training.max_train_steps=2", "validation.prompts=[]",
            f"model.base_model={smoke}", "output.name=outlined-flux", "network.target_modules=attention"]


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_quantized_base_trains_a_full_precision_lora(kind, smoke, tmp_path, reg):
    from safetensors import safe_open

    from studio.core.quantize import QUANT_BLOCK
    from trainer.events import read_events, run_state
    from trainer.loop import train

    cfg = TrainConfig.from_toml(TOML).apply_overrides([*_common(tmp_path, smoke), f"model.quantize={kind}"])
    result = train(cfg, console=False)
    assert result.status == "done" and math.isfinite(result.final_loss)
    start = next(e for e in read_events(result.run_dir) if e["event"] == "start")
    q = start["quantized"]
    # every block Linear of the smoke transformer is QUANT_BLOCK-aligned (width 128, MLP 512)
    shrink = 2 if kind == "int8" else 4  # fp32 -> 1 byte (+ row scales) or 0.5 byte (+ block absmax)
    assert q["kind"] == kind and q["layers"] > 50 and q["bytes_after"] < q["bytes_before"] / shrink
    assert QUANT_BLOCK == 64 and "memory estimate" in start["memory_note"]
    assert any(n.startswith("memory estimate ~") for n in run_state(result.run_dir).notes)  # what pages show
    with safe_open(str(result.adapter), "pt") as f:
        tensor = f.get_tensor(next(k for k in f.keys() if k.endswith("lora_B.weight")))
    assert tensor.dtype == torch.float32 and tensor.abs().sum() > 0  # the LoRA trained in full precision
    assert reg.get(result.ref).family == "flux"


def test_an_unknown_quantization_is_refused_by_name():
    from studio.core.errors import ConfigError

    with pytest.raises(ConfigError, match="model.quantize.*'nf4'"):
        TrainConfig.from_toml(TOML).apply_overrides(["model.quantize=fp3"])


def _full_size(rank: int = 16):
    """FLUX.1-dev's components on the meta device and a rank-``rank`` LoRA on the attention preset."""
    from studio.core.base_models import reference_architecture
    from trainer.memory import sizes_of

    ref = reference_architecture("flux", every_component=True)
    targets = FLUX.target_modules["attention"]
    lora = sum(rank * (m.in_features + m.out_features) for n, m in ref.transformer.named_modules()
               if isinstance(m, torch.nn.Linear) and n.endswith(targets))
    return sizes_of(vars(ref), FLUX, lora, text_tokens=512)


def _config(**training):
    cfg = TrainConfig.from_toml(TOML)
    cfg = replace(cfg, dataset=replace(cfg.dataset, resolution=1024),
                  training=replace(cfg.training, train_batch_size=1, **training))
    return cfg


def test_the_estimate_for_flux_1_dev_matches_what_fits_a_24_gb_gpu():
    from trainer.memory import GIB, estimate, settings_that_fit

    sizes = _full_size()
    assert 16.5e9 < sum(sizes.component_params.values()) < 17.0e9  # transformer 11.9 B + T5-XXL 4.76 B + CLIP + VAE
    plain = _config(mixed_precision="bf16", optimizer="adamw", gradient_checkpointing=False)
    lean = replace(_config(mixed_precision="bf16", optimizer="adamw8bit", gradient_checkpointing=True),
                   model=replace(plain.model, quantize="nf4"))
    big, small = estimate(plain, sizes), estimate(lean, sizes)
    assert big.total > 40 * GIB  # bf16 weights alone are 31 GiB
    assert small.total < 22 * GIB  # diffusers' flux_lora_quantization: NF4 + 8-bit Adam + checkpointing in 24 GB
    assert small.weights < big.weights / 1.8 and small.activations < big.activations / 10
    changes = settings_that_fit(plain, sizes, 24 * GIB)
    assert changes and changes[0] == "training.gradient_checkpointing = true"
    assert any(c.startswith("model.quantize") for c in changes)
    assert settings_that_fit(plain, sizes, 8 * GIB) is None  # T5-XXL in bf16 alone is 8.9 GiB
    assert settings_that_fit(lean, sizes, 24 * GIB) == []


def test_running_out_of_memory_says_the_estimate_and_keeps_the_run(smoke, tmp_path, monkeypatch):
    from studio.core.errors import TrainingOutOfMemoryError
    from trainer.loop import Trainer, train

    def no_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "_loss", no_memory)
    cfg = TrainConfig.from_toml(TOML).apply_overrides(_common(tmp_path, smoke))
    with pytest.raises(TrainingOutOfMemoryError, match=r"out of memory at step 1 \(memory estimate ~[0-9.]+ GiB"):
        train(cfg, console=False)


def test_idle_components_are_offloaded_where_the_weights_crowd_the_gpu(monkeypatch):
    from studio.core.base_models import wants_offload
    from studio.core.errors import InvalidRequestError
    from studio.core.settings import get_settings, reload_settings

    gib = 1024**3
    # FLUX.1-dev in bf16 (33.7 GB of weights) on a 24 GiB card: offload; on an 80 GiB one: not; SD-1 never.
    assert wants_offload("auto", int(33.7e9), 24 * gib) and not wants_offload("auto", int(33.7e9), 80 * gib)
    assert not wants_offload("auto", int(2.1e9), 24 * gib)
    assert wants_offload("model", 1, 80 * gib) and not wants_offload("none", int(33.7e9), 24 * gib)
    monkeypatch.setenv("LORA_STUDIO_OFFLOAD", "Model")
    reload_settings()
    assert get_settings().offload == "model"
    monkeypatch.setenv("LORA_STUDIO_OFFLOAD", "sometimes")
    get_settings.cache_clear()
    with pytest.raises(InvalidRequestError, match="LORA_STUDIO_OFFLOAD='sometimes': use one of auto, model, none"):
        get_settings()
    monkeypatch.delenv("LORA_STUDIO_OFFLOAD")
    reload_settings()
