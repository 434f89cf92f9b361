"""TrainConfig: TOML round trips, overrides, checks that name their option, resolution of defaults."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import pytest

from studio.core.errors import ConfigError, StudioError
from trainer.config import (
    SECTIONS,
    DatasetConfig,
    ModelConfig,
    NetworkConfig,
    OutputConfig,
    TrainConfig,
    TrainingConfig,
    ValidationConfig,
)

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "datasets").glob("*/train.toml"))


def _custom() -> TrainConfig:
    """A config with a non-default value in every section, including awkward strings and floats."""
    return TrainConfig(
        model=ModelConfig(base_model="owner/model@main"),
        dataset=DatasetConfig(path="/data/my \"quoted\" set", trigger_word="zkstyle",
                              caption_template="{caption}, {trigger}", caption_dropout_rate=0.05, shuffle_caption=True,
                              keep_tokens=2, repeats=3, resolution=64, bucket_reso_steps=4, min_bucket_reso=32,
                              max_bucket_reso=128, max_upscale=1.25, random_crop=True, random_flip=True,
                              caption_column="prompt"),
        network=NetworkConfig(adapter_type="lokr", rank=16, lora_alpha=0.5, dropout=0.1,
                              target_modules=["to_q", "to_v", "conv1"], train_text_encoder=True, text_encoder_lr=1e-5),
        training=TrainingConfig(optimizer="adamw8bit", learning_rate=3e-4, lr_scheduler="cosine", lr_warmup_steps=10,
                                max_train_steps=0, num_train_epochs=7, train_batch_size=2,
                                gradient_accumulation_steps=4, max_grad_norm=0.0, gradient_checkpointing=True,
                                mixed_precision="bf16", min_snr_gamma=5.0, noise_offset=0.05,
                                prediction_type="v_prediction", seed=1234, adam_epsilon=1e-6),
        validation=ValidationConfig(prompts=["zkstyle, a cat", "tab\there — ünïcode \\ back"], seeds=[7, 8, 9],
                                    every_n_steps=25, held_out_fraction=0.1),
        output=OutputConfig(name="my-style_v1.0", dir="/runs", checkpointing_steps=50, checkpoints_total_limit=0),
    )


# ---- TOML in and out ------------------------------------------------------------------------


@pytest.mark.parametrize("config", [TrainConfig(), _custom()], ids=["defaults", "custom"])
@pytest.mark.parametrize("comments", [True, False])
def test_toml_round_trip_is_exact(config, comments):
    text = config.to_toml(comments=comments)
    back = TrainConfig.from_toml_text(text)
    assert back == config
    assert back.to_toml(comments=comments) == text


def test_to_toml_writes_every_option_with_its_help(tmp_path):
    text = TrainConfig().to_toml()
    for name, cls in SECTIONS.items():
        assert f"[{name}]" in text
        for f in fields(cls):
            assert f.metadata["help"], f"{name}.{f.name} has no help text"
            assert f"\n{f.name} = " in text
            assert f"# {f.metadata['help']}\n{f.name} = " in text
    path = _custom().save(tmp_path / "config.toml")
    assert TrainConfig.from_toml(path) == _custom()


def test_relative_paths_in_a_file_are_relative_to_the_file(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "train.toml").write_text('[dataset]\npath = "images"\n[output]\ndir = "../runs"\n')
    monkeypatch.chdir(REPO)
    c = TrainConfig.from_toml(tmp_path / "cfg" / "train.toml")
    assert c.dataset.path == str((tmp_path / "cfg" / "images").resolve())
    assert c.output.dir == str((tmp_path / "runs").resolve())


@pytest.mark.parametrize("path", SHIPPED, ids=[p.parent.name for p in SHIPPED])
def test_shipped_train_configs_load_and_resolve(path):
    c = TrainConfig.from_toml(path)
    assert c.model.base_model == "tiny" and c.dataset.resolution == 32
    assert Path(c.dataset.path) == path.parent
    assert 4 <= c.network.rank <= 8 and 1e-4 <= c.training.learning_rate <= 1e-3
    assert 300 <= c.training.max_train_steps <= 600 and 4 <= c.training.train_batch_size <= 8
    trigger = {"striped": "zkstripes", "outlined": "zkoutline"}[path.parent.name.split("_")[0]]
    assert c.validation.prompts and all(p.endswith(f", {trigger}") for p in c.validation.prompts)
    r = c.resolved()
    assert (r.dataset.bucket_reso_steps, r.dataset.min_bucket_reso, r.dataset.max_bucket_reso) == (8, 16, 64)
    assert r.training.prediction_type == "epsilon" and r.output.name == path.parent.name


def test_shipped_datasets_cover_every_layout():
    assert len(SHIPPED) >= 4


# ---- unknown keys and wrong types ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[network]\nrnak = 4\n", "unknown option network.rnak; did you mean network.rank?"),
        ("[network]\nnetwork_dim = 4\n", "the studio calls it network.rank"),
        ("[training]\nuse_8bit_adam = true\n", 'training.optimizer = "adamw8bit"'),
        ("[training]\nlearning_rat = 1e-4\n", "did you mean training.learning_rate?"),
        ("[netwrk]\nrank = 4\n", "unknown section [netwrk]; did you mean [network]?"),
        ("rank = 4\n", "option rank is outside its table: write it under [network]"),
        ("[network]\nrank = \"4\"\n", "network.rank must be a whole number, got '4'"),
        ("[network]\nrank = 4.5\n", "network.rank must be a whole number, got 4.5"),
        ("[model]\nmax_sequence_length = 1024\n", "model.max_sequence_length must be 0 (the model's own) or 1 to 512"),
        ("[dataset]\nrandom_flip = 1\n", "dataset.random_flip must be true or false, got 1"),
        ("[validation]\nseeds = 3\n", "validation.seeds must be a list, got 3"),
        ("[validation]\nprompts = [1]\n", "validation.prompts[0] must be a string, got 1"),
        ("network = 3\n", "network must be a table ([network]), got 3"),
        ("[network\nrank = 4\n", "is not valid TOML"),
    ],
)
def test_bad_toml_names_the_option(text, expected):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_toml_text(text)
    assert expected in str(e.value)
    assert isinstance(e.value, StudioError) and isinstance(e.value, ValueError)


def test_ints_are_accepted_for_floats():
    c = TrainConfig.from_toml_text("[network]\nlora_alpha = 8\n[training]\nlearning_rate = 1\n")
    assert c.network.lora_alpha == 8.0 and isinstance(c.network.lora_alpha, float)
    assert c.training.learning_rate == 1.0


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        TrainConfig.from_toml(tmp_path / "nope.toml")


# ---- overrides ------------------------------------------------------------------------------


def test_overrides_convert_types():
    c = TrainConfig().apply_overrides([
        "network.rank=8", "lora_alpha=16", "training.learning_rate=5e-4", "dataset.random_flip=yes",
        "validation.seeds=0,1,2", "validation.prompts=[\"zk, a cat\", \"zk, a dog\"]", "output.name=123",
        "network.target_modules=to_q, to_v", "dataset.trigger_word=zk stripes", "training.max_grad_norm=.5",
    ])
    assert c.network.rank == 8 and c.network.lora_alpha == 16.0
    assert c.training.learning_rate == 5e-4 and c.training.max_grad_norm == 0.5
    assert c.dataset.random_flip is True
    assert c.validation.seeds == [0, 1, 2] and c.validation.prompts == ["zk, a cat", "zk, a dog"]
    assert c.output.name == "123" and c.dataset.trigger_word == "zk stripes"
    assert c.network.target_modules == ["to_q", "to_v"]
    one = TrainConfig().apply_overrides(["validation.prompts=zk, a cat on a mat"])
    assert one.validation.prompts == ["zk, a cat on a mat"]  # prompts contain commas: one prompt
    preset = TrainConfig().apply_overrides(["network.target_modules=attention+conv"])
    assert preset.network.target_modules == "attention+conv"
    assert TrainConfig().apply_overrides([]) == TrainConfig()


def test_overrides_leave_the_original_alone():
    c = TrainConfig()
    c.apply_overrides(["network.rank=8", "validation.seeds=5"])
    assert c.network.rank == 4 and c.validation.seeds == [0, 1]


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("network.rank", "must look like section.option=value"),
        ("=3", "must look like section.option=value"),
        ("network.rnak=3", "did you mean network.rank?"),
        ("network_dim=3", "the studio calls it network.rank"),
        ("network.rank=eight", "network.rank must be a whole number, got 'eight'"),
        ("network.rank=8.5", "network.rank must be a whole number"),
        ("training.learning_rate=fast", "training.learning_rate must be a number, got 'fast'"),
        ("dataset.random_flip=maybe", "dataset.random_flip must be true or false, got 'maybe'"),
        ("validation.seeds=[a, b]", "validation.seeds must be a list such as [0, 1]"),
        ("validation.seeds=1,x", "validation.seeds[1] must be a whole number"),
        ("network.rank=0", "network.rank must be >= 1, got 0"),
        ("network.adapter_type=lorra", "did you mean 'lora'?"),
    ],
)
def test_override_errors(item, expected):
    with pytest.raises(ConfigError) as e:
        TrainConfig().apply_overrides([item])
    assert expected in str(e.value)


# ---- every check names its option -----------------------------------------------------------

CHECKS = [
    (ModelConfig, {"base_model": " "}, "model.base_model"),
    (DatasetConfig, {"caption_template": "{trigger}"}, "dataset.caption_template"),
    (DatasetConfig, {"caption_template": "{trigger}, {caption}, {style}"}, "dataset.caption_template"),
    (DatasetConfig, {"caption_template": "{caption"}, "dataset.caption_template"),
    (DatasetConfig, {"caption_extension": "txt"}, "dataset.caption_extension"),
    (DatasetConfig, {"caption_dropout_rate": 1.0}, "dataset.caption_dropout_rate"),
    (DatasetConfig, {"caption_dropout_rate": -0.1}, "dataset.caption_dropout_rate"),
    (DatasetConfig, {"keep_tokens": -1}, "dataset.keep_tokens"),
    (DatasetConfig, {"repeats": 0}, "dataset.repeats"),
    (DatasetConfig, {"resolution": -32}, "dataset.resolution"),
    (DatasetConfig, {"resolution": 4}, "dataset.resolution"),
    (DatasetConfig, {"bucket_reso_steps": 6}, "dataset.bucket_reso_steps"),
    (DatasetConfig, {"bucket_reso_steps": -8}, "dataset.bucket_reso_steps"),
    (DatasetConfig, {"bucket_reso_steps": 8, "resolution": 36}, "dataset.resolution"),
    (DatasetConfig, {"bucket_reso_steps": 8, "min_bucket_reso": 12}, "dataset.min_bucket_reso"),
    (DatasetConfig, {"bucket_reso_steps": 8, "max_bucket_reso": 100}, "dataset.max_bucket_reso"),
    (DatasetConfig, {"min_bucket_reso": -1}, "dataset.min_bucket_reso"),
    (DatasetConfig, {"max_bucket_reso": -1}, "dataset.max_bucket_reso"),
    (DatasetConfig, {"min_bucket_reso": 64, "max_bucket_reso": 32}, "dataset.min_bucket_reso"),
    (DatasetConfig, {"resolution": 32, "min_bucket_reso": 64}, "dataset.min_bucket_reso"),
    (DatasetConfig, {"resolution": 64, "max_bucket_reso": 32}, "dataset.max_bucket_reso"),
    (DatasetConfig, {"max_upscale": 0.5}, "dataset.max_upscale"),
    (DatasetConfig, {"max_upscale": float("nan")}, "dataset.max_upscale"),
    (NetworkConfig, {"adapter_type": "ia3"}, "network.adapter_type"),
    (NetworkConfig, {"rank": 0}, "network.rank"),
    (NetworkConfig, {"lora_alpha": 0.0}, "network.lora_alpha"),
    (NetworkConfig, {"lora_alpha": float("inf")}, "network.lora_alpha"),
    (NetworkConfig, {"dropout": 1.0}, "network.dropout"),
    (NetworkConfig, {"target_modules": "everything"}, "network.target_modules"),
    (NetworkConfig, {"target_modules": []}, "network.target_modules"),
    (NetworkConfig, {"target_modules": ["to_q", " "]}, "network.target_modules"),
    (NetworkConfig, {"text_encoder_lr": -1e-4}, "network.text_encoder_lr"),
    (TrainingConfig, {"optimizer": "sgd"}, "training.optimizer"),
    (TrainingConfig, {"learning_rate": 0.0}, "training.learning_rate"),
    (TrainingConfig, {"lr_scheduler": "polynomial"}, "training.lr_scheduler"),
    (TrainingConfig, {"lr_warmup_steps": -1}, "training.lr_warmup_steps"),
    (TrainingConfig, {"lr_warmup_steps": 500}, "training.lr_warmup_steps"),
    (TrainingConfig, {"max_train_steps": -1}, "training.max_train_steps"),
    (TrainingConfig, {"num_train_epochs": -1}, "training.num_train_epochs"),
    (TrainingConfig, {"num_train_epochs": 3}, "training.max_train_steps"),
    (TrainingConfig, {"max_train_steps": 0}, "training.max_train_steps"),
    (TrainingConfig, {"train_batch_size": 0}, "training.train_batch_size"),
    (TrainingConfig, {"gradient_accumulation_steps": 0}, "training.gradient_accumulation_steps"),
    (TrainingConfig, {"max_grad_norm": -1.0}, "training.max_grad_norm"),
    (TrainingConfig, {"mixed_precision": "fp8"}, "training.mixed_precision"),
    (TrainingConfig, {"min_snr_gamma": -5.0}, "training.min_snr_gamma"),
    (TrainingConfig, {"noise_offset": 2.0}, "training.noise_offset"),
    (TrainingConfig, {"prediction_type": "sample"}, "training.prediction_type"),
    (TrainingConfig, {"seed": -1}, "training.seed"),
    (TrainingConfig, {"seed": 2**32}, "training.seed"),
    (TrainingConfig, {"adam_beta1": 1.0}, "training.adam_beta1"),
    (TrainingConfig, {"adam_beta2": -0.1}, "training.adam_beta2"),
    (TrainingConfig, {"adam_weight_decay": -0.01}, "training.adam_weight_decay"),
    (TrainingConfig, {"adam_epsilon": 0.0}, "training.adam_epsilon"),
    (ValidationConfig, {"prompts": ["ok", ""]}, "validation.prompts"),
    (ValidationConfig, {"prompts": ["ok"], "seeds": []}, "validation.seeds"),
    (ValidationConfig, {"seeds": [-1]}, "validation.seeds"),
    (ValidationConfig, {"every_n_steps": -1}, "validation.every_n_steps"),
    (ValidationConfig, {"held_out_count": -1}, "validation.held_out_count"),
    (ValidationConfig, {"held_out_fraction": 1.0}, "validation.held_out_fraction"),
    (ValidationConfig, {"held_out_count": 2, "held_out_fraction": 0.1}, "validation.held_out_count"),
    (OutputConfig, {"name": "my/style"}, "output.name"),
    (OutputConfig, {"name": ".hidden"}, "output.name"),
    (OutputConfig, {"checkpointing_steps": -1}, "output.checkpointing_steps"),
    (OutputConfig, {"checkpoints_total_limit": -1}, "output.checkpoints_total_limit"),
]


@pytest.mark.parametrize(("cls", "kwargs", "option"), CHECKS, ids=[f"{o}-{i}" for i, (_, _, o) in enumerate(CHECKS)])
def test_each_check_names_its_option(cls, kwargs, option):
    with pytest.raises(ConfigError) as e:
        cls(**kwargs)
    assert e.value.option == option
    assert str(e.value).startswith(option), str(e.value)


def test_every_section_default_is_valid_and_documented():
    c = TrainConfig()
    for name, cls in SECTIONS.items():
        assert isinstance(getattr(c, name), cls)
        for f in fields(cls):
            assert TrainConfig.help(f"{name}.{f.name}") == f.metadata["help"]
    assert TrainConfig.help("rank") == TrainConfig.help("network.rank")


# ---- resolving "the base model's own" values ---------------------------------------------------


def test_resolved_fills_base_model_values_for_tiny(tmp_path, studio_home):
    c = TrainConfig(dataset=DatasetConfig(path=str(tmp_path / "My Set!")), training=TrainingConfig(learning_rate=2e-4))
    r = c.resolved()
    d = r.dataset
    # tiny: UNet sample_size 8 x VAE factor 4 = 32 px; SD-1's 8 px latent grid; kohya's half/double bounds.
    assert (d.resolution, d.bucket_reso_steps, d.min_bucket_reso, d.max_bucket_reso) == (32, 8, 16, 64)
    assert r.training.prediction_type == "epsilon"
    assert r.network.text_encoder_lr == 2e-4
    assert r.output.name == "My-Set" and r.output.dir == str(studio_home / "runs")
    assert r.resolved() == r  # resolving twice changes nothing
    assert TrainConfig.from_toml_text(r.to_toml()) == r


def test_resolved_keeps_explicit_values_and_accepts_facts(tmp_path):
    d = DatasetConfig(path=str(tmp_path), resolution=512, bucket_reso_steps=64, min_bucket_reso=320)
    c = TrainConfig(dataset=d, training=TrainingConfig(prediction_type="v_prediction"),
                    output=OutputConfig(name="x", dir=str(tmp_path)))
    r = c.resolved(native_resolution=1024, latent_granularity=8, prediction_type="epsilon")
    assert (r.dataset.resolution, r.dataset.bucket_reso_steps, r.dataset.min_bucket_reso,
            r.dataset.max_bucket_reso) == (512, 64, 320, 1024)
    assert r.training.prediction_type == "v_prediction" and r.output.name == "x"
    r2 = replace(c, dataset=replace(d, resolution=0, bucket_reso_steps=0, min_bucket_reso=0)).resolved(
        native_resolution=1024, latent_granularity=16, prediction_type="epsilon")
    assert (r2.dataset.resolution, r2.dataset.bucket_reso_steps, r2.dataset.min_bucket_reso,
            r2.dataset.max_bucket_reso) == (1024, 16, 512, 2048)


def test_resolved_needs_a_dataset_path():
    with pytest.raises(ConfigError, match="dataset.path is not set") as e:
        TrainConfig().resolved()
    assert e.value.option == "dataset.path"
