"""A run's checkpoints on the Train page: which checkpoint, at which strength, to keep.

Widgets only: the candidates, their losses and the best one come from ``studio.app.runs`` (``lora-studio
runs show``); registering one is ``studio.app.runs.register_checkpoint`` (``runs register``); the grid is
``studio.generation.grid.render_grid`` with a checkpoint axis (``lora-studio grid --x checkpoint=RUN``),
made from a validation sample's own recipe so its cells are the run's samples at other weights.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import streamlit as st

from studio.app.runs import checkpoint_axis, register_checkpoint, run_summary, runs_root
from studio.app.ui.common import enlarged, get_registry, reported
from studio.core.errors import InvalidRequestError
from studio.core.settings import get_settings
from studio.generation.grid import GridAxis, render_grid
from studio.generation.recipes import read_recipe

DEFAULT_STRENGTHS = "0.5, 0.75, 1"
TENSORBOARD_URL = "http://127.0.0.1:6006"


def _strengths(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidRequestError(f"strengths {text!r} must be numbers separated by commas, e.g. 0.5, 1") from None
    if not values:
        raise InvalidRequestError("give at least one strength, e.g. 0.5, 1")
    return values


def checkpoints_section(run_dir: str | Path) -> None:
    """The run's candidates (step, losses, the lowest validation loss marked), one-click registration of
    any of them, a checkpoint x strength grid, and where its TensorBoard curves are."""
    summary = run_summary(run_dir)
    run = summary.run
    st.caption(f"TensorBoard: `tensorboard --logdir {runs_root()}` shows loss, learning rate, validation loss and "
               f"samples of every run (this one is `{run}`), then open [{TENSORBOARD_URL}]({TENSORBOARD_URL}).")
    if not summary.candidates:
        return
    st.markdown("**Checkpoints**: every checkpoint step keeps its adapter; compare them and register the one to keep")
    st.dataframe([{"step": c.step, "kind": "final" if c.final else "checkpoint",
                   "training loss": c.loss, "validation loss": c.val_loss,
                   "best": "★ lowest validation loss" if c.best else "", "registered": c.ref or ""}
                  for c in summary.candidates], hide_index=True)
    steps = [c.step for c in summary.candidates]
    best = summary.best
    labels = {c.step: f"step {c.step}" + (" (final)" if c.final else "") + (" ★" if c.best else "")
              for c in summary.candidates}
    c1, c2, c3 = st.columns([1, 2, 1])
    step = c1.selectbox("Checkpoint", steps, index=steps.index(best.step) if best else len(steps) - 1,
                        format_func=labels.get, key=f"ck-step-{run}")
    name = c2.text_input("Register as", value=summary.name, key=f"ck-name-{run}",
                         help="an adapter name: the checkpoint becomes its next version")
    c3.write("")  # aligns the button with the inputs
    if c3.button("Register", key=f"ck-register-{run}"):
        with reported("Register"):
            result = register_checkpoint(get_registry(), run_dir, step, name=name)
            st.success(f"registered {result.version.ref} from step {step}" if result.created
                       else f"step {step} is {result.version.ref} already")

    g1, g2 = st.columns([3, 1])
    strengths = g1.text_input("Strengths", value=DEFAULT_STRENGTHS, key=f"ck-strengths-{run}",
                              help="the grid's rows; its columns are the checkpoints")
    g2.write("")
    if g2.button("Checkpoint x strength grid", key=f"ck-grid-{run}"):
        with reported("Grid"):
            sample = next((p for c in summary.candidates for p in c.samples if p.is_file()), None)
            if sample is None:
                raise InvalidRequestError("this run has no validation samples to take a prompt and settings from: "
                                          "use lora-studio grid PROMPT --x checkpoint=" + run)
            files, names = checkpoint_axis(run_dir)
            request = replace(read_recipe(sample), adapters=[], num_images=1)
            x = GridAxis(kind="checkpoint", values=tuple(files), labels=tuple(names))
            y = GridAxis(kind="strength", values=_strengths(strengths))
            bar = st.progress(0.0, text="Rendering the grid...")
            grid = render_grid(request, x, y, out_dir=get_settings().outputs_dir / "grids", stem=f"{run}-checkpoints",
                               progress=lambda done, total: bar.progress(done / total, text=f"cell {done}/{total}"))
            bar.empty()
            st.session_state[f"ck-grid-path-{run}"] = str(grid.grid_path)
    shown = st.session_state.get(f"ck-grid-path-{run}")
    if shown and Path(shown).is_file():
        st.image(enlarged(shown, 512), caption=f"{Path(shown).name}: checkpoints x strengths")
