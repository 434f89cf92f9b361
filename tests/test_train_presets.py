"""Presets and time estimates (studio.app.train_presets): the configs a first run starts from, per family and
on the tiny models, and training times scaled from this machine's earlier runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from studio.app import train_presets
from studio.app.train_presets import NO_HISTORY, OWN, estimate, preset_config, run_speeds
from studio.core.embedded import EMBEDDED_MODELS, EMBEDDED_PRESET_OVERRIDES
from studio.core.errors import InvalidRequestError
from studio.core.families import FAMILIES
from studio.core.families.base import PRESET_LEVELS, TrainingPreset
from trainer.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
STRIPED = ROOT / "datasets" / "striped"


def _striped() -> TrainConfig:
    return train_presets.dataset_settings(STRIPED)


def test_every_family_has_each_level_growing_in_steps_and_the_tiny_models_their_own():
    for family in FAMILIES.values():
        assert tuple(family.training_presets) == PRESET_LEVELS, family.name
        steps = [family.training_presets[level].max_train_steps for level in PRESET_LEVELS]
        assert steps == sorted(steps) and steps[0] >= 300, (family.name, steps)
    assert set(EMBEDDED_PRESET_OVERRIDES) == set(PRESET_LEVELS)
    assert EMBEDDED_PRESET_OVERRIDES["quick"]["max_train_steps"] == 20  # seconds on a CPU
    with pytest.raises(ValueError, match="warmup"):
        TrainingPreset(max_train_steps=10, rank=4, learning_rate=1e-4, train_batch_size=1, lr_warmup_steps=10)


def test_quick_on_tiny_is_the_dataset_with_twenty_steps():
    own = _striped()
    config = preset_config("quick", dataset=STRIPED, base_model="tiny", settings=own)
    t = config.training
    assert (t.max_train_steps, t.num_train_epochs, t.lr_warmup_steps, t.learning_rate, t.train_batch_size) == \
        (20, 0, 0, 1e-3, 4)
    assert config.validation.every_n_steps == 10 and config.output.checkpointing_steps == 10
    # The dataset's own facts stay: sample prompts, buckets, layers, name.
    assert config.validation.prompts == own.validation.prompts
    assert config.dataset.path == own.dataset.path == str(STRIPED)
    assert (config.dataset.resolution, config.network.target_modules, config.output.name) == \
        (32, "attention+conv", "striped")
    assert config.resolved().training.max_train_steps == 20


def test_levels_follow_the_family_on_full_size_models_and_the_embedded_table_on_tiny_ones():
    balanced = preset_config("balanced", dataset=STRIPED, base_model="tiny-flux", settings=_striped())
    flux = FAMILIES["flux"].training_presets["balanced"]
    assert balanced.network.rank == flux.rank and balanced.training.lr_scheduler == flux.lr_scheduler
    assert balanced.training.max_train_steps == EMBEDDED_PRESET_OVERRIDES["balanced"]["max_train_steps"]
    assert train_presets.level_numbers("high quality", "tiny") == TrainingPreset(
        **{**FAMILIES["sd1"].training_presets["high quality"].__dict__, **EMBEDDED_PRESET_OVERRIDES["high quality"]})
    with pytest.raises(InvalidRequestError, match="unknown preset"):
        train_presets.level_numbers("slow", "tiny")


def test_the_datasets_own_preset_is_its_train_toml_as_it_is():
    own = _striped()
    assert train_presets.preset_keys(own) == (*PRESET_LEVELS, OWN)
    assert preset_config(OWN, dataset=STRIPED, base_model="tiny", settings=own).to_dict() == own.to_dict()


def test_another_family_keeps_the_dataset_but_not_what_belongs_to_the_model():
    config = preset_config("quick", dataset=STRIPED, base_model="tiny-flux", settings=_striped())
    assert config.network.target_modules == "all-linear"  # a transformer has no convolutions
    assert config.output.name == "striped-tiny-flux"  # an adapter's versions keep one family
    assert config.dataset.resolution == 32  # tiny-flux is native 32 px too
    assert config.model.base_model == "tiny-flux"


def test_a_base_model_of_another_resolution_gets_its_own_sizes(tmp_path):
    model = tmp_path / "sd1-64px"  # the tiny model's configs (no weights) at twice the sample size
    for src in EMBEDDED_MODELS["tiny"].rglob("*.json"):
        dst = model / src.relative_to(EMBEDDED_MODELS["tiny"])
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    unet = json.loads((model / "unet" / "config.json").read_text())
    (model / "unet" / "config.json").write_text(json.dumps({**unet, "sample_size": unet["sample_size"] * 2}))
    config = preset_config("quick", dataset=STRIPED, base_model=str(model), settings=_striped())
    d = config.dataset
    assert (d.resolution, d.bucket_reso_steps, d.min_bucket_reso, d.max_bucket_reso) == (0, 0, 0, 0)
    assert config.output.name == "striped"  # the same family: the same adapter
    # Steps come from the full-size family (not an embedded model), learning rate too.
    assert config.training.max_train_steps == FAMILIES["sd1"].training_presets["quick"].max_train_steps


def test_prodigy_keeps_its_rate_and_the_alpha_ratio_is_kept(tmp_path):
    folder = tmp_path / "cats"
    folder.mkdir()
    (folder / "train.toml").write_text('[dataset]\npath = "."\n[network]\nrank = 8\nlora_alpha = 4.0\n'
                                       '[training]\noptimizer = "prodigy"\nlearning_rate = 1.0\n')
    own = train_presets.dataset_settings(folder)
    config = preset_config("high quality", dataset=folder, base_model="tiny", settings=own)
    assert config.training.learning_rate == 1.0  # an AdamW-sized rate would be refused with prodigy
    assert (config.network.rank, config.network.lora_alpha) == (16, 8.0)


def test_a_folder_without_train_toml_gets_the_defaults_and_no_own_preset(tmp_path):
    folder = tmp_path / "my photos"
    folder.mkdir()
    assert train_presets.dataset_settings(folder) is None
    assert train_presets.preset_keys(None) == PRESET_LEVELS
    config = preset_config("quick", dataset=folder, base_model="tiny")
    assert config.dataset.path == str(folder) and config.output.name == "my-photos"
    assert config.validation.prompts == []
    with pytest.raises(InvalidRequestError, match="no train.toml"):
        preset_config(OWN, dataset=folder, base_model="tiny")


# ---- estimates -------------------------------------------------------------------------------


def _run(folder: Path, *, base_model="tiny", batch=4, resolution=32, sec=0.5, steps=20, processes=1) -> Path:
    """A run directory as the trainer leaves it: the resolved config and step events with their speed."""
    folder.mkdir(parents=True)
    config = TrainConfig.from_dict({"model": {"base_model": base_model}, "dataset": {"path": str(STRIPED),
                                    "resolution": resolution}, "training": {"train_batch_size": batch}})
    config.save(folder / "config.toml")
    lines = [{"event": "start", "time": 0, "step": 0, "total_steps": steps, "num_processes": processes}]
    lines += [{"event": "step", "time": i, "step": i, "total_steps": steps, "loss": 0.1, "sec_per_step": sec}
              for i in range(1, steps + 1)]
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    return folder


def _config(steps=100, batch=2, resolution=64, base_model="tiny") -> TrainConfig:
    return TrainConfig.from_dict({"model": {"base_model": base_model}, "dataset": {"path": str(STRIPED),
                                  "resolution": resolution},
                                  "training": {"max_train_steps": steps, "train_batch_size": batch}})


def test_no_earlier_run_says_so_instead_of_a_number(studio_home):
    got = estimate(_config(), run_speeds())
    assert got.seconds is None and got.runs == 0 and got.text == NO_HISTORY


def test_an_earlier_run_scales_by_steps_batch_and_pixels(studio_home):
    _run(studio_home / "runs" / "a", batch=4, resolution=32, sec=0.5)
    _run(studio_home / "runs" / "other-model", base_model="tiny-sdxl", sec=50.0)
    _run(studio_home / "runs" / "too-short", sec=50.0, steps=3)  # mostly its slow first steps
    (studio_home / "runs" / "never-started").mkdir()
    speeds = run_speeds()
    assert sorted(s.base_model for s in speeds) == ["tiny", "tiny-sdxl"]
    # 100 steps x 0.5 s x (2 images x 64^2 px) / (4 images x 32^2 px) = 100 s
    got = estimate(_config(steps=100, batch=2, resolution=64), speeds)
    assert got.seconds == pytest.approx(100.0) and got.runs == 1
    assert got.text.startswith("about 2 min of training") and "1 earlier run of tiny" in got.text
    assert estimate(_config(base_model="tiny-flux"), speeds).text == NO_HISTORY


def test_the_median_of_the_newest_runs_and_runs_outside_the_runs_folder(studio_home, tmp_path):
    import os

    # Four older slow runs, two newer fast ones: the machine got faster (or stopped sharing its cores).
    for i, sec in enumerate([9.0, 9.0, 9.0, 9.0, 1.0, 1.0]):
        run = _run(studio_home / "runs" / f"r{i}", sec=sec)
        os.utime(run / "events.jsonl", (1_000 + i, 1_000 + i))
    job_run = _run(tmp_path / "elsewhere" / "job-run", sec=2.0, processes=2)  # a job's run, newest: 8 images/step
    speeds = run_speeds([job_run, job_run])
    assert len(speeds) == 7 and speeds[0].run_dir == str(job_run.resolve()) and speeds[0].images_per_step == 8
    got = estimate(_config(steps=10, batch=4, resolution=32), speeds)
    # The newest five cost 1, 1, 1 (2 s over twice the images), 9, 9 s per 4 images: median 1 s per step.
    assert got.runs == 5 and got.seconds == pytest.approx(10.0)


def test_a_config_by_epochs_gets_no_number(studio_home):
    _run(studio_home / "runs" / "a")
    config = TrainConfig.from_dict({"dataset": {"path": str(STRIPED)},
                                    "training": {"max_train_steps": 0, "num_train_epochs": 3}})
    got = estimate(config, run_speeds())
    assert got.seconds is None and "epochs" in got.text


def test_durations_read_as_people_say_them():
    assert [train_presets.duration(s) for s in (0.2, 42, 59.6, 150, 3599, 7500)] == \
        ["1 s", "42 s", "1 min", "2 min", "1 h 00 min", "2 h 05 min"]
