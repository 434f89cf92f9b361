"""The Train page through AppTest: presets fill the generated form, Start queues a real job, the live
view follows it to the end (loss chart, samples), bad options are messages; cancel and resume."""

from __future__ import annotations

import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

from studio.app import jobs

ROOT = Path(__file__).resolve().parent.parent
PAGE = str(ROOT / "studio" / "app" / "ui" / "train_page.py")
QUICK = "striped: tiny model, quick (20 steps)"


def _page() -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    at.selectbox(key="train_preset").set_value(QUICK).run()
    return at


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


def test_form_is_generated_from_train_config_with_help():
    at = _page()
    assert not at.exception
    rank = at.number_input(key="cfg-network.rank")
    assert rank.value == 8 and "rank" in rank.help
    assert at.number_input(key="cfg-training.max_train_steps").value == 20
    first_prompt = at.text_area(key="cfg-validation.prompts").value.splitlines()[0]
    assert first_prompt == "a red circle on a blue background, zkstripes"
    assert at.text_input(key="cfg-dataset.path").value == str(ROOT / "datasets" / "striped")


def test_start_a_quick_run_and_watch_it_finish(studio_home):
    at = _page()
    at.number_input(key="cfg-training.max_train_steps").set_value(10)
    at.number_input(key="cfg-validation.every_n_steps").set_value(5)
    at.text_input(key="cfg-output.name").input("pagerun")
    next(b for b in at.button if b.label == "Start training").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "queued job" in at.success[0].value
    at = _until(at, lambda a: any("done: registered pagerun@1" in s.value for s in a.success))
    assert at.get("arrow_vega_lite_chart") or at.get("vega_lite_chart")  # the loss chart
    assert any("step 10" in c for img in at.get("image") for c in img.captions)  # final samples
    assert "step 10/10" in at.get("progress")[0].proto.text
    # A fresh page (a browser reload, or a restarted studio) shows the same job from disk.
    again = AppTest.from_file(PAGE, default_timeout=120).run()
    assert any("pagerun: done" in h.value for h in again.subheader)


def test_bad_options_are_messages_and_nothing_is_queued(studio_home):
    at = _page()
    at.number_input(key="cfg-network.rank").set_value(0)
    next(b for b in at.button if b.label == "Start training").click().run()
    assert not at.exception and "network.rank" in at.error[0].value
    at = _page()
    at.text_input(key="cfg-validation.seeds").input("1, two")
    next(b for b in at.button if b.label == "Start training").click().run()
    assert not at.exception and "whole numbers" in at.error[0].value
    at = _page()
    at.text_input(key="cfg-dataset.path").input(str(studio_home / "nothing"))
    next(b for b in at.button if b.label == "Start training").click().run()
    assert not at.exception and at.error
    assert jobs.list_jobs() == []


def test_cancel_and_resume_buttons(studio_home):
    job = jobs.submit(ROOT / "datasets" / "striped" / "train.toml",
                      overrides=["training.max_train_steps=400", "training.lr_warmup_steps=0",
                                 "validation.every_n_steps=0", "output.checkpointing_steps=3",
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
