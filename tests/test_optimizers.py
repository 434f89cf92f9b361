"""The optimizers people use for LoRA training beside AdamW: Prodigy, Lion and schedule-free AdamW. Each
trains the striped sample (the loss falls, the adapter moves), stops and resumes onto the uninterrupted
trajectory bit for bit, and refuses the settings it cannot mean."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from studio.core.errors import ConfigError
from trainer.config import TrainConfig
from trainer.loop import train

ROOT = Path(__file__).resolve().parent.parent
STRIPED = ROOT / "datasets" / "striped" / "train.toml"
# Each optimizer at the learning rate its users run it at.
RATES = {"prodigy": 1.0, "lion": 3e-5, "adamw_schedulefree": 1e-3}


def _config(tmp_path, optimizer: str, *overrides) -> TrainConfig:
    return TrainConfig.from_toml(STRIPED).apply_overrides([
        f"output.dir={tmp_path / 'runs'}", "validation.prompts=[]", "training.train_batch_size=2",
        "training.max_train_steps=6", "training.lr_warmup_steps=2", "training.lr_scheduler=constant",
        f"training.optimizer={optimizer}", f"training.learning_rate={RATES[optimizer]}",
        "validation.every_n_steps=3", "output.checkpointing_steps=2", *overrides])


# Schedule-free AdamW, whose evaluation weights differ from its training weights, in the default suite;
# Prodigy and Lion with -m slow (each is a third of a minute here).
@pytest.mark.parametrize("optimizer", [
    pytest.param("prodigy", marks=pytest.mark.slow), pytest.param("lion", marks=pytest.mark.slow),
    "adamw_schedulefree"])
def test_each_optimizer_trains_and_resumes_exactly(tmp_path, optimizer):
    straight = train(_config(tmp_path, optimizer, "output.name=straight"), register=False, console=False)
    assert straight.status == "done", straight.message
    cfg = _config(tmp_path, optimizer, "output.name=resumed")
    stopped = train(cfg, register=False, console=False, stop_at_step=4)
    assert stopped.status == "stopped" and stopped.steps == 4
    resumed = train(cfg, resume="latest", register=False, console=False)
    assert resumed.status == "done" and resumed.steps == 6
    a, b = load_file(straight.adapter), load_file(resumed.adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume left the trajectory"
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # the adapter moved off zero
    with safe_open(straight.adapter, framework="pt") as f:
        assert f.metadata()["ss_optimizer"] == {"prodigy": "prodigyopt.Prodigy", "lion": "lion_pytorch.Lion",
                                               "adamw_schedulefree": "schedulefree.AdamWScheduleFree"}[optimizer]


def test_settings_an_optimizer_cannot_mean_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="Prodigy estimates the step size itself.*use 1.0"):
        TrainConfig.from_toml(STRIPED).apply_overrides(["training.optimizer=prodigy", "training.learning_rate=1e-4"])
    with pytest.raises(ConfigError, match="schedule-free AdamW replaces the schedule"):
        TrainConfig.from_toml(STRIPED).apply_overrides(["training.optimizer=adamw_schedulefree",
                                                        "training.lr_scheduler=cosine"])
    with pytest.raises(ConfigError, match="training.optimizer"):
        TrainConfig.from_toml(STRIPED).apply_overrides(["training.optimizer=sgd"])
