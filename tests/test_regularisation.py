"""Regularisation images with prior preservation (dataset.reg_data_dir, dataset.prior_loss_weight): kohya's
epoch balance, no trigger word on class images, never held out, the loss weight, metadata, and exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from studio.core.errors import ConfigError, NoUsableImagesError
from trainer.config import TrainConfig
from trainer.data import open_training_dataset
from trainer.loop import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
OUTLINED = ROOT / "datasets" / "outlined_txt"  # 20 images, trigger zkoutline
STRIPED = ROOT / "datasets" / "striped" / "10_zkstripes"


@pytest.fixture
def reg_dir(tmp_path) -> Path:
    """Three class images ("a shape") taken from another sample set."""
    folder = tmp_path / "class"
    folder.mkdir()
    for i in range(3):
        shutil.copy(STRIPED / f"{i:03d}.png", folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a shape, number {i}")
    return folder


def _config(tmp_path, reg_dir, *overrides) -> TrainConfig:
    return TrainConfig.from_toml(OUTLINED / "train.toml").apply_overrides([
        f"dataset.reg_data_dir={reg_dir}", f"output.dir={tmp_path / 'runs'}", "validation.prompts=[]",
        "validation.every_n_steps=0", "output.checkpointing_steps=0", "training.lr_warmup_steps=0",
        "training.max_train_steps=5", "dataset.caption_dropout_rate=0", *overrides])


def test_an_epoch_holds_as_many_class_samples_as_training_samples(tmp_path, reg_dir):
    config = _config(tmp_path, reg_dir, "validation.held_out_count=4").resolved()
    data = open_training_dataset(config.dataset, seed=0)
    train_set, held = data.split_held_out(count=4)
    assert not any(r.reg for r in held.records)  # class images are never held out
    own = [i for i in range(len(train_set)) if not train_set.records[train_set.index[i]].reg]
    reg = [i for i in range(len(train_set)) if train_set.records[train_set.index[i]].reg]
    assert len(own) == 16 and len(reg) == 16  # 16 training images: 16 class samples, the 3 images in turn
    assert sorted({train_set.records[train_set.index[i]].key for i in reg}) == ["reg/000.png", "reg/001.png",
                                                                                  "reg/002.png"]
    assert all("zkoutline" in train_set.caption(i) for i in own)
    assert all(train_set.caption(i).startswith("a shape") and "zkoutline" not in train_set.caption(i) for i in reg)
    assert all(train_set[i]["reg"] for i in reg[:3]) and not train_set[own[0]]["reg"]
    # the class images are part of what a resume must find unchanged
    without = open_training_dataset(TrainConfig.from_toml(OUTLINED / "train.toml").resolved().dataset)
    assert data.fingerprint != without.fingerprint


def test_prior_loss_weight_scales_a_class_images_loss(tmp_path, reg_dir):
    trainer = Trainer(_config(tmp_path, reg_dir, "dataset.prior_loss_weight=0.25").resolved(), run_dir=tmp_path / "r",
                      register=False, console=False)
    trainer._setup()
    data = trainer.train_set
    pair = [data[next(i for i in range(len(data)) if data.records[data.index[i]].reg)],
            data[next(i for i in range(len(data)) if not data.records[data.index[i]].reg)]]
    pair = [p for p in pair if p["pixel_values"].shape == pair[0]["pixel_values"].shape] or pair[:1]
    with torch.no_grad():
        weighted = trainer._loss(pair, torch.Generator().manual_seed(0), reduce=False)
        trainer.config.dataset.prior_loss_weight = 1.0
        plain = trainer._loss(pair, torch.Generator().manual_seed(0), reduce=False)
    assert weighted[0].item() == pytest.approx(0.25 * plain[0].item(), rel=1e-5)
    if len(pair) == 2:
        assert weighted[1].item() == pytest.approx(plain[1].item(), rel=1e-6)


def test_a_run_with_class_images_records_them_and_resumes_exactly(tmp_path, reg_dir):
    straight = train(_config(tmp_path, reg_dir, "output.name=straight"), register=False, console=False)
    with safe_open(straight.adapter, "pt") as f:
        md = f.metadata()
    assert md["ss_num_reg_images"] == "3" and json.loads(md["ss_reg_dataset_dirs"]) == {
        "class": {"n_repeats": 1, "img_count": 3}}
    plain = train(_config(tmp_path, reg_dir, "output.name=plain", "dataset.reg_data_dir="), register=False,
                  console=False)
    cfg = _config(tmp_path, reg_dir, "output.name=resumed", "output.checkpointing_steps=2")
    assert train(cfg, register=False, console=False, stop_at_step=3).status == "stopped"
    resumed = train(cfg, resume="latest", register=False, console=False)
    a, b, p = load_file(straight.adapter), load_file(resumed.adapter), load_file(plain.adapter)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run left the uninterrupted trajectory"
    assert any(not torch.equal(a[k], p[k]) for k in a)


def test_bad_regularisation_settings_are_messages(tmp_path, reg_dir):
    with pytest.raises(ConfigError, match="prior_loss_weight must be >= 0"):
        _config(tmp_path, reg_dir, "dataset.prior_loss_weight=-1")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(NoUsableImagesError, match="reg_data_dir"):
        open_training_dataset(_config(tmp_path, empty).resolved().dataset)
