"""An EMA of the adapter weights (training.ema_decay): its update rule, what is evaluated and saved, exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from studio.core.errors import ConfigError
from trainer.config import TrainConfig
from trainer.loop import ADAPTER_FILE, CHECKPOINTS, Trainer, train

ROOT = Path(__file__).resolve().parents[1]
OUTLINED_TXT = ROOT / "datasets" / "outlined_txt" / "train.toml"


def _config(tmp_path, *overrides) -> TrainConfig:
    return TrainConfig.from_toml(OUTLINED_TXT).apply_overrides([
        f"output.dir={tmp_path / 'runs'}", "validation.prompts=[]", "validation.every_n_steps=0",
        "validation.held_out_count=0", "output.checkpointing_steps=0", "training.lr_warmup_steps=0",
        "training.max_train_steps=6", *overrides])


def test_the_update_rule_is_diffusers_warmed_up_average(tmp_path):
    trainer = Trainer(_config(tmp_path, "training.ema_decay=0.9").resolved(), run_dir=tmp_path / "run",
                      register=False, console=False)
    trainer._setup()
    start = [e.clone() for e in trainer.ema]
    assert all(torch.equal(e, p.detach().float()) for e, p in zip(start, trainer.trainable))
    with torch.no_grad():
        for p in trainer.trainable:
            p.add_(1.0)
    trainer._ema_update(1)  # d = min(0.9, 1/10) = 0.1: 90% of the way to the new weights
    assert all(torch.allclose(e, s + 0.9) for e, s in zip(trainer.ema, start))
    trainer._ema_update(100)  # d = min(0.9, 100/109) = 0.9
    assert all(torch.allclose(e, s + 0.9 + 0.1 * 0.1) for e, s in zip(trainer.ema, start))
    # evaluation sees the EMA; afterwards the raw weights are back, bit for bit
    raw = [p.detach().clone() for p in trainer.trainable]
    with trainer._evaluation_weights():
        assert all(torch.equal(p.detach().float(), e) for p, e in zip(trainer.trainable, trainer.ema))
    assert all(torch.equal(p.detach(), r) for p, r in zip(trainer.trainable, raw))


def test_the_ema_is_what_is_saved_and_training_goes_on_with_the_raw_weights(tmp_path):
    plain = train(_config(tmp_path, "output.name=plain", "output.checkpointing_steps=3"), register=False,
                  console=False)
    ema = train(_config(tmp_path, "output.name=ema", "output.checkpointing_steps=3", "training.ema_decay=0.9"),
                register=False, console=False)
    # the raw trajectory is the plain run's: the checkpoint holds the same raw adapter at step 3
    raw_plain = load_file(str(Path(plain.run_dir) / CHECKPOINTS / "checkpoint-000003" / ADAPTER_FILE))
    raw_ema = load_file(str(Path(ema.run_dir) / CHECKPOINTS / "checkpoint-000003" / ADAPTER_FILE))
    assert sorted(k for k in raw_ema if k.startswith("ema.")) and all(
        torch.equal(raw_plain[k], raw_ema[k]) for k in raw_plain)
    # what is saved is the average: different from the last weights, and from the start (lora_B starts at 0)
    a, b = load_file(plain.adapter), load_file(ema.adapter)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("lora_B.weight") and b[k].abs().max() > 0 for k in b)


def test_an_ema_run_resumes_exactly_and_is_refused_with_schedule_free(tmp_path):
    straight = train(_config(tmp_path, "output.name=straight", "training.ema_decay=0.8"), register=False,
                     console=False)
    cfg = _config(tmp_path, "output.name=resumed", "training.ema_decay=0.8", "output.checkpointing_steps=2")
    assert train(cfg, register=False, console=False, stop_at_step=3).status == "stopped"
    resumed = train(cfg, resume="latest", register=False, console=False)
    a, b = load_file(straight.adapter), load_file(resumed.adapter)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed EMA run left the uninterrupted trajectory"
    with pytest.raises(ConfigError, match="averages the weights itself"):
        _config(tmp_path, "training.ema_decay=0.9", "training.optimizer=adamw_schedulefree",
                "training.lr_scheduler=constant")
    with pytest.raises(ConfigError, match="training.ema_decay"):
        _config(tmp_path, "training.ema_decay=1.0")
