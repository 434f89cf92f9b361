"""The Train page, essentials first: a dataset, a base model, a trigger word and a preset with its time on
this machine, then length, rank, learning rate and the adapter's name; every other option under
"Advanced", by topic. Below: the job queue and a live view of a run (progress with ETA, loss and
validation-loss charts, samples, cancel, resume) with its checkpoints as candidates (``run_view``).

The form is generated from ``trainer.config.TrainConfig``: a widget's label, topic, range and choices are
its field's metadata (``_opt(..., label=, topic=, low=, high=, choices=)``), its tooltip the field's help
text, and its option name (``dataset.caption_dropout_rate``) is shown beside it for people who know
kohya's or diffusers' names. :data:`ESSENTIALS` says which options stand above Advanced: a tuple on this
page, not field metadata, since which options a newcomer sees first is this page's decision (the CLI
and TOML files have no "first"); its reasons are written beside it.

Presets are ``studio.app.train_presets``: choosing a dataset, a base model or a preset fills every
widget; what the user types afterwards is kept until the next such choice. Start builds the config with
``TrainConfig.from_dict`` and queues it with ``studio.app.jobs.submit`` (``lora-studio jobs ...``);
progress is ``trainer.events.run_state``. When the registry is PostgreSQL, "Run on" also offers the team's
queue (``studio.app.workers``): Start queues the run there for ``lora-studio worker`` on any machine, and
the team's jobs are listed, watched, cancelled and resumed beside this machine's. Every value shown is
read from disk (or the database), so the page shows the same after a browser reload or a studio restart.
The paths it reads and sends (dataset and its
``train.toml``, regularisation images, output folder, a base model on disk) must lie under the data
roots (``studio.core.settings.check_data_path``).
"""

from __future__ import annotations

import typing
from dataclasses import fields

import streamlit as st
from PIL import Image

from studio.app import dataset_files, jobs, train_presets
from studio.app.ui.common import dataset_images, enlarged, reported, team_queue
from studio.app.ui.run_view import checkpoints_section
from studio.core.base_models import check_base_model, list_base_models
from studio.core.errors import ConfigError, StudioError
from studio.core.families import get_family
from studio.core.settings import check_data_path
from trainer.config import SECTIONS, TOPICS, TrainConfig

# The options a first run needs decided, drawn above Advanced in the order a newcomer thinks of them:
# what to learn from (the dataset folder), what to adapt (the base model), the word that calls the
# result up (trigger word), how long (steps or epochs: exactly one is non-zero), how much the adapter
# can hold and how fast it learns (rank, learning rate), and what the result is called. A preset sets
# them and everything else; the rest waits under Advanced for those who want it.
ESSENTIALS = ("dataset.path", "model.base_model", "dataset.trigger_word", "training.max_train_steps",
              "training.num_train_epochs", "network.rank", "training.learning_rate", "output.name")
LENGTH_UNITS = {"steps": "training.max_train_steps", "epochs": "training.num_train_epochs"}
THUMBNAILS = 8
POLL = "2s"
# Where Start sends a run when the registry is PostgreSQL: this machine's on-disk queue, or the team's queue
# in the database, which ``lora-studio worker`` on any machine takes from (studio.app.workers).
HERE, TEAM = "this machine", "the team's workers"
TEAM_KEY = "team:"  # a team job's key in the job picker (its ids are shaped like local ones)
TEAM_JOBS_SHOWN = 100  # the team's newest jobs; `lora-studio team list` prints them all

st.title("Train")


def _key(option: str) -> str:
    return f"cfg-{option}"


def _options() -> list[tuple[str, typing.Any, typing.Any]]:
    """``(section.option, dataclass field, type)`` for every option of TrainConfig, in config order."""
    out = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        out += [(f"{section}.{f.name}", f, hints[f.name]) for f in fields(cls)]
    return out


OPTIONS = _options()
FIELDS = {option: f for option, f, _ in OPTIONS}
# Drawn as widgets keyed by _key(option); the dataset, the base model and the length have their own.
FORM_OPTIONS = [o for o in OPTIONS if o[0] not in ("dataset.path", "model.base_model", *LENGTH_UNITS.values())]


def _show(option: str, value) -> object:
    # Lists are edited as text: sample prompts one per line (they contain commas), others comma-separated.
    if isinstance(value, list):
        return "\n".join(map(str, value)) if option == "validation.prompts" else ", ".join(map(str, value))
    return value


def _fill(config: TrainConfig) -> None:
    """Put a config's values into the widgets (they read them from session state on this run)."""
    values = config.to_dict()
    for option, _, _ in FORM_OPTIONS:
        section, name = option.split(".")
        st.session_state[_key(option)] = _show(option, values[section][name])
    steps, epochs = config.training.max_train_steps, config.training.num_train_epochs
    st.session_state["train_length_unit"] = "steps" if steps else "epochs"
    st.session_state["train_length"] = steps or epochs


def _parse_list(text: str, item: type, option: str, *, lines: bool = False) -> list:
    values = [p.strip() for p in (text.splitlines() if lines else text.split(",")) if p.strip()]
    if item is int:
        try:
            return [int(v) for v in values]
        except ValueError:
            raise ConfigError(f"{option}: {text!r} must be whole numbers separated by commas", option=option) \
                from None
    return values


def _check_paths(config: TrainConfig) -> TrainConfig:
    """The config, if its paths lie under the data roots: anyone who can open the page can type them.

    The run directory is made inside ``output.dir`` (``$LORA_STUDIO_HOME/runs`` when empty), so
    checking that folder covers it. An empty ``dataset.path`` is left to the config's own message.
    """
    check_base_model(config.model.base_model, what="model.base_model")
    if config.dataset.path.strip():
        check_data_path(config.dataset.path, what="dataset.path")
    if config.dataset.reg_data_dir.strip():
        check_data_path(config.dataset.reg_data_dir, what="dataset.reg_data_dir")
    if config.output.dir.strip():
        check_data_path(config.output.dir, what="output.dir")
    return config


def _config_from_form(dataset_path: str, base_model: str) -> TrainConfig:
    data: dict[str, dict] = {"model": {"base_model": base_model}, "dataset": {"path": dataset_path}}
    for option, _, tp in FORM_OPTIONS:
        value = st.session_state.get(_key(option))
        if value is None:
            continue
        if typing.get_origin(tp) is list:
            value = _parse_list(value, typing.get_args(tp)[0], option, lines=option == "validation.prompts")
        elif tp is not str and str in typing.get_args(tp):  # str | list[str]: one preset name, or a list
            items = _parse_list(value, str, option)
            value = items[0] if len(items) == 1 else items
        section, name = option.split(".")
        data.setdefault(section, {})[name] = value
    length, unit = st.session_state.get("train_length"), st.session_state.get("train_length_unit", "steps")
    for each, option in LENGTH_UNITS.items():
        section, name = option.split(".")
        data.setdefault(section, {})[name] = int(length or 0) if each == unit else 0
    return TrainConfig.from_dict(data)


def _widget(box, option: str, f, tp, *, essential: bool = False) -> None:
    """One option's widget: its plain label, its help text as the tooltip, its option name beside it."""
    meta, key = f.metadata, _key(option)
    # Above Advanced the label stays plain (the name ends the tooltip); under Advanced it is shown.
    label = meta["label"] if essential else f"{meta['label']} `{option}`"
    tip = f"{meta['help']}\n\n`{option}`"
    if "choices" in meta:
        box.selectbox(label, list(meta["choices"]), key=key, help=tip,
                      format_func=lambda v: v or "(the base model's own)")
    elif tp is bool:
        box.checkbox(label, key=key, help=tip)
    elif tp is int:
        box.number_input(label, key=key, help=tip, step=1, min_value=meta.get("min"), max_value=meta.get("max"))
    elif tp is float:
        box.number_input(label, key=key, help=tip, format="%g", step=None, min_value=meta.get("min"),
                         max_value=meta.get("max"))
    elif option == "validation.prompts":
        box.text_area(label, key=key, help=tip)
    else:
        box.text_input(label, key=key, help=tip)


@st.cache_data(max_entries=256, show_spinner=False)
def _thumbnail(path: str, mtime_ns: int) -> Image.Image | None:
    # mtime_ns is part of the cache key only. Large photos shrink once; the tiny 32 px ones are enlarged.
    img = enlarged(path, 72)
    if img is not None:
        img.thumbnail((144, 144))
    return img


def _dataset_strip(folder: str) -> None:
    """The chosen dataset's image count and first thumbnails, or why there are none."""
    try:
        resolved, images = dataset_images(folder)
    except StudioError as e:
        st.error(str(e))
        return
    if images:
        st.caption(f"{len(images)} images in {resolved}")
        thumbs = [_thumbnail(str(i.path), i.path.stat().st_mtime_ns) for i in images[:THUMBNAILS]]
        st.image([t for t in thumbs if t is not None], width=72)
        return
    from trainer.data import detect_layout  # local: numpy and PIL's plugins, needed only here

    if detect_layout(resolved) == "saved":
        st.caption(f"a saved (save_to_disk) dataset in {resolved}: its images are counted when the run starts")
    else:
        st.warning(f"No images in {resolved} yet: add some on the Datasets page.")


def _base_models(current: str | None) -> dict[str, str]:
    """Base-model choices -> how they are shown: the embedded models and ``$LORA_STUDIO_HOME/models``."""
    shown = {m.ref: f"{m.ref} ({get_family(m.family).display_name}{', embedded' if m.kind == 'tiny' else ''})"
             for m in list_base_models() if m.family != "?"}
    if current and current not in shown:
        shown[current] = current  # typed by the user: kept as a choice
    return shown


def _caption(config: TrainConfig, estimate: train_presets.TimeEstimate) -> str:
    t = config.training
    length = f"{t.max_train_steps} steps" if t.max_train_steps else f"{t.num_train_epochs} epochs"
    return (f"{length} · rank {config.network.rank} · learning rate {t.learning_rate:g} · batch "
            f"{t.train_batch_size} — {estimate.text}")


all_jobs = jobs.list_jobs()
team, team_jobs = None, []
with reported("Reading the team's queue"):  # a database that cannot be reached still leaves this machine's queue
    if (found := team_queue()) is not None:
        team_jobs, team = found.jobs(limit=TEAM_JOBS_SHOWN), found

# ---- essentials --------------------------------------------------------------------------------
known = {str(folder): label for label, folder in dataset_files.list_datasets()}
if st.session_state.get("train_dataset") and st.session_state["train_dataset"] not in known:
    known[st.session_state["train_dataset"]] = st.session_state["train_dataset"]  # a typed folder stays a choice
c1, c2 = st.columns(2)
folder = c1.selectbox("Dataset", list(known), key="train_dataset", format_func=lambda v: known.get(v, v),
                      accept_new_options=True, placeholder="choose a dataset, or type a folder path",
                      help="your datasets ($LORA_STUDIO_HOME/datasets; add them on the Datasets page) and the "
                           "project's samples; or type the path of a folder under the data roots\n\n`dataset.path`")
settings = dataset_error = settings_error = None
if folder:
    try:
        check_data_path(folder, what="dataset.path")  # a typed folder: its train.toml is read only inside the roots
    except StudioError as e:
        dataset_error = str(e)
    else:
        try:
            settings = train_presets.dataset_settings(folder)
        except StudioError as e:
            settings_error = f"The dataset's train.toml is not used: {e}"
    if st.session_state.get("train_dataset_seen") != folder:
        # A new dataset: its own train.toml names the base model it was made for, which is taken unless the
        # user chose a base model themselves (one other than the last dataset's).
        st.session_state["train_dataset_seen"] = folder
        if settings is not None and st.session_state.get("train_base") in (None, st.session_state.get("train_auto")):
            st.session_state["train_base"] = st.session_state["train_auto"] = settings.model.base_model
st.session_state.setdefault("train_base", TrainConfig().model.base_model)
models = _base_models(st.session_state.get("train_base"))
base = c2.selectbox("Base model", list(models), key="train_base", format_func=lambda v: models.get(v, v),
                    accept_new_options=True, help=f"{FIELDS['model.base_model'].metadata['help']}\n\n"
                                                  f"`model.base_model`")
if dataset_error:
    st.error(dataset_error)
elif folder:
    _dataset_strip(folder)
if settings_error:
    st.warning(settings_error)

configs: dict[str, TrainConfig] = {}
if folder and base and not dataset_error:
    try:
        check_base_model(base, what="model.base_model")
        for preset_key in train_presets.preset_keys(settings):
            configs[preset_key] = train_presets.preset_config(preset_key, dataset=folder, base_model=base,
                                                              settings=settings)
    except StudioError as e:
        st.error(f"No presets for this choice: {e}")
        configs = {}
keys = list(configs) or list(train_presets.preset_keys(None))
if st.session_state.get("train_preset") not in keys:
    st.session_state.pop("train_preset", None)  # "the dataset's own" of a dataset no longer chosen
speeds = train_presets.run_speeds(j.run_dir for j in all_jobs)
estimates = {k: train_presets.estimate(c, speeds) for k, c in configs.items()}
preset = st.radio("Preset", keys, key="train_preset", format_func=lambda k: train_presets.LABELS[k],
                  captions=[_caption(configs[k], estimates[k]) if k in configs else "" for k in keys],
                  disabled=not configs,
                  help="what the run starts from: quick tries the dataset, balanced is the model family's usual "
                       "run, high quality trains longer at a higher rank. Choosing one fills in every setting "
                       "below; the times come from this machine's earlier runs of the same base model")
wanted = (folder, base, preset)
# Refill when the choice changed, or when the widgets' values were dropped (Streamlit forgets a page's
# widgets while another page is shown).
if configs and (st.session_state.get("train_filled") != wanted
                or any(_key(o) not in st.session_state for o, _, _ in FORM_OPTIONS)):
    _fill(configs[preset])
    st.session_state["train_filled"] = wanted
elif not configs and any(_key(o) not in st.session_state for o, _, _ in FORM_OPTIONS):
    _fill(TrainConfig())  # no preset to start from: the config's defaults, so no widget shows a blank

essential = {o: (f, tp) for o, f, tp in FORM_OPTIONS if o in ESSENTIALS}
advanced = [(o, f, tp) for o, f, tp in FORM_OPTIONS if o not in ESSENTIALS]
with st.form("train"):
    c1, c2 = st.columns(2)
    _widget(c1, "dataset.trigger_word", *essential["dataset.trigger_word"], essential=True)
    _widget(c2, "output.name", *essential["output.name"], essential=True)
    c1, c2, c3, c4 = st.columns([2, 1, 2, 2])
    length_help = "\n\n".join(f"{unit}: {FIELDS[o].metadata['help']} `{o}`" for unit, o in LENGTH_UNITS.items())
    c1.number_input("Length", key="train_length", min_value=1, max_value=1_000_000, step=1, help=length_help)
    c2.selectbox("in", list(LENGTH_UNITS), key="train_length_unit", help="train for a number of optimizer steps, "
                 "or of passes over the dataset (each image seen its repeats times per pass)")
    _widget(c3, "network.rank", *essential["network.rank"], essential=True)
    _widget(c4, "training.learning_rate", *essential["training.learning_rate"], essential=True)
    if st.session_state.get(_key("training.optimizer")) == "prodigy":
        st.caption("Prodigy sizes its own steps: keep the learning rate at 1.0 (it scales Prodigy's estimate).")
    if not st.session_state.get(_key("validation.prompts"), "").strip():
        st.caption("No sample prompts: add some under Advanced, 'validation and samples', to see images as it "
                   "trains.")
    with st.expander("Advanced: every other option, by topic"):
        topics = [t for t in TOPICS if any(f.metadata["topic"] == t for _, f, _ in advanced)]
        for tab, topic in zip(st.tabs([t.capitalize() for t in topics]), topics, strict=True):
            cols = tab.columns(3)
            for i, (option, f, tp) in enumerate(o for o in advanced if o[1].metadata["topic"] == topic):
                _widget(cols[i % 3], option, f, tp)
    if team is not None:
        st.radio("Run on", (HERE, TEAM), key="train_where", horizontal=True,
                 help="this machine's own queue, or the team's queue in the registry's PostgreSQL database, "
                      "which `lora-studio worker` takes from on any machine. For the team, the dataset and the "
                      "output folder (Advanced, Output) must lie on a path every worker's machine sees")
    start = st.form_submit_button("Start training", type="primary", disabled=not folder or not base)

if start and folder and base:
    with reported("Starting the job"):
        dataset_path = settings.dataset.path if settings is not None else folder
        config = _check_paths(_config_from_form(dataset_path, base))
        if team is not None and st.session_state.get("train_where") == TEAM:
            job = team.submit(config)
            st.session_state["train_job"] = TEAM_KEY + job.id
            st.success(f"queued team job {job.id} ({job.name}) for the team's workers; its run folder is "
                       f"{job.run_dir}")
            team_jobs = team.jobs(limit=TEAM_JOBS_SHOWN)
        else:
            job = jobs.submit(config)
            st.session_state["train_job"] = job.id
            took = train_presets.estimate(config, speeds)
            st.success(f"queued job {job.id} ({job.name}); it runs in the background and keeps running if you "
                       f"close this page" + (f"; {took.text}" if took.seconds is not None else ""))
            all_jobs = jobs.list_jobs()

# ---- the queue -----------------------------------------------------------------------------------
st.header("Jobs")
listed = {j.id: j for j in all_jobs} | {TEAM_KEY + j.id: j for j in team_jobs}
if not listed:
    st.info("No jobs yet: choose a dataset and a preset, then press Start training.")
    st.stop()
rows = [{"id": j.id, "adapter": j.name, "state": j.state, "resumes": j.resume_of or ""} for j in all_jobs]
if team is not None:
    # A team's jobs beside this machine's: where each runs (or ran last), who queued it, how many tries.
    rows = [{**r, "runs on": HERE} for r in rows] + [
        {"id": j.id, "adapter": j.name, "state": j.state, "resumes": "", "runs on": j.machine or "(a worker)",
         "by": j.submitted_by, "attempts": len(j.attempts)} for j in team_jobs]
st.dataframe(rows, hide_index=True)
keys = list(listed)
chosen = st.session_state.get("train_job")
job_key = st.selectbox("Job", keys, index=keys.index(chosen) if chosen in keys else 0, key="train_job_pick",
                       format_func=lambda k: f"{listed[k].id} · {listed[k].name}"
                                             + (" (team)" if k.startswith(TEAM_KEY) else ""))


def _job_view(job_key: str) -> None:
    on_team = job_key.startswith(TEAM_KEY)
    try:
        job = team.get(job_key.removeprefix(TEAM_KEY)) if on_team else jobs.get_job(job_key)
    except StudioError as e:
        st.error(str(e))
        return
    state = job.progress() if job.state != "queued" else None
    label = job.state if state is None or job.state in ("queued", "cancelled") else state.state
    st.subheader(f"{job.name}: {label}")
    if on_team:
        tries = f", attempt {len(job.attempts)}" if len(job.attempts) > 1 else ""
        st.caption(f"team job, queued by {job.submitted_by}"
                   + (f"; {'runs' if job.state == 'running' else 'ran'} on {job.machine}{tries}" if job.machine else "")
                   + f"; run folder {job.run_dir}")
    if job.state == "queued":
        st.info("Waiting for a worker to take it: `lora-studio worker` on a machine that sees the team's "
                "shared path." if on_team else "Waiting for the jobs before it to finish.")
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
        checkpoints_section(job.run_dir)
    c1, c2, _ = st.columns([1, 1, 4])
    if not job.finished and c1.button("Cancel", key=f"cancel-{job.id}"):
        with reported("Cancel"):
            (team.cancel if on_team else jobs.cancel)(job.id)  # a team job: its worker stops, wherever it runs
            st.rerun(scope="app")
    resumable = ("stopped", "failed", "cancelled") if on_team else ("stopped", "failed")
    if job.state in resumable and c2.button("Resume", key=f"resume-{job.id}"):
        with reported("Resume"):
            if on_team:
                team.resume(job.id)  # the same job, queued again: a worker resumes it from its checkpoint
            else:
                st.session_state["train_job"] = jobs.resume(job.id).id
            st.rerun(scope="app")
    with st.expander("Log"):
        st.code(job.log_tail() or "(empty)", language=None)
    if job.finished and st.session_state.get(f"seen-end-{job.id}") is False:
        st.session_state[f"seen-end-{job.id}"] = True
        st.rerun(scope="app")  # the run ended while polling: refresh the queue table above
    if not job.finished:
        st.session_state[f"seen-end-{job.id}"] = False


# Poll only while something can change; a finished job's view is drawn once.
st.fragment(run_every=None if listed[job_key].finished else POLL)(_job_view)(job_key)
