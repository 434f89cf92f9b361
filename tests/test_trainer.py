"""The training loop on the embedded tiny model, CPU: outputs, metadata, registry, resume, stop, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from studio.core.errors import CheckpointError, NoUsableImagesError, TrainingDivergedError
from trainer.config import TrainConfig
from trainer.events import read_events, run_state
from trainer.loop import list_checkpoints, train

ROOT = Path(__file__).resolve().parents[1]
OUTLINED_TXT = ROOT / "datasets" / "outlined_txt" / "train.toml"  # 20 images, folder layout, 2 held out


def _config(tmp_path, *overrides, toml=OUTLINED_TXT) -> TrainConfig:
    base = [f"output.dir={tmp_path / 'runs'}", "validation.every_n_steps=0", "output.checkpointing_steps=0",
            "training.lr_warmup_steps=0", "training.max_train_steps=4", "validation.prompts=[]"]
    return TrainConfig.from_toml(toml).apply_overrides(base + list(overrides))


def _env(home: Path) -> dict:
    return {**os.environ, "LORA_STUDIO_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT)}


def test_run_writes_adapter_metadata_samples_and_registers(tmp_path, reg):
    cfg = _config(tmp_path, "training.max_train_steps=6", "validation.every_n_steps=3",
                  "validation.prompts=[\"zkoutline, a red circle on a blue background\"]", "validation.seeds=[0]",
                  "output.checkpointing_steps=2", "output.checkpoints_total_limit=2", "output.name=outline-test")
    result = train(cfg, console=False)
    assert result.status == "done" and result.steps == 6 and result.ref == "outline-test@1"
    run = Path(result.run_dir)
    # the exact effective config is kept, resolved (no "base model's own" zeros left)
    saved = TrainConfig.from_toml(run / "config.toml")
    assert saved.dataset.resolution == 32 and saved.output.name == "outline-test"
    # rotation: checkpoints at 2 and 4, limit 2 (the end is not a checkpoint: the adapter is)
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-000002", "checkpoint-000004"]
    events = read_events(run)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("step") == 6
    # step 3 (every_n_steps), the checkpoint steps 2 and 4 (each checkpoint is a validated candidate), the end
    assert [e["step"] for e in events if e["event"] == "validation"] == [2, 3, 4, 6]
    assert [e["step"] for e in events if e["event"] == "snapshot"] == [2, 4]
    state = run_state(run)
    assert state.state == "done" and state.step == 6 and len(state.losses) == 6 and len(state.val_losses) == 4
    assert all(Path(p).is_file() for _, paths in state.samples for p in paths)
    # TensorBoard: loss, learning rate, validation loss and the sample images, at their steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run / "lora_studio"), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert [e.step for e in board.Scalars("loss")] == [1, 2, 3, 4, 5, 6] and board.Scalars("lr")
    assert [e.step for e in board.Scalars("val_loss")] == [2, 3, 4, 6]
    assert [(e.step, e.width, e.height) for e in board.Images("samples/0")] == [(s, 32, 32) for s in (2, 3, 4, 6)]

    with safe_open(result.adapter, "pt") as f:
        md = f.metadata()
        keys = list(f.keys())
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert md["modelspec.trigger_phrase"] == "zkoutline"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["ss_network_dim"] == "8" and md["ss_network_alpha"] == "8.0" and md["ss_steps"] == "6"
    assert json.loads(md["ss_tag_frequency"])  # kohya's {folder: {tag: count}}, trigger included
    assert "zkoutline" in next(iter(json.loads(md["ss_tag_frequency"]).values()))
    adapter_md = json.loads(md["lora_adapter_metadata"])
    assert adapter_md["unet.r"] == 8 and adapter_md["unet.lora_alpha"] == 8
    ours = json.loads(md["lora_studio.training"])
    assert ours["config"]["network"]["rank"] == 8 and ours["dataset_fingerprint"] and ours["base_model"] == "tiny"
    assert ours["metrics"]["steps"] == 6

    version = reg.get("outline-test")
    assert version.origin == "trained" and version.trigger_words == ("zkoutline",)
    assert version.training_config["network"]["rank"] == 8
    assert version.dataset_fingerprint == ours["dataset_fingerprint"]
    assert version.metrics["val_loss"] == pytest.approx(result.val_loss)
    assert len(version.samples) == 1 and version.samples[0].recipe["adapters"][0]["ref"] == "outline-test"


def test_preview_matches_real_inference(tmp_path, reg):
    """The last validation sample equals what the studio generates with the registered adapter."""
    from adapters.compose import engine_for
    from studio.core.base_models import load_pipeline
    from studio.generation.recipes import read_recipe
    from studio.generation.requests import GenerationRequest
    from studio.generation.run import generate

    prompt = "zkoutline, a red circle on a blue background"
    cfg = _config(tmp_path, "training.max_train_steps=5", "training.learning_rate=5e-3",
                  f"validation.prompts=[\"{prompt}\"]", "validation.seeds=[3]", "output.name=preview")
    result = train(cfg, console=False)
    sample = Path(result.run_dir) / result.samples[0]
    recipe = read_recipe(sample)
    try:
        served = generate(GenerationRequest(**{**recipe.to_dict(), "adapters": [{"ref": result.ref, "weight": 1.0}]}))
        base = generate(recipe)
    finally:
        engine_for(load_pipeline("tiny")).unload_all()
    preview = np.asarray(Image.open(sample)).astype(int)
    with_adapter = np.asarray(served.images[0]).astype(int)
    without = np.asarray(base.images[0]).astype(int)
    # Identical math on other module objects: at most rounding differences in a few pixels.
    assert np.abs(preview - with_adapter).max() <= 2
    assert np.abs(preview - without).max() > 10  # and the adapter did change the image


def test_stop_and_resume_equals_uninterrupted(tmp_path):
    overrides = ("training.max_train_steps=7", "training.gradient_accumulation_steps=2", "training.train_batch_size=3",
                 "training.lr_scheduler=cosine", "training.lr_warmup_steps=2", "network.dropout=0.1",
                 "training.min_snr_gamma=5", "training.noise_offset=0.05")
    straight = train(_config(tmp_path, *overrides, "output.name=straight"), register=False, console=False)
    cfg = _config(tmp_path, *overrides, "output.name=resumed", "output.checkpointing_steps=2")
    stopped = train(cfg, register=False, console=False, stop_at_step=5)
    assert stopped.status == "stopped" and stopped.steps == 5 and stopped.adapter is None
    assert run_state(stopped.run_dir).state == "stopped"
    resumed = train(cfg, resume="latest", register=False, console=False)
    assert resumed.status == "done" and resumed.steps == 7 and resumed.run_dir == stopped.run_dir
    a, b = load_file(straight.adapter), load_file(resumed.adapter)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run left the uninterrupted trajectory"
    assert resumed.final_loss == straight.final_loss
    starts = [e for e in read_events(resumed.run_dir) if e["event"] == "start"]
    assert [e["step"] for e in starts] == [0, 5]


def test_resume_refuses_other_settings_and_missing_checkpoints(tmp_path):
    cfg = _config(tmp_path, "output.name=r")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(cfg, resume="latest", register=False, console=False)
    stopped = train(cfg, register=False, console=False, stop_at_step=1)
    with pytest.raises(CheckpointError, match="network.rank"):
        train(cfg.apply_overrides(["network.rank=4"]), resume=stopped.run_dir, register=False, console=False)
    # a checkpoint cut short by a crash (temporary folder) is never picked
    ckpt = list_checkpoints(stopped.run_dir)[-1]
    (ckpt.parent / ".tmp-checkpoint-000009-dead").mkdir()
    assert list_checkpoints(stopped.run_dir) == [ckpt]


def test_sigterm_saves_checkpoint_and_resume_matches(tmp_path):
    home = tmp_path / "home"
    run_dir = tmp_path / "run"
    overrides = ["--set", f"output.dir={tmp_path}", "--set", "validation.every_n_steps=0", "--set",
                 "output.checkpointing_steps=0", "--set", "training.max_train_steps=20", "--set",
                 "training.lr_warmup_steps=5", "--set",
                 "validation.prompts=[]", "--set", "training.train_batch_size=2"]
    cmd = [sys.executable, "-m", "trainer", str(OUTLINED_TXT), *overrides, "--no-register", "--json"]
    proc = subprocess.Popen([*cmd, "--run-dir", str(run_dir)], cwd=tmp_path, env=_env(home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and run_state(run_dir).step < 3 and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["status"] == "stopped" and summary["stopped_by"] == "SIGTERM" and 3 <= summary["steps"] < 20
    assert list_checkpoints(run_dir)
    done = subprocess.run([sys.executable, "-m", "trainer", "--resume", "latest", "--run-dir", str(run_dir),
                           "--no-register", "--json"], cwd=tmp_path, env=_env(home), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = json.loads(done.stdout.strip().splitlines()[-1])
    straight = subprocess.run([*cmd, "--run-dir", str(tmp_path / "straight")], cwd=tmp_path, env=_env(home),
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    a = load_file(json.loads(straight.stdout.strip().splitlines()[-1])["adapter"])
    b = load_file(resumed["adapter"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    cfg = _config(tmp_path, "training.max_train_steps=30", "training.learning_rate=1e30", "training.max_grad_norm=0",
                  "output.checkpointing_steps=1", "output.checkpoints_total_limit=0", "output.name=nan")
    with pytest.raises(TrainingDivergedError, match="diverged") as info:
        train(cfg, register=False, console=False)
    assert "checkpoint-" in str(info.value)  # names the last good checkpoint
    runs = list(Path(cfg.resolved().output.dir).glob("nan-*"))
    assert len(runs) == 1
    state = run_state(runs[0])
    assert state.state == "failed" and "diverged" in state.message
    assert list_checkpoints(runs[0])  # the good checkpoints stay


def test_bad_dataset_fails_before_loading_a_model(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    cfg = _config(tmp_path, f"dataset.path={empty}")
    import studio.core.base_models

    def boom(*a, **k):
        raise AssertionError("a model was loaded for a dataset without usable images")

    monkeypatch.setattr(studio.core.base_models, "load_fresh_pipeline", boom)
    with pytest.raises(NoUsableImagesError, match="broken.png"):
        train(cfg, register=False, console=False)


def test_cli_bad_dataset_exit_2_and_run_dir_says_why(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "trainer", str(OUTLINED_TXT), "--set", f"dataset.path={empty}",
                           "--run-dir", str(run_dir), "--json"], cwd=tmp_path, env=_env(tmp_path / "home"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no usable image" in proc.stderr and "Traceback" not in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["status"] == "failed"
    assert run_state(run_dir).state == "failed" and "no usable image" in run_state(run_dir).message


def test_cli_unknown_option_is_named(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "trainer", str(OUTLINED_TXT), "--set", "network.rnak=4"],
                          cwd=tmp_path, env=_env(tmp_path / "home"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "rnak" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("method,te", [("dora", True), ("loha", False), ("lokr", False), ("lora", True)])
def test_methods_train_save_and_load_exactly(tmp_path, reg, method, te):
    """Every method's saved file reloads into the studio's generation path as it was trained."""
    from adapters.compose import engine_for
    from studio.core.base_models import load_pipeline
    from studio.generation.recipes import read_recipe
    from studio.generation.requests import GenerationRequest
    from studio.generation.run import generate

    prompt = "zkoutline, a yellow square on a green background"
    cfg = _config(tmp_path, f"network.adapter_type={method}", f"network.train_text_encoder={str(te).lower()}",
                  "network.rank=4", "network.lora_alpha=8", "training.max_train_steps=3",
                  "training.learning_rate=1e-2", "network.target_modules=attention+conv",
                  f"validation.prompts=[\"{prompt}\"]", "validation.seeds=[1]", f"output.name=m-{method}")
    result = train(cfg, console=False)
    version = reg.get(result.ref)
    assert version.adapter_type == method and version.alpha == 8.0
    assert set(version.components) == ({"unet", "text_encoder"} if te else {"unet"})
    recipe = read_recipe(Path(result.run_dir) / result.samples[0])
    try:
        served = generate(GenerationRequest(**{**recipe.to_dict(), "adapters": [{"ref": result.ref, "weight": 1.0}]}))
    finally:
        engine_for(load_pipeline("tiny")).unload_all()
    preview = np.asarray(Image.open(Path(result.run_dir) / result.samples[0])).astype(int)
    assert np.abs(preview - np.asarray(served.images[0]).astype(int)).max() <= 2


def test_latent_and_text_caches_are_reused_across_runs(tmp_path):
    first = train(_config(tmp_path, "output.name=c1", "dataset.random_flip=false", "dataset.caption_dropout_rate=0"),
                  register=False, console=False)
    second = train(_config(tmp_path, "output.name=c2", "dataset.random_flip=false", "dataset.caption_dropout_rate=0"),
                   register=False, console=False)
    done1 = read_events(first.run_dir)[-1]["caches"]
    done2 = read_events(second.run_dir)[-1]["caches"]
    assert done1["latents"]["misses"] > 0
    assert done2["latents"]["misses"] == 0 and done2["latents"]["hits"] > 0
    assert done2["text"]["misses"] == 0
    # the cached path trains exactly as the first run did
    a, b = load_file(first.adapter), load_file(second.adapter)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_v_prediction_min_snr_checkpointing_and_8bit_optimizer(tmp_path):
    result = train(_config(tmp_path, "training.prediction_type=v_prediction", "training.min_snr_gamma=5",
                           "training.gradient_checkpointing=true", "output.name=v"), register=False, console=False)
    assert result.status == "done" and np.isfinite(result.final_loss)
    with safe_open(result.adapter, "pt") as f:
        assert f.metadata()["ss_v_parameterization"] == "True"
    pytest.importorskip("bitsandbytes")
    result = train(_config(tmp_path, "training.optimizer=adamw8bit", "output.name=b"), register=False, console=False)
    assert result.status == "done" and np.isfinite(result.final_loss)


def test_two_processes_with_accelerate_launch(tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 on CPU (gloo): one adapter, registered once."""
    home = tmp_path / "home"
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "trainer", str(OUTLINED_TXT), "--set", "training.max_train_steps=4", "--set",
           "training.lr_warmup_steps=0", "--set",
           "validation.every_n_steps=0", "--set", "output.checkpointing_steps=2", "--set", "validation.prompts=[]",
           "--set", "output.name=ddp", "--run-dir", str(run_dir), "--json"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(home), capture_output=True, text=True, timeout=600)
    result = json.loads((run_dir / "result.json").read_text())  # the completion marker, not the exit code
    assert result["status"] == "done", proc.stderr[-3000:]
    assert result["ref"] == "ddp@1" and result["steps"] == 4
    start = read_events(run_dir)[0]
    assert start["num_processes"] == 2
    assert sum(1 for e in read_events(run_dir) if e["event"] == "step") == 4  # only the main process writes
    from adapters.registry import Registry

    with Registry(home=home) as registry:
        assert [v.number for v in registry.versions("ddp")] == [1]


def _style_scores(tmp_path, reg, base: str, *extra: str, base_limit: float = 0.02,
                  names=("striped", "outlined")) -> dict[str, dict]:
    """Train the shipped configs of ``names`` (default both styles) on ``base`` (``extra`` overrides) and
    score the styles of ``names`` with each adapter; the base model alone must score under ``base_limit``."""
    from adapters.compose import engine_for
    from studio.app.tiny.style import measure_style
    from studio.core.base_models import load_pipeline

    scores: dict[str, dict] = {}
    base_scores: dict[str, float] = {}
    for name in names:
        toml = ROOT / "datasets" / name / "train.toml"
        cfg = TrainConfig.from_toml(toml).apply_overrides(
            [f"output.dir={tmp_path / 'runs'}", "validation.prompts=[]", "output.checkpointing_steps=0",
             f"model.base_model={base}", f"output.name={name}-{base}", *extra])
        result = train(cfg, console=False)
        stack = [{"ref": result.ref, "weight": 1.0}]
        trigger = reg.get(result.ref).trigger_words[0]
        try:
            scores[name] = {}
            for style in names:
                # the base side is the same prompts with the same trigger text for both adapters
                key = f"{style}:{trigger}"
                scores[name][style] = measure_style(style, stack, trigger=trigger, base=base,
                                                    base_score=base_scores.get(key))
                base_scores[key] = scores[name][style]["base"]
        finally:
            engine_for(load_pipeline(base)).unload_all()
    for name in scores:
        for style, s in scores[name].items():
            assert s["base"] < base_limit, (name, style, s)  # the base model draws neither style
    return scores


def test_a_short_outlined_run_already_draws_outlines(tmp_path, reg):
    """The faster sibling of the test below (which trains both shipped configs, 500 steps each: ~7 minutes
    here): the outlined config for 60 of its steps already moves the outline score well off the base's."""
    scores = _style_scores(tmp_path, reg, "tiny", "training.max_train_steps=60", names=("outlined",))
    # seen: 0.00 -> 0.136 (margin 0.134) at 60 steps, 0.19 at 150, 0.47 at 500
    assert scores["outlined"]["outlined"]["margin"] > 0.06, scores


@pytest.mark.slow
def test_sample_dataset_loras_show_their_styles(tmp_path, reg):
    """The shipped train.toml of each sample style trains an adapter that draws that style.

    Scored by studio.app.tiny.style on the same prompts and seeds with and without the adapter (trigger
    word in both). Validation samples are left out to save time; everything else is the shipped
    config. Figures seen: stripes 0.00 -> 0.15, outlines 0.00 -> 0.47 (training images 0.59, 0.83).
    """
    scores = _style_scores(tmp_path, reg, "tiny")
    assert scores["striped"]["striped"]["margin"] > 0.08, scores
    assert scores["outlined"]["outlined"]["margin"] > 0.25, scores
    # each adapter draws its own style more than the other adapter does
    assert scores["striped"]["striped"]["adapter"] > scores["outlined"]["striped"]["adapter"] + 0.02, scores
    assert scores["outlined"]["outlined"]["adapter"] > scores["striped"]["outlined"]["adapter"] + 0.1, scores


@pytest.mark.slow
@pytest.mark.parametrize("base, extra, base_limit", [
    ("tiny-sdxl", (), 0.02),
    # tiny-flux's own images score 0.034 as "outlined" (its soft, rounded shapes have dark rims)
    ("tiny-flux", ("network.target_modules=all-linear",), 0.05),
    ("tiny-sd3", ("network.target_modules=all-linear",), 0.05),
])
def test_sample_dataset_loras_show_their_styles_on_other_families(tmp_path, reg, base, extra, base_limit):
    """The same shipped configs, the base model switched to tiny-sdxl, tiny-flux or tiny-sd3 (whose
    transformers have no convolutions: every linear layer of its blocks instead): each adapter draws its own style."""
    scores = _style_scores(tmp_path, reg, base, *extra, base_limit=base_limit)
    print(json.dumps(scores, indent=1))
    for style in ("striped", "outlined"):
        assert scores[style][style]["margin"] > 0.08, scores
        other = "outlined" if style == "striped" else "striped"
        assert scores[style][style]["adapter"] > scores[other][style]["adapter"] + 0.02, scores
