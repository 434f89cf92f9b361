"""The Train page through AppTest: essentials first (at most 12 inputs before Advanced), presets fill the
form generated from TrainConfig, every option is reachable with its name shown, a newcomer's quick run
trains and registers, bad input is a message and queues nothing; cancel and resume; with the registry on
PostgreSQL, the team's queue beside this machine's."""

from __future__ import annotations

import time
from dataclasses import fields
from pathlib import Path

from streamlit.testing.v1 import AppTest
from streamlit.testing.v1.element_tree import Block, Expander

from studio.app import jobs
from studio.app.train_presets import NO_HISTORY, OWN
from trainer.config import SECTIONS, TOPICS, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
PAGE = str(ROOT / "studio" / "app" / "ui" / "train_page.py")
STRIPED = str(ROOT / "datasets" / "striped")
INPUTS = ("text_input", "number_input", "selectbox", "multiselect", "radio", "slider", "select_slider", "checkbox",
          "toggle", "text_area", "date_input", "time_input", "color_picker", "file_uploader")
ADVANCED = "Advanced"
ESSENTIAL_WIDGETS = {"dataset.path": "train_dataset", "model.base_model": "train_base",
                     "training.max_train_steps": "train_length", "training.num_train_epochs": "train_length"}


def _page(dataset: str = STRIPED, preset: str = "quick") -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    at.selectbox(key="train_dataset").set_value(dataset).run()
    at.radio(key="train_preset").set_value(preset).run()
    assert not at.exception, at.exception
    return at


def _start(at: AppTest) -> AppTest:
    next(b for b in at.button if b.label == "Start training").click().run()
    assert not at.exception, at.exception
    return at


def _inputs(node, inside_advanced: bool = False) -> list[tuple[object, bool]]:
    """Every input widget under ``node`` with whether it lies inside the Advanced expander."""
    out = []
    for child in getattr(node, "children", {}).values():
        if isinstance(child, Expander):
            out += _inputs(child, inside_advanced or child.label.startswith(ADVANCED))
        elif isinstance(child, Block):
            out += _inputs(child, inside_advanced)
        elif child.type in INPUTS:
            out.append((child, inside_advanced))
    return out


def _until(at: AppTest, predicate, timeout_s=240) -> AppTest:
    # AppTest does not fire st.fragment(run_every=...) timers: rerun the page as the browser would poll it.
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        at.run()
        assert not at.exception, at.exception
        if predicate(at):
            return at
        time.sleep(1.0)
    raise AssertionError("timed out: " + " | ".join(m.value for m in at.markdown + at.subheader))


def test_essentials_come_first_with_at_most_twelve_inputs_before_advanced():
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    assert not at.exception
    widgets = _inputs(at.main)
    outside = [w for w, inside in widgets if not inside]
    assert 5 <= len(outside) <= 12, [w.label for w in outside]
    assert len(widgets) - len(outside) > 40  # the rest of TrainConfig waits under Advanced
    # Plain words above Advanced: no option names in the labels, units where a number has one.
    labels = [w.label for w in outside]
    assert not any("`" in label or "_" in label for label in labels), labels
    for label in ("Dataset", "Base model", "Trigger word", "Preset", "Length", "Rank (adapter size)",
                  "Learning rate", "Adapter name"):
        assert label in labels, labels
    datasets = at.selectbox(key="train_dataset")
    assert "sample: striped" in datasets.options
    assert "tiny" in at.selectbox(key="train_base").value
    at.selectbox(key="train_dataset").set_value(STRIPED).run()
    count = len(list(Path(STRIPED).rglob("*.png")))
    assert any(c.value.startswith(f"{count} images") for c in at.caption), [c.value for c in at.caption]
    assert len(at.get("image")[0].proto.imgs) == 8  # the thumbnail strip
    # The presets show their time here; with no earlier run the page says so instead of guessing.
    preset = at.radio(key="train_preset")
    assert preset.options == ["quick", "balanced", "high quality", "the dataset's own settings (train.toml)"]
    assert NO_HISTORY in preset.proto.captions[0] and "20 steps" in preset.proto.captions[0]


def test_every_option_is_reachable_with_its_name_shown():
    at = _page()
    widgets = {w.key: (w, inside) for w, inside in _inputs(at.main) if w.key}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            option = f"{section}.{f.name}"
            assert f.metadata["label"] and f.metadata["topic"] in TOPICS, option
            key = ESSENTIAL_WIDGETS.get(option, f"cfg-{option}")
            assert key in widgets, f"{option} has no widget"
            widget, inside = widgets[key]
            assert option in widget.help, (option, widget.help)  # the name in its tooltip, for kohya users
            if inside:  # under Advanced the name is shown beside the plain label, and the help is the config's
                assert widget.label == f"{f.metadata['label']} `{option}`"
                assert f.metadata["help"] in widget.help
    # Closed lists are choices, and every default lies in its widget's range.
    assert at.selectbox(key="cfg-training.optimizer").options[:2] == ["adamw", "adamw8bit"]
    defaults = TrainConfig().to_dict()
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            value, meta = defaults[section][f.name], f.metadata
            assert meta.get("min", value) <= value <= meta.get("max", value), (section, f.name)
            assert value in meta.get("choices", [value]), (section, f.name)


def test_a_preset_fills_the_form_and_typed_values_stay_until_the_next_choice():
    at = _page(preset="quick")
    assert at.number_input(key="train_length").value == 20 and at.selectbox(key="train_length_unit").value == "steps"
    assert at.number_input(key="cfg-training.learning_rate").value == 1e-3
    assert at.number_input(key="cfg-validation.every_n_steps").value == 10
    assert at.text_input(key="cfg-output.name").value == "striped"
    first_prompt = at.text_area(key="cfg-validation.prompts").value.splitlines()[0]
    assert first_prompt == "a red circle on a blue background, zkstripes"
    at.radio(key="train_preset").set_value("high quality").run()
    assert at.number_input(key="train_length").value == 500 and at.number_input(key="cfg-network.rank").value == 16
    # Typed values stay over reruns (here: Start refused a warmup longer than the run, nothing queued).
    at.number_input(key="cfg-network.rank").set_value(32)
    at.text_input(key="cfg-dataset.trigger_word").input("zkstripes")
    at.number_input(key="cfg-training.lr_warmup_steps").set_value(600)
    _start(at)
    assert at.error and at.number_input(key="cfg-network.rank").value == 32
    assert at.text_input(key="cfg-dataset.trigger_word").value == "zkstripes"
    at.radio(key="train_preset").set_value("balanced").run()
    assert at.number_input(key="cfg-network.rank").value == 8 and at.number_input(key="train_length").value == 150
    assert at.text_input(key="cfg-dataset.trigger_word").value == ""  # the preset's (the dataset's) value
    # Another base model fills the form for its family: tiny-flux has no convolutions, and its own adapter.
    at.selectbox(key="train_base").set_value("tiny-flux").run()
    assert not at.exception
    assert at.text_input(key="cfg-network.target_modules").value == "all-linear"
    assert at.text_input(key="cfg-output.name").value == "striped-tiny-flux"


def test_the_datasets_own_settings_are_a_preset_only_where_it_has_them(studio_home):
    at = _page(preset=OWN)
    own = TrainConfig.from_toml(Path(STRIPED) / "train.toml")
    assert at.number_input(key="train_length").value == own.training.max_train_steps == 500
    assert at.number_input(key="cfg-training.lr_warmup_steps").value == 25
    assert at.selectbox(key="cfg-training.lr_scheduler").value == "cosine"
    assert at.number_input(key="cfg-validation.held_out_count").value == 3
    # A dataset of the user's own without a train.toml offers the three levels only, named after its folder.
    mine = studio_home / "datasets" / "cats"
    mine.mkdir(parents=True)
    for i in range(2):
        src = sorted((Path(STRIPED) / "10_zkstripes").glob("*.png"))[i]
        (mine / src.name).write_bytes(src.read_bytes())
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    at.selectbox(key="train_dataset").set_value(str(mine)).run()
    assert not at.exception and at.radio(key="train_preset").options == ["quick", "balanced", "high quality"]
    assert at.text_input(key="cfg-output.name").value == "cats"
    assert any("No sample prompts" in c.value for c in at.caption)


def test_newcomers_quick_run_trains_and_registers(studio_home):
    # The newcomer's path: the striped sample, the quick preset, Start; nothing else typed.
    at = _start(_page(preset="quick"))
    assert not at.error, [e.value for e in at.error]
    assert "queued job" in at.success[0].value
    at = _until(at, lambda a: any("done: registered striped@1" in s.value for s in a.success))
    assert at.get("arrow_vega_lite_chart") or at.get("vega_lite_chart")  # the loss chart
    assert any("step 20" in c for img in at.get("image") for c in img.captions)  # final samples
    assert "step 20/20" in at.get("progress")[0].proto.text
    # its checkpoints (every 10 steps in the quick preset) are candidates, the best starred
    table = at.dataframe[-1].value
    assert list(table["step"]) == [10, 20] and list(table["registered"]) == ["", "striped@1"]
    assert list(table["best"]).count("★ lowest validation loss") == 1
    # A fresh page (a browser reload, or a restarted studio) shows the same job from disk, and the run
    # it measured now prices the presets of this model.
    again = AppTest.from_file(PAGE, default_timeout=120).run()
    assert any("striped: done" in h.value for h in again.subheader)
    again.selectbox(key="train_dataset").set_value(STRIPED).run()
    captions = again.radio(key="train_preset").proto.captions
    assert "of training (from 1 earlier run of tiny here)" in captions[1], captions


def test_bad_input_is_a_message_and_nothing_is_queued(studio_home):
    at = _page()
    at.selectbox(key="cfg-training.optimizer").set_value("prodigy")
    _start(at)
    assert "training.learning_rate" in at.error[0].value and "1.0" in at.error[0].value
    at = _page()
    at.text_input(key="cfg-validation.seeds").input("1, two")
    _start(at)
    assert "whole numbers" in at.error[0].value
    at = _page()
    at.number_input(key="cfg-training.lr_warmup_steps").set_value(50)
    _start(at)
    assert "training.lr_warmup_steps" in at.error[0].value
    # A typed folder that does not exist: said at once, and again when Start is pressed.
    at = AppTest.from_file(PAGE, default_timeout=120)
    at.session_state["train_dataset"] = str(studio_home / "nothing")  # typed into the Dataset box
    at.run()
    assert not at.exception and at.error
    _start(at)
    assert any("does not exist" in e.value for e in at.error), [e.value for e in at.error]
    assert jobs.list_jobs() == []


def test_cancel_and_resume_buttons(studio_home):
    job = jobs.submit(ROOT / "datasets" / "striped" / "train.toml",
                      overrides=["training.max_train_steps=400", "training.lr_warmup_steps=0",
                                 "validation.every_n_steps=0", "validation.prompts=[]",
                                 "output.checkpointing_steps=3",
                                 "training.train_batch_size=1"])
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    at = _until(at, lambda a: jobs.get_job(job.id).progress().step >= 4)
    at.button(key=f"cancel-{job.id}").click().run()
    at = _until(at, lambda a: any(f"resume-{job.id}" == b.key for b in a.button))
    assert jobs.get_job(job.id).state == "stopped"
    at.button(key=f"resume-{job.id}").click().run()
    assert not at.exception
    resumed = [j for j in jobs.list_jobs() if j.resume_of == job.id]
    assert len(resumed) == 1
    jobs.cancel(resumed[0].id)  # do not leave a 400-step run behind
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if jobs.get_job(resumed[0].id).finished:
                break
        except jobs.JobNotFoundError:  # it was still queued: cancelling a queued job removes it
            break
        time.sleep(0.5)


def test_the_team_queue_beside_this_machines(studio_home, monkeypatch, postgres_server):
    import socket

    from adapters.registry import Registry
    from studio.app.workers import TeamQueue, run_worker
    from studio.core.settings import get_settings, reload_settings

    url = postgres_server.new_database()
    monkeypatch.setenv("LORA_STUDIO_REGISTRY_URL", url)
    monkeypatch.setenv("LORA_STUDIO_USER", "ada")  # who queues the run
    reload_settings()
    try:
        at = _page(preset="quick")
        at.number_input(key="train_length").set_value(4)
        at.text_area(key="cfg-validation.prompts").input("")  # no samples: the test is about where it runs
        at.radio(key="train_where").set_value("the team's workers")
        _start(at)
        assert not at.error, [e.value for e in at.error]
        assert "queued team job" in at.success[0].value
        assert jobs.list_jobs() == []  # nothing went to this machine's own queue
        with TeamQueue() as queue:
            (job,) = queue.jobs()
            assert job.state == "queued" and job.submitted_by == get_settings().user == "ada"
            row = at.dataframe[0].value.iloc[-1]
            assert (row["id"], row["runs on"], row["state"]) == (job.id, "(a worker)", "queued")
            assert any("Waiting for a worker" in i.value for i in at.info)
            # A worker (here, in this process, run by another user) takes it and trains it; the page shows
            # where and the result, and the audit trail names who queued it as the version's author.
            monkeypatch.setenv("LORA_STUDIO_USER", "gpu-box")
            reload_settings()
            assert run_worker(queue, once=True, heartbeat_s=0.5, log=lambda _: None) == 1
            at = _until(at, lambda a: any("done: registered striped@1" in s.value for s in a.success), 60)
            assert any(f"ran on {socket.gethostname()}" in c.value for c in at.caption)
            with Registry() as reg:
                assert [(e.actor, e.action) for e in reg.history("striped")] == [("ada", "register")]
            assert "step 4/4" in at.get("progress")[0].proto.text
            # Cancel a queued team job from the page, then queue it again with Resume.
            second = queue.submit(ROOT / "datasets" / "striped" / "train.toml", overrides=["output.name=second"])
            at.run()
            at.selectbox(key="train_job_pick").set_value(f"team:{second.id}").run()
            at.button(key=f"cancel-{second.id}").click().run()
            assert queue.get(second.id).state == "cancelled"
            at.button(key=f"resume-{second.id}").click().run()
            assert not at.exception and queue.get(second.id).state == "queued"
    finally:
        postgres_server.drop_database(url)
