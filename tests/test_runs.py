"""A run's checkpoints as candidates: snapshots and losses (`runs list|show`), registering one (`runs register`),
and the checkpoint x strength grid (`grid --x checkpoint=RUN`), on the embedded tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio.app.cli import main
from trainer.config import TrainConfig
from trainer.events import read_events
from trainer.loop import list_checkpoints, train

ROOT = Path(__file__).resolve().parents[1]
OUTLINED_TXT = ROOT / "datasets" / "outlined_txt" / "train.toml"  # 20 images, 2 held out for a validation loss
PROMPT = "a red circle on a blue background, zkoutline"


def _use_home(home: Path, env) -> None:
    from studio.core.settings import reload_settings

    env.setenv("LORA_STUDIO_HOME", str(home))
    env.delenv("LORA_STUDIO_REGISTRY_URL", raising=False)
    env.setenv("HF_HUB_OFFLINE", "1")
    reload_settings()


@pytest.fixture(scope="module")
def module_home(tmp_path_factory):
    """One studio home for this module's tests: they read and register from one training run."""
    home = tmp_path_factory.mktemp("runs-home")
    with pytest.MonkeyPatch.context() as env:
        _use_home(home, env)
        yield home
    from studio.core.settings import reload_settings

    reload_settings()


@pytest.fixture
def studio_home(module_home, monkeypatch):
    """Replaces the suite's empty home per test (conftest.py): here every test shares the module's."""
    _use_home(module_home, monkeypatch)
    yield module_home


@pytest.fixture(scope="module")
def trained(module_home) -> Path:
    """A 6-step run checkpointing every 2 steps and keeping 1 full state; validation only where it checkpoints
    (every_n_steps = 0) and at the end. Registers outlined-run@1 (the final adapter)."""
    config = TrainConfig.from_toml(OUTLINED_TXT).apply_overrides([
        f"output.dir={module_home / 'runs'}", "output.name=outlined-run", "training.max_train_steps=6",
        "training.lr_warmup_steps=0", "output.checkpointing_steps=2", "output.checkpoints_total_limit=1",
        "validation.every_n_steps=0", f"validation.prompts=[\"{PROMPT}\"]", "validation.seeds=[0]"])
    result = train(config, console=False)
    assert result.status == "done" and result.ref == "outlined-run@1"
    return Path(result.run_dir)


@pytest.fixture
def run(trained, studio_home) -> Path:
    return trained


def _json(capsys, argv) -> object:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_every_checkpoint_is_listed_with_its_losses_and_any_one_registers(run, reg, capsys, tmp_path):
    # The full states rotate (1 kept) but every checkpoint step keeps its adapter and is validated.
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-000004"]
    validated = [e["step"] for e in read_events(run) if e["event"] == "validation"]
    assert validated == [2, 4, 6]

    shown = _json(capsys, ["runs", "show", run.name])
    steps = [c["step"] for c in shown["checkpoints"]]
    assert steps == [2, 4, 6] and shown["name"] == "outlined-run" and shown["state"] == "done"
    assert all(isinstance(c["val_loss"], float) for c in shown["checkpoints"])
    assert all(c["samples"] and Path(c["samples"][0]).is_file() for c in shown["checkpoints"])
    final = shown["checkpoints"][-1]
    assert final["final"] and final["ref"] == "outlined-run@1"
    best = min(shown["checkpoints"], key=lambda c: c["val_loss"])
    assert shown["best_step"] == best["step"] and [c["best"] for c in shown["checkpoints"]].count(True) == 1
    # the losses are the run's own: the training loss of that step, the validation loss of that step
    events = read_events(run)
    step_loss = {e["step"]: e["loss"] for e in events if e["event"] == "step"}
    val_loss = {e["step"]: e["val_loss"] for e in events if e["event"] == "validation"}
    for c in shown["checkpoints"]:
        assert c["loss"] == pytest.approx(step_loss[c["step"]]) and c["val_loss"] == pytest.approx(val_loss[c["step"]])

    listed = _json(capsys, ["runs", "list"])
    assert [r["run"] for r in listed] == [run.name] and listed[0]["best_step"] == shown["best_step"]
    assert main(["runs", "show", run.name]) == 0
    table = capsys.readouterr().out
    assert "best" in table and "outlined-run@1" in table

    # register step 2: a version whose images differ from the final version's, recorded with its step
    made = _json(capsys, ["runs", "register", run.name, "--step", "2"])
    assert made == {"ref": "outlined-run@2", "created": True, "step": 2}
    version = reg.get("outlined-run@2")
    assert version.source["step"] == 2 and version.source["run"] == run.name
    assert version.metrics["val_loss"] == pytest.approx(shown["checkpoints"][0]["val_loss"])
    assert version.trigger_words == ("zkoutline",) and len(version.samples) == 1
    assert version.training_config["output"]["name"] == "outlined-run"
    images = {}
    for ref in ("outlined-run@1", "outlined-run@2", shown["checkpoints"][0]["path"]):
        out = tmp_path / ref.replace("/", "_").replace("@", "-")
        assert main(["generate", PROMPT, "--adapter", ref, "--seed", "3", "--steps", "6", "--out", str(out)]) == 0
        images[ref] = _pixels(next(out.glob("*.png")))
    assert np.abs(images["outlined-run@2"] - images["outlined-run@1"]).max() > 0
    # the version is that checkpoint's adapter at its own strength: the same image as the snapshot file
    assert np.array_equal(images["outlined-run@2"], images[shown["checkpoints"][0]["path"]])
    # again: the same tensors are that version already; under another name they start a new adapter
    assert _json(capsys, ["runs", "register", run.name, "--step", "2"])["created"] is False
    assert _json(capsys, ["runs", "register", run.name, "--step", "4", "--name", "outlined-s4"])["ref"] == \
        "outlined-s4@1"
    # A trainer resumed after it had registered (its machine died before result.json) finds its version
    # by the run and its final step, not by tensors (which another GPU's resume rounds differently);
    # versions registered from a checkpoint (outlined-run@2, step 2) are not the run's final one.
    from trainer.loop import registered_by_run

    assert registered_by_run(reg, "outlined-run", run, 6) == "outlined-run@1"
    assert registered_by_run(reg, "outlined-run", run, 2) is None
    assert registered_by_run(reg, "outlined-run", tmp_path, 6) is None
    assert registered_by_run(reg, "never-trained", run, 6) is None


def test_checkpoint_by_strength_grid(run, capsys, tmp_path):
    out = tmp_path / "grid"
    drawn = _json(capsys, ["grid", PROMPT, "--x", f"checkpoint={run.name}:2,final", "--y", "strength=0.5,1",
                           "--seed", "1", "--steps", "4", "--out", str(out)])
    assert drawn["x_labels"][0] == "step 2" and drawn["x_labels"][1].startswith("step 6 (final)")
    assert drawn["y_title"] == "strength of adapter 1" and drawn["y_labels"] == ["0.5", "1"]
    cells = [[_pixels(p) for p in row] for row in drawn["image_paths"]]
    assert np.abs(cells[1][0] - cells[1][1]).max() > 0  # checkpoints differ at strength 1
    assert np.abs(cells[0][1] - cells[1][1]).max() > 0  # strengths differ for one checkpoint
    assert Path(drawn["grid_path"]).is_file()
    # every candidate when no steps are named
    every = _json(capsys, ["grid", PROMPT, "--x", f"checkpoint={run.name}", "--seed", "1", "--steps", "2",
                           "--out", str(tmp_path / "all")])
    assert len(every["x_labels"]) == 3 and sum("best" in label for label in every["x_labels"]) == 1


def test_bad_run_and_step_are_messages(run, capsys):
    capsys.readouterr()
    assert main(["runs", "register", run.name, "--step", "3"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at step 3" in err and "2, 4, 6 (final)" in err
    assert main(["runs", "show", "no-such-run"]) == 2
    assert "no run 'no-such-run'" in capsys.readouterr().err
    assert main(["grid", PROMPT, "--x", f"checkpoint={run.name}:2,soon", "--out", "x"]) == 2
    assert "'soon' must be a whole number or 'final'" in capsys.readouterr().err


def _run_view(run_dir: str) -> None:
    from studio.app.ui.run_view import checkpoints_section

    checkpoints_section(run_dir)


def test_the_run_view_marks_the_best_registers_one_and_draws_the_grid(run, reg):
    from streamlit.testing.v1 import AppTest

    from studio.generation.grid import GRID_KEY

    at = AppTest.from_function(_run_view, args=(str(run),), default_timeout=180).run()
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["step"]) == [2, 4, 6] and list(table["kind"])[-1] == "final"
    assert list(table["registered"])[-1] == "outlined-run@1"
    best_step = int(table["step"][table["validation loss"].idxmin()])
    assert list(table["best"]).count("★ lowest validation loss") == 1
    assert table["best"][table["validation loss"].idxmin()] == "★ lowest validation loss"
    assert at.selectbox(key=f"ck-step-{run.name}").value == best_step  # the best is the one offered first
    assert "tensorboard --logdir" in at.caption[0].value

    at.selectbox(key=f"ck-step-{run.name}").set_value(2)
    at.text_input(key=f"ck-name-{run.name}").set_value("outlined-pick")
    at.button(key=f"ck-register-{run.name}").click().run()
    assert not at.exception and at.success[0].value == "registered outlined-pick@1 from step 2"
    assert reg.get("outlined-pick@1").source["step"] == 2

    at.text_input(key=f"ck-strengths-{run.name}").set_value("0.5, one").run()
    at.button(key=f"ck-grid-{run.name}").click().run()
    assert "must be numbers separated by commas" in at.error[0].value
    at.text_input(key=f"ck-strengths-{run.name}").set_value("0.5, 1").run()
    at.button(key=f"ck-grid-{run.name}").click().run()
    assert not at.exception and not at.error
    grid = Path(at.session_state[f"ck-grid-path-{run.name}"])
    assert grid.name == f"{run.name}-checkpoints-grid.png" and at.get("image")  # drawn on the page
    info = json.loads(Image.open(grid).text[GRID_KEY])
    assert info["x"]["kind"] == "checkpoint" and len(info["cells"]) == 2 and len(info["cells"][0]) == 3
    assert info["x"]["labels"][0] == "step 2" and info["y"]["values"] == [0.5, 1.0]
