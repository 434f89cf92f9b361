"""The Train page: a form generated from TrainConfig (help texts as tooltips), presets, the job queue,
and a live view of a run: progress with ETA, loss and validation-loss charts, samples, cancel, resume.

Widgets only: configs are ``trainer.config.TrainConfig``, jobs are ``studio.app.jobs`` (``lora-studio
jobs ...``), progress is ``trainer.events.run_state``. Every value shown is read from disk, so the
page shows the same after a browser reload or a studio restart. The form's paths (dataset, output
folder, a base model on disk) must lie under the data roots (``studio.core.settings.check_data_path``).
"""

from __future__ import annotations

import typing
from dataclasses import fields

import streamlit as st

from studio.app import jobs
from studio.app.ui.common import enlarged, reported
from studio.core.base_models import check_base_model
from studio.core.errors import ConfigError, StudioError
from studio.core.settings import check_data_path
from trainer.config import SECTIONS, TrainConfig

OPEN_SECTIONS = ("dataset", "network", "training", "output")
POLL = "2s"

st.title("Train")


def _key(section: str, option: str) -> str:
    return f"cfg-{section}.{option}"


def _show(option: str, value) -> object:
    # Lists are edited as text: validation prompts one per line (they contain commas), others comma-separated.
    if isinstance(value, list):
        return "\n".join(map(str, value)) if option == "prompts" else ", ".join(map(str, value))
    return value


def _load_preset(label: str) -> None:
    """Fill every form field from a preset's config (the widgets read their values from session state)."""
    path, overrides = jobs.presets()[label]
    config = TrainConfig.from_toml(path).apply_overrides(list(overrides))
    for section, options in config.to_dict().items():
        for option, value in options.items():
            st.session_state[_key(section, option)] = _show(option, value)
    st.session_state["train_loaded"] = label


def _parse_list(text: str, item: type, *, lines: bool = False) -> list:
    values = [p.strip() for p in (text.splitlines() if lines else text.split(",")) if p.strip()]
    if item is int:
        try:
            return [int(v) for v in values]
        except ValueError:
            raise ConfigError(f"{text!r} must be whole numbers separated by commas") from None
    return values


def _check_paths(config: TrainConfig) -> TrainConfig:
    """The config, if its paths lie under the data roots: anyone who can open the page can type them.

    The run directory is made inside ``output.dir`` (``$LORA_STUDIO_HOME/runs`` when empty), so
    checking that folder covers it. An empty ``dataset.path`` is left to the config's own message.
    """
    check_base_model(config.model.base_model, what="model.base_model")
    if config.dataset.path.strip():
        check_data_path(config.dataset.path, what="dataset.path")
    if config.output.dir.strip():
        check_data_path(config.output.dir, what="output.dir")
    return config


def _config_from_form() -> TrainConfig:
    data: dict[str, dict] = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            value = st.session_state.get(_key(section, f.name))
            if value is None:
                continue
            tp = hints[f.name]
            if typing.get_origin(tp) is list:
                value = _parse_list(value, typing.get_args(tp)[0], lines=f.name == "prompts")
            elif tp is not str and str in typing.get_args(tp):  # str | list[str]: one preset name, or a list
                items = _parse_list(value, str)
                value = items[0] if len(items) == 1 else items
            data.setdefault(section, {})[f.name] = value
    return TrainConfig.from_dict(data)


# ---- the form ----------------------------------------------------------------------------------
presets = jobs.presets()
labels = list(presets)
preset = st.selectbox("Preset", labels, key="train_preset",
                      help="ready configs of the sample datasets; a 'quick' run takes seconds on the tiny model")
if st.session_state.get("train_loaded") != preset:
    _load_preset(preset)

with st.form("train"):
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        with st.expander(f"[{section}]", expanded=section in OPEN_SECTIONS):
            cols = st.columns(3)
            for i, f in enumerate(fields(cls)):
                key, tip, tp = _key(section, f.name), f.metadata.get("help", ""), hints[f.name]
                col = cols[i % 3]
                if tp is bool:
                    col.checkbox(f.name, key=key, help=tip)
                elif tp is int:
                    col.number_input(f.name, key=key, help=tip, step=1)
                elif tp is float:
                    col.number_input(f.name, key=key, help=tip, format="%g", step=None)
                elif section == "validation" and f.name == "prompts":
                    col.text_area(f.name, key=key, help=tip + " (one per line)")
                else:
                    col.text_input(f.name, key=key, help=tip)
    start = st.form_submit_button("Start training", type="primary")

if start:
    with reported("Starting the job"):
        job = jobs.submit(_check_paths(_config_from_form()))
        st.session_state["train_job"] = job.id
        st.success(f"queued job {job.id} ({job.name}); it runs in the background and keeps running if you "
                   f"close this page")

# ---- the queue -----------------------------------------------------------------------------------
st.header("Jobs")
all_jobs = jobs.list_jobs()
if not all_jobs:
    st.info("No jobs yet: pick a preset and press Start training.")
    st.stop()
st.dataframe([{"id": j.id, "adapter": j.name, "state": j.state, "resumes": j.resume_of or ""} for j in all_jobs],
             hide_index=True)
ids = [j.id for j in all_jobs]
chosen = st.session_state.get("train_job")
job_id = st.selectbox("Job", ids, index=ids.index(chosen) if chosen in ids else 0, key="train_job_pick",
                      format_func=lambda i: f"{i} · {next(j for j in all_jobs if j.id == i).name}")


def _job_view(job_id: str) -> None:
    try:
        job = jobs.get_job(job_id)
    except StudioError as e:
        st.error(str(e))
        return
    state = job.progress() if job.state != "queued" else None
    label = job.state if state is None or job.state in ("queued", "cancelled") else state.state
    st.subheader(f"{job.name}: {label}")
    if job.state == "queued":
        st.info("Waiting for the jobs before it to finish.")
    elif state is not None:
        eta = f", about {state.eta_s:.0f} s left" if state.eta_s is not None and not job.finished else ""
        speed = f" ({state.sec_per_step:.2f} s/step)" if state.sec_per_step else ""
        st.progress(state.fraction, text=f"step {state.step}/{state.total_steps or '?'}{eta}{speed}")
        for note in state.notes:
            st.caption(note)
        if job.state == "done" and state.result:
            st.success(f"done: registered {state.result.get('ref') or 'the adapter'}, final loss "
                       f"{state.result.get('final_loss')}; find it on the Adapters page")
        elif job.state in ("failed", "stopped"):
            (st.error if job.state == "failed" else st.warning)(job.message or state.message)
        c1, c2 = st.columns(2)
        if state.losses:
            c1.caption("training loss")
            c1.line_chart({"loss": dict(state.losses)}, x_label="step", height=220)
        if state.val_losses:
            c2.caption("validation loss")
            c2.line_chart({"val_loss": dict(state.val_losses)}, x_label="step", height=220)
        if state.samples:
            steps = [s for s, _ in state.samples]
            step = st.select_slider("Samples at step", steps, value=steps[-1], key=f"samples-{job.id}") \
                if len(steps) > 1 else steps[0]
            cols = st.columns(6)
            for i, path in enumerate(dict(state.samples)[step]):
                img = enlarged(path, 128)
                if img is not None:
                    cols[i % 6].image(img, caption=f"step {step}")
    c1, c2, _ = st.columns([1, 1, 4])
    if not job.finished and c1.button("Cancel", key=f"cancel-{job.id}"):
        with reported("Cancel"):
            jobs.cancel(job.id)
            st.rerun(scope="app")
    if job.state in ("stopped", "failed") and c2.button("Resume", key=f"resume-{job.id}"):
        with reported("Resume"):
            new = jobs.resume(job.id)
            st.session_state["train_job"] = new.id
            st.rerun(scope="app")
    with st.expander("Log"):
        st.code(job.log_tail() or "(empty)", language=None)
    if job.finished and st.session_state.get(f"seen-end-{job.id}") is False:
        st.session_state[f"seen-end-{job.id}"] = True
        st.rerun(scope="app")  # the run ended while polling: refresh the queue table above
    if not job.finished:
        st.session_state[f"seen-end-{job.id}"] = False


picked = next(j for j in all_jobs if j.id == job_id)
# Poll only while something can change; a finished job's view is drawn once.
st.fragment(run_every=None if picked.finished else POLL)(_job_view)(job_id)
