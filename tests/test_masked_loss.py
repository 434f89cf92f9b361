"""Masked loss: a mask per image (<name>-masklabel.png or the alpha channel) cut exactly as its image, no gradient
from the masked-out area, and a masked run that stops and resumes on the same trajectory."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from trainer.config import TrainConfig
from trainer.data import open_training_dataset
from trainer.loop import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
OUTLINED = ROOT / "datasets" / "outlined_txt"


@pytest.fixture
def masked_dataset(tmp_path) -> Path:
    """Six images of the outlined set: two with a mask file (left half white), one with an alpha channel
    (right half opaque), three with neither."""
    folder = tmp_path / "masked"
    folder.mkdir()
    for i in range(6):
        for suffix in (".png", ".txt"):
            shutil.copy(OUTLINED / f"{i:03d}{suffix}", folder / f"{i:03d}{suffix}")
    for i in (0, 1):
        w, h = Image.open(folder / f"{i:03d}.png").size
        mask = np.zeros((h, w), np.uint8)
        mask[:, : w // 2] = 255
        Image.fromarray(mask, "L").save(folder / f"{i:03d}-masklabel.png")
    img = Image.open(folder / "002.png").convert("RGBA")
    alpha = np.zeros((img.height, img.width), np.uint8)
    alpha[:, img.width // 2:] = 255
    img.putalpha(Image.fromarray(alpha, "L"))
    img.save(folder / "002.png")
    return folder


def _config(tmp_path, folder, *overrides) -> TrainConfig:
    return TrainConfig.from_toml(OUTLINED / "train.toml").apply_overrides([
        f"dataset.path={folder}", f"output.dir={tmp_path / 'runs'}", "dataset.masked_loss=true",
        "validation.prompts=[]", "validation.every_n_steps=0", "validation.held_out_count=0",
        "output.checkpointing_steps=0", "training.lr_warmup_steps=0", "training.max_train_steps=4", *overrides])


def test_masks_follow_their_images_and_are_not_training_images(tmp_path, masked_dataset):
    config = _config(tmp_path, masked_dataset, "dataset.random_flip=true").resolved()
    data = open_training_dataset(config.dataset, seed=3)
    assert len(data.records) == 6 and not any("masklabel" in r.key for r in data.records)
    assert not data.report.bad_files and not data.report.ignored_files  # masks are neither images nor strays
    by_key = {}
    for i in range(len(data)):
        by_key.setdefault(data.records[data.index[i]].key, []).append(i)
    seen_flips = set()
    for key, samples in by_key.items():
        for i in samples:
            sample = data[i]
            mask = sample["mask"][0].numpy()
            assert mask.shape == tuple(sample["pixel_values"].shape[-2:])
            w = mask.shape[1]
            left, right = mask[:, : w // 2 - 1].mean(), mask[:, w // 2 + 1:].mean()
            if key in ("000.png", "001.png", "002.png"):
                learned_left = key != "002.png"  # mask files: left half; the alpha channel: right half
                if sample["flipped"]:  # mirrored with its image
                    learned_left = not learned_left
                seen_flips.add(sample["flipped"])
                assert (left, right) == ((1.0, 0.0) if learned_left else (0.0, 1.0)), (key, sample["flipped"])
            else:
                assert mask.min() == mask.max() == 1.0  # no mask: learned everywhere
    assert seen_flips == {True, False}


def test_masked_pixels_give_no_gradient(tmp_path, masked_dataset):
    trainer = Trainer(_config(tmp_path, masked_dataset).resolved(), run_dir=tmp_path / "run", register=False,
                      console=False)
    trainer._setup()
    sample = next(trainer.train_set[i] for i in range(len(trainer.train_set))
                  if trainer.train_set.records[trainer.train_set.index[i]].key == "000.png")
    outputs = {}

    class Family:  # the real family, whose denoiser output is a leaf tensor the test can read gradients from
        def __init__(self, real):
            self._real = real

        def __getattr__(self, name):
            return getattr(self._real, name)

        def predict(self, denoiser, latents, timesteps, conditioning):
            outputs["pred"] = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1),
                                          requires_grad=True)
            return outputs["pred"]

    trainer.family = Family(trainer.family)
    trainer._loss([sample], torch.Generator().manual_seed(0)).backward()
    grad0 = outputs["pred"].grad[0].abs()  # channels x h x w
    w = grad0.shape[-1]
    assert grad0[:, :, w // 2:].max() == 0  # the masked-out right half gives nothing
    assert (grad0[:, :, : w // 2].sum(dim=0) > 0).all()
    # unmasked_weight 0.25: the outside counts a quarter; the inside's share of the mean falls from
    # 1/(1/2 of the cells) to 1/(1/2 + 0.25/2): x 0.8
    trainer.config.dataset.unmasked_weight = 0.25
    trainer._loss([sample], torch.Generator().manual_seed(0)).backward()
    grad1 = outputs["pred"].grad[0].abs()
    assert grad1[:, :, w // 2:].min() >= 0 and grad1[:, :, w // 2:].max() > 0
    assert torch.allclose(grad1[:, :, : w // 2], grad0[:, :, : w // 2] * 0.8, rtol=1e-4)
    trainer.config.dataset.unmasked_weight = 0.0
    # a sample with no mask is a plain mean squared error
    plain = next(trainer.train_set[i] for i in range(len(trainer.train_set))
                 if trainer.train_set.records[trainer.train_set.index[i]].key == "005.png")
    trainer.config.dataset.masked_loss = False
    unmasked = trainer._loss([plain], torch.Generator().manual_seed(0))
    trainer.config.dataset.masked_loss = True
    assert trainer._loss([plain], torch.Generator().manual_seed(0)).item() == pytest.approx(unmasked.item(), rel=1e-6)


def test_a_masked_run_learns_differently_and_resumes_exactly(tmp_path, masked_dataset):
    overrides = ("training.max_train_steps=6", "training.train_batch_size=2")
    straight = train(_config(tmp_path, masked_dataset, *overrides, "output.name=straight"), register=False,
                     console=False)
    plain = train(_config(tmp_path, masked_dataset, *overrides, "output.name=plain", "dataset.masked_loss=false"),
                  register=False, console=False)
    cfg = _config(tmp_path, masked_dataset, *overrides, "output.name=resumed", "output.checkpointing_steps=2")
    stopped = train(cfg, register=False, console=False, stop_at_step=3)
    assert stopped.status == "stopped"
    resumed = train(cfg, resume="latest", register=False, console=False)
    a, b, p = load_file(straight.adapter), load_file(resumed.adapter), load_file(plain.adapter)
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed masked run left the uninterrupted trajectory"
    assert any(not torch.equal(a[k], p[k]) for k in a), "the masks changed nothing"
