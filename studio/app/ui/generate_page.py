"""The Generate page: base model, an adapter stack from the catalog (strengths, per-component strengths,
order), trigger words, sampling settings in; a gallery of images with their recipes out; recipes
loaded back from a PNG.

Widgets only: Generate submits the request to the studio's one generation queue
(``studio.generation.queue``, shared by every session; its worker runs ``studio.generation.run`` on a
pipeline from the library's small LRU), and a fragment shows the queue position, a progress bar per
image and a Cancel button until the images join the gallery; adapters come from ``adapters.registry``
and are applied by ``adapters.compose`` inside the run; uploads are stored by
``store_input_image``, grid axes parsed by ``GridAxis.parse``, and a loaded recipe becomes form
values through ``studio.app.ui.recipes`` (refused when the widgets cannot hold it). A base model typed
as a path must lie under the data roots (``studio.core.base_models.check_base_model``).
The stack's rows live in session state (an id, the reference, its trigger words; strengths in their
widgets); every change goes through a button callback, so it happens before the widgets are drawn and
nothing the user typed is lost. The rows and their widgets become ``AdapterSpec`` entries once, when a
request is made (:func:`_stack_specs`).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import random
import tempfile
from pathlib import Path

import streamlit as st

from adapters.compose import AdapterSpec
from adapters.merge import METHODS, merge_adapters
from studio.app.runs import parse_checkpoint_axis
from studio.app.ui import recipes
from studio.app.ui.common import enlarged, generation_queue, get_registry, png_bytes, queue_session, reported
from studio.core.base_models import check_base_model, resolve
from studio.core.errors import RecipeError, RecipeTooCostlyError, StudioError
from studio.core.families import get_family
from studio.core.settings import check_data_path, get_settings
from studio.generation.grid import AXIS_KINDS, GridAxis, render_grid
from studio.generation.inputs import MAX_INPUT_PIXELS, bounded_open, mask_from_drawing, store_input_image
from studio.generation.queue import DONE, FAILED, QUEUED
from studio.generation.recipes import MAX_RECIPE_COST, check_recipe_cost, read_recipe, recipe_cost
from studio.generation.requests import DEFAULT_SCHEDULER, MAX_SEED, GenerationRequest, scheduler_names

GALLERY_SIZE = 24
CANVAS_SIDE = 320  # the mask canvas's longer side in screen pixels: a 32-pixel tiny image is drawn on enlarged
_ids = itertools.count()


def _stack() -> list[dict]:
    return st.session_state.setdefault("stack", [])


# ---- callbacks: they run before the script, so they may set widget values ------------------------


def _add_adapter(ref: str, trigger_words: tuple[str, ...] = ()) -> None:
    ref = (ref or "").strip()
    if not ref:
        st.session_state["stack_msg"] = "choose an adapter from the catalog, or type a reference such as name@2"
        return
    if any(e["ref"] == ref for e in _stack()):
        st.session_state["stack_msg"] = f"{ref} is already in the stack: change its strength instead"
        return
    entry_id = f"a{next(_ids)}-{len(_stack())}"
    _stack().append({"id": entry_id, "ref": ref, "trigger_words": list(trigger_words)})
    st.session_state[f"w-{entry_id}"] = 1.0


def _move(i: int, by: int) -> None:
    stack = _stack()
    j = i + by
    if 0 <= j < len(stack):
        stack[i], stack[j] = stack[j], stack[i]


def _remove(i: int) -> None:
    _stack().pop(i)


def _insert_trigger(word: str) -> None:
    prompt = st.session_state.get("prompt", "")
    if word.lower() not in prompt.lower():
        st.session_state["prompt"] = f"{word}, {prompt}" if prompt.strip() else word


def _random_seed() -> None:
    st.session_state["seed"] = str(random.randint(0, MAX_SEED - 16))


def _read_recipe_upload(notes: list[str] | None = None):
    """The request in the dropped PNG (the studio's, or A1111's/Civitai's on the form's base model, what
    could not be mapped appended to ``notes``); any failure (a damaged chunk, JSON nested 100,000 deep, a
    PNG claiming 100000x100000 pixels) is a RecipeError with one line, never an exception in the page."""
    upload = st.session_state.get("recipe_png")
    if upload is None:
        raise RecipeError("drop a PNG made by the studio, A1111 or Civitai first")
    with tempfile.TemporaryDirectory(prefix="lora-studio-recipe-") as tmp:
        path = Path(tmp) / "recipe.png"
        path.write_bytes(upload.getvalue())
        try:
            return read_recipe(path, base_model=(st.session_state.get("base") or "tiny").strip(), notes=notes)
        except StudioError:
            raise
        except Exception as e:  # RecursionError, DecompressionBombError, ...: the file is not a usable recipe
            first = str(e).splitlines()[0] if str(e) else ""
            raise RecipeError(f"{upload.name} is not a usable recipe PNG ({type(e).__name__}: {first[:200]}): "
                              f"drop a PNG the studio wrote") from None


def _apply_recipe(confirmed: bool = False) -> None:
    # A callback: it runs before the widgets are drawn, so it may set their values; an exception
    # here would escape the page, so every failure becomes the message shown under the button.
    notes: list[str] = []
    try:
        request = _read_recipe_upload(notes)
        values = recipes.form_values(request)
        check_recipe_cost(request, confirmed=confirmed)
    except RecipeTooCostlyError:
        # The library's message speaks of the CLI's --yes; the page asks with a button instead.
        st.session_state["recipe_msg"] = ("confirm", (
            f"This recipe asks for {recipe_cost(request) / 1e6:,.0f} M pixel-steps (steps x width x height x images), "
            f"more than the {MAX_RECIPE_COST / 1e6:,.0f} M of a normal recipe: its images may take a long time. "
            f"Load it anyway?"))
        return
    except StudioError as e:
        st.session_state["recipe_msg"] = ("error", str(e))
        return
    st.session_state.update(values)
    st.session_state["stack"] = []
    for spec in request.adapters:
        # The exact version the image used: name@version when the recipe pinned it.
        _add_adapter(f"{spec.name}@{spec.version}" if spec.name and spec.version else spec.ref)
        entry = _stack()[-1]
        st.session_state[f"w-{entry['id']}"] = float(spec.weight)
        if spec.denoiser is not None or spec.text_encoders is not None:
            # form_values refused per-block weights, so the denoiser's weight is a number here
            st.session_state[f"split-{entry['id']}"] = True
            st.session_state[f"wu-{entry['id']}"] = float(spec.denoiser_weight)
            st.session_state[f"wt-{entry['id']}"] = float(spec.text_encoder_weight)
    unmapped = f"; not mapped: {'; '.join(notes)}" if notes else ""
    st.session_state["recipe_msg"] = ("success", f"loaded the recipe of seed {request.seed} "
                                                 f"({len(request.adapters)} adapter(s)){unmapped}")


def _clear_recipe_inputs() -> None:
    st.session_state["recipe_init"] = st.session_state["recipe_mask"] = None


def _init_picture():
    """The init image the form would send, decoded (an upload, else a recipe's); None when there is none."""
    upload = st.session_state.get("init_upload")
    source = upload.getvalue() if upload is not None else st.session_state.get("recipe_init")
    if not source:
        return None
    try:
        return bounded_open(io.BytesIO(source) if isinstance(source, bytes) else source, MAX_INPUT_PIXELS)
    except Exception:  # noqa: BLE001 - a broken upload is reported when the form is sent, by the library
        return None


def _mask_canvas() -> None:
    """A canvas over the init image to paint the inpainting mask on (white = repaint); an uploaded mask
    takes precedence. The drawing is kept in session state for the form to send."""
    picture = _init_picture()
    if picture is None:
        st.session_state.pop("drawn_mask", None)
        return
    from streamlit_drawable_canvas import st_canvas  # registered by the Streamlit runtime: import it on the page

    scale = CANVAS_SIDE / max(picture.size)
    width, height = max(1, round(picture.width * scale)), max(1, round(picture.height * scale))
    digest = hashlib.sha256(picture.tobytes()).hexdigest()[:12]  # a new image starts a new drawing
    b1, b2 = st.columns([1, 3])
    brush = b1.slider("Brush", 4, 64, 24, key="mask_brush", help="the width of the strokes, in canvas pixels")
    b2.caption("Or paint the mask here: white strokes are repainted, the rest is kept (an uploaded mask replaces "
               "the drawing); the toolbar under the canvas undoes and clears.")
    drawn = st_canvas(stroke_color="#ffffff", stroke_width=brush, background_image=picture.convert("RGB"),
                      width=width, height=height, drawing_mode="freedraw", return_image_data=True,
                      key=f"mask_canvas-{digest}")
    data = drawn.image_data if drawn is not None else None
    st.session_state["drawn_mask"] = (data, picture.size) if data is not None else None


def _mask_image() -> str | None:
    """The mask the form sends: an upload, else a drawing on the canvas, else a loaded recipe's."""
    if st.session_state.get("mask_upload") is None and st.session_state.get("drawn_mask"):
        mask = mask_from_drawing(*st.session_state["drawn_mask"])
        if mask is not None:
            return str(store_input_image(mask))
    return _input_image("mask_upload", "recipe_mask")


def _input_image(upload_key: str, recipe_key: str) -> str | None:
    """An upload (checked and stored by content hash by the library: recipes pin the hash), else
    the input a loaded recipe restored, else None."""
    upload = st.session_state.get(upload_key)
    if upload is not None:
        return str(store_input_image(upload.getvalue()))
    return st.session_state.get(recipe_key)


def _parse_axis(kind: str, text: str):
    # The CLI's --x/--y form, so the page and `lora-studio grid` read values the same way.
    if kind == "checkpoint":  # a run's name, or paths: a typed path must lie under the data roots
        run = text.partition(":")[0].strip()
        for path in [run] if not run.endswith(".safetensors") else text.split(","):
            if "/" in path:
                check_data_path(path.strip(), what="checkpoint axis' run or file")
    return GridAxis.parse(f"{kind}={text}", checkpoints=parse_checkpoint_axis)


def _stack_specs() -> list[AdapterSpec]:
    """The stack's rows and their strength widgets as the request's entries (the denoiser's and the text
    encoders' strengths when the row is split)."""
    out = []
    for e in _stack():
        weight = float(st.session_state.get(f"w-{e['id']}", 1.0))
        if st.session_state.get(f"split-{e['id']}"):
            out.append(AdapterSpec(e["ref"], weight, denoiser=float(st.session_state.get(f"wu-{e['id']}", weight)),
                                   text_encoders=float(st.session_state.get(f"wt-{e['id']}", weight))))
        else:
            out.append(AdapterSpec(e["ref"], weight))
    return out


def _denoiser_label() -> str:
    """What the base model's family calls its denoiser ("UNet" for SD-1), to label its strength; "denoiser"
    while the base-model field names nothing the studio resolves."""
    try:
        return get_family(resolve(check_base_model(st.session_state.get("base") or "tiny")).family).denoiser_label
    except StudioError:
        return "denoiser"


# ---- the session's jobs in the studio's generation queue --------------------------------------------


def _collect_finished_jobs() -> None:
    """Move this session's finished jobs into the gallery (or their error into a message)."""
    jobs = st.session_state.get("jobs", [])
    for job in [j for j in jobs if j.finished]:
        jobs.remove(job)
        if job.state == DONE:
            st.session_state["last_result"] = job.result
            gallery = st.session_state.setdefault("gallery", [])
            gallery[:0] = job.result.outputs  # newest first
            del gallery[GALLERY_SIZE:]
        elif job.state == FAILED:
            st.session_state.setdefault("job_errors", []).append(job.error)
        else:
            st.session_state.setdefault("job_notes", []).append(
                f"cancelled: {job.request.num_images} image(s) of {job.request.prompt[:60]!r}")


def _job_status(job) -> None:
    queue = generation_queue()
    seed, n = job.request.seed, job.request.num_images
    what = f"{n} image(s) of {job.request.prompt[:60]!r}"
    with st.container(border=True):
        c1, c2 = st.columns([5, 1])
        if job.state == QUEUED:
            ahead = queue.position(job)
            where = "next" if not ahead else f"{ahead} request(s) ahead of yours"
            c1.markdown(f"**Queued** ({where}): {what}")
        else:
            shared = f", sharing its batches with {job.shared_with} other request(s)" if job.shared_with else ""
            c1.markdown(f"**Running**{shared}: {what}")
        c2.button("Cancel", key=f"cancel-{job.id}", on_click=queue.cancel, args=(job,),
                  disabled=job.cancel_requested)
        for i, fraction in enumerate(job.image_fractions()):
            label = f"seed {seed + i}" if seed is not None else f"image {i + 1}"
            steps = f"step {job.image_steps[i]}/{job.steps}" if job.steps else "waiting"
            st.progress(fraction, text=f"Image {i + 1} of {n} ({label}): {steps}")


def _jobs_panel() -> None:
    """Queue position, a progress bar per image and a Cancel button for each of this session's jobs.
    A fragment that reruns alone twice a second while a job is open; the whole page reruns when one
    finishes, so its images join the gallery."""
    if not st.session_state.get("jobs"):
        return

    @st.fragment(run_every=0.5)
    def panel() -> None:
        jobs = st.session_state.get("jobs", [])
        if any(job.finished for job in jobs):
            st.rerun(scope="app")
        for job in jobs:
            _job_status(job)

    panel()


# ---- page ----------------------------------------------------------------------------------------
# Form defaults live in session state (not in value=), so recipe loading and trigger-word buttons can
# change them without Streamlit's "default value and Session State" conflict.
for _key, _default in {"prompt": "a red circle on a blue background", "negative": "", "base": "tiny",
                       "scheduler": DEFAULT_SCHEDULER, "steps": 20, "guidance": 0.0, "seed": "1", "num_images": 2,
                       "width": 0, "height": 0, "strength": 0.75, "recipe_init": None, "recipe_mask": None,
                       "recipe_batch": None}.items():
    st.session_state.setdefault(_key, _default)

st.title("Generate")
_collect_finished_jobs()
tab_make, tab_grid, tab_recipe = st.tabs(["Generate", "X/Y grid", "Load recipe from a PNG"])

with tab_recipe:
    st.file_uploader("A PNG made by the studio, A1111 or Civitai (its recipe is inside)", type=["png"],
                     key="recipe_png")
    st.button("Use its settings", key="recipe_apply", on_click=_apply_recipe)
    if msg := st.session_state.pop("recipe_msg", None):
        if msg[0] == "confirm":
            st.warning(msg[1])
            st.button("Load it anyway", key="recipe_confirm", on_click=_apply_recipe, kwargs={"confirmed": True})
        else:
            (st.error if msg[0] == "error" else st.success)(msg[1])

with tab_make:
    # -- adapter stack (outside the form: its buttons act at once) --
    with st.container(border=True):
        st.markdown("**Adapter stack**")
        reg = get_registry()
        c1, c2, c3 = st.columns([2, 3, 1])
        find = c1.text_input("Find in the catalog", key="stack_search", placeholder="name or description")
        with reported("Searching the catalog"):
            found = reg.list_versions(search=find or None, latest_only=True, limit=50).items
        options = {f"{v.name}@{v.number}": v for v in found}
        pick = c2.selectbox("Adapter", list(options), key="stack_pick", index=None,
                            placeholder="choose an adapter" if options else "the catalog is empty",
                            format_func=lambda r: r + (f"  ({', '.join(options[r].trigger_words)})"
                                                       if options[r].trigger_words else ""))
        def _add_picked() -> None:
            ref = st.session_state.get("stack_pick") or ""
            _add_adapter(ref, options[ref].trigger_words if ref in options else ())
            st.session_state["stack_pick"] = None  # ready for the next one

        c3.button("Add", key="stack_add", on_click=_add_picked)
        if msg := st.session_state.pop("stack_msg", None):
            st.warning(msg)
        denoiser = _denoiser_label() if _stack() else ""
        for i, e in enumerate(_stack()):
            c = st.columns([2, 3, 1, 0.5, 0.5, 0.5])
            c[0].markdown(f"`{e['ref']}`")
            c[1].slider("strength", *recipes.WEIGHT, step=0.05, key=f"w-{e['id']}", label_visibility="collapsed")
            c[2].checkbox(f"{denoiser} / text encoder", key=f"split-{e['id']}",
                          help=f"separate strengths for the {denoiser} and the text encoder(s) (ComfyUI's "
                               f"model/clip)")
            c[3].button("↑", key=f"up-{e['id']}", on_click=_move, args=(i, -1), disabled=i == 0)
            c[4].button("↓", key=f"down-{e['id']}", on_click=_move, args=(i, 1), disabled=i == len(_stack()) - 1)
            c[5].button("✕", key=f"rm-{e['id']}", on_click=_remove, args=(i,))
            if st.session_state.get(f"split-{e['id']}"):
                s1, s2 = st.columns(2)
                weight = st.session_state.get(f"w-{e['id']}", 1.0)
                st.session_state.setdefault(f"wu-{e['id']}", weight)
                st.session_state.setdefault(f"wt-{e['id']}", weight)
                s1.slider(f"{denoiser} strength", *recipes.WEIGHT, step=0.05, key=f"wu-{e['id']}")
                s2.slider("text-encoder strength", *recipes.WEIGHT, step=0.05, key=f"wt-{e['id']}")
            if e["trigger_words"]:
                tw = st.columns(min(6, len(e["trigger_words"])) + 1)
                tw[0].caption("insert:")
                for k, word in enumerate(e["trigger_words"][:6]):
                    tw[k + 1].button(word, key=f"tw-{e['id']}-{k}", on_click=_insert_trigger, args=(word,))

    with st.expander("Merge this stack into a new adapter"):
        m1, m2, m3 = st.columns([2, 1, 1])
        merge_name = m1.text_input("New adapter name", key="merge_name")
        merge_method = m2.selectbox("Method", METHODS, key="merge_method",
                                    help="peft combination_type: linear needs equal ranks; cat is exact")
        if m3.button("Merge", key="merge_go"):
            with reported("Merge"), st.spinner("Merging..."):
                merged = merge_adapters(reg, [(spec.ref, spec.weight) for spec in _stack_specs()],
                                        method=merge_method, name=merge_name.strip())
                st.success(f"merged into {merged.ref}; it is in the catalog")
    with st.expander("img2img and inpainting", expanded=bool(st.session_state.get("recipe_init"))):
        i1, i2, i3 = st.columns(3)
        i1.file_uploader("Init image", type=["png", "jpg", "jpeg", "webp"], key="init_upload")
        i2.file_uploader("Mask (white = repaint)", type=["png", "jpg", "jpeg", "webp"], key="mask_upload")
        i3.slider("Strength (denoising)", *recipes.STRENGTH, step=0.05, key="strength",
                  help="how much of the init image is re-noised; 1 ignores it")
        _mask_canvas()
        if st.session_state.get("recipe_init"):
            # Restored by "Use its settings"; an upload above replaces the one beside it.
            r1, r2, r3 = st.columns(3)
            r1.image(enlarged(st.session_state["recipe_init"], 96), caption="init image from the recipe")
            if st.session_state.get("recipe_mask"):
                r2.image(enlarged(st.session_state["recipe_mask"], 96), caption="mask from the recipe")
            r3.button("Clear the recipe's images", key="recipe_inputs_clear", on_click=_clear_recipe_inputs)
    c5, c6 = st.columns([4, 1])
    c6.button("🎲 Random seed", key="seed_random", on_click=_random_seed, help="puts a random seed in the box")
    with st.form("generate"):
        prompt = st.text_area("Prompt", key="prompt", height=80,
                              help="A1111 tags such as <lora:NAME:0.8> add that adapter to the stack the images use "
                                   "(by registry name, alias, hash or imported file name) and leave the text")
        negative = st.text_input("Negative prompt", key="negative")
        c1, c2, c3, c4 = st.columns(4)
        base = c1.text_input("Base model", key="base",
                             help="tiny (embedded), a local diffusers folder, a .safetensors checkpoint, or a Hub id")
        scheduler = c2.selectbox("Sampler", scheduler_names(), key="scheduler")
        steps = c3.number_input("Steps", min_value=recipes.STEPS[0], max_value=recipes.STEPS[1], key="steps")
        guidance = c4.number_input("CFG scale (0 = model default)", min_value=recipes.GUIDANCE[0],
                                   max_value=recipes.GUIDANCE[1],
                                   step=0.5, key="guidance",
                                   help="classifier-free guidance; 0 uses the base model's recommendation "
                                        "(tiny: 2, SD-1: 7.5)")
        c5, c6, c7, c8 = st.columns(4)
        seed_text = c5.text_input("Seed", key="seed", help="a whole number, or empty for a random seed "
                                                                      "(the seed used is shown with the images)")
        num_images = c6.number_input("Images", min_value=recipes.IMAGES[0], max_value=recipes.IMAGES[1],
                                     key="num_images", help="variations: image i uses seed + i")
        width = c7.number_input("Width (0 = native)", min_value=recipes.SIDE[0], max_value=recipes.SIDE[1], step=8,
                                key="width")
        height = c8.number_input("Height (0 = native)", min_value=recipes.SIDE[0], max_value=recipes.SIDE[1],
                                 step=8, key="height")
        submitted = st.form_submit_button("Generate", type="primary")

    if submitted:
        try:
            seed = int(seed_text) if seed_text.strip() else None
        except ValueError:
            st.error(f"Seed {seed_text!r} is not a whole number: type one, or leave it empty for a random seed.")
            st.stop()
        with reported("Generation"):
            init_image = _input_image("init_upload", "recipe_init")
            request = GenerationRequest(
                prompt=prompt, negative_prompt=negative, num_inference_steps=int(steps),
                guidance_scale=float(guidance) or None,
                width=int(width) or None, height=int(height) or None, seed=seed, num_images=int(num_images),
                scheduler=scheduler, base_model=check_base_model(base.strip() or "tiny"), adapters=_stack_specs(),
                init_image=init_image,
                mask_image=_mask_image(),
                strength=float(st.session_state["strength"]) if init_image else None,
            )
            request = recipes.batch_for(request, st.session_state.get("recipe_batch"))
            st.session_state.setdefault("jobs", []).append(generation_queue().submit(request, queue_session()))

    _jobs_panel()

    for message in st.session_state.pop("job_errors", []):
        st.error(message)
    for message in st.session_state.pop("job_notes", []):
        st.info(message)
    result = st.session_state.get("last_result")
    if result is not None:
        st.success(f"{len(result.outputs)} image(s) in {result.seconds:.2f} s, seed {result.request.seed}")
    gallery = st.session_state.get("gallery", [])
    if gallery:
        st.subheader("Results")
        cols = st.columns(4)
        for i, out in enumerate(gallery):
            with cols[i % len(cols)]:
                st.image(enlarged(out.image, 192), caption=f"seed {out.seed}")
                stem = f"lora-studio-{out.seed}-{i}"
                st.download_button("Download PNG", data=png_bytes(out.image, out.pnginfo()), file_name=f"{stem}.png",
                                   mime="image/png", key=f"download-{i}")
                with st.expander("Recipe"):
                    st.code(out.parameters, language=None)
                    if out.request.adapters:
                        st.markdown("Adapters: " + ", ".join(
                            f"`{a.name or a.ref}@{a.version if a.version is not None else '?'}:{a.weight:g}`"
                            for a in out.request.adapters))

with tab_grid:
    st.caption("Uses the prompt, settings and adapter stack of the Generate tab; strength, version and checkpoint "
               "axes vary the first adapter of the stack (checkpoints: a training run's name, or RUN:100,200,final). "
               "Prompts are separated by |, other values by commas.")
    g1, g2, g3, g4 = st.columns([1, 2, 1, 2])
    x_kind = g1.selectbox("X axis", AXIS_KINDS, key="grid_x_kind")
    x_text = g2.text_input("X values", key="grid_x_values", placeholder="0, 0.5, 1")
    y_kind = g3.selectbox("Y axis", ["none", *AXIS_KINDS], key="grid_y_kind")
    y_text = g4.text_input("Y values", key="grid_y_values")
    if st.button("Render grid", type="primary", key="grid_go"):
        with reported("Grid"):
            ss = st.session_state
            request = GenerationRequest(
                prompt=ss["prompt"], negative_prompt=ss["negative"], num_inference_steps=int(ss["steps"]),
                guidance_scale=float(ss["guidance"]) or None, width=int(ss["width"]) or None,
                height=int(ss["height"]) or None, seed=int(ss["seed"]) if str(ss["seed"]).strip().isdigit() else None,
                scheduler=ss["scheduler"], base_model=check_base_model(ss["base"].strip() or "tiny"),
                adapters=_stack_specs())
            x = _parse_axis(x_kind, x_text)
            y = None if y_kind == "none" else _parse_axis(y_kind, y_text)
            bar = st.progress(0.0, text="Rendering the grid...")
            grid = render_grid(request, x, y, out_dir=get_settings().outputs_dir / "grids",
                               progress=lambda done, total: bar.progress(done / total, text=f"cell {done}/{total}"))
            bar.empty()
            st.session_state["grid_path"] = str(grid.grid_path)
    if st.session_state.get("grid_path"):
        path = Path(st.session_state["grid_path"])
        st.image(enlarged(path, 512), caption=path.name)
        st.download_button("Download grid PNG", data=path.read_bytes(), file_name=path.name, mime="image/png",
                           key="grid_download")
