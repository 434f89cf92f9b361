"""The Generate page: prompt, base model and sampling settings in; images with their recipes out."""

from __future__ import annotations

import io

import streamlit as st
from PIL import Image

from studio.errors import StudioError
from studio.generate import DEFAULT_SCHEDULER, GenerationRequest, scheduler_names


@st.cache_resource(show_spinner=False)
def _pipeline(base: str):
    # One pipeline per base model for every session; studio.generate locks it per generation.
    from studio.base_models import load_pipeline

    return load_pipeline(base)


def _png_bytes(output) -> bytes:
    buf = io.BytesIO()
    output.image.save(buf, format="PNG", pnginfo=output.pnginfo())
    return buf.getvalue()


st.title("Generate")
with st.form("generate"):
    prompt = st.text_area("Prompt", value="a red circle on a blue background", key="prompt", height=80)
    negative = st.text_input("Negative prompt", value="", key="negative")
    c1, c2, c3, c4 = st.columns(4)
    base = c1.text_input("Base model", value="tiny", key="base",
                         help="tiny (embedded), a local diffusers folder, a .safetensors checkpoint, or a Hub id")
    scheduler = c2.selectbox("Sampler", scheduler_names(), index=scheduler_names().index(DEFAULT_SCHEDULER),
                             key="scheduler")
    steps = c3.number_input("Steps", min_value=1, max_value=150, value=20, key="steps")
    guidance = c4.number_input("CFG scale (0 = model default)", min_value=0.0, max_value=30.0, value=0.0, step=0.5,
                               key="guidance", help="classifier-free guidance; 0 uses the base model's recommendation "
                               "(tiny: 2, SD-1: 7.5)")
    c5, c6, c7, c8 = st.columns(4)
    seed_text = c5.text_input("Seed", value="1", key="seed", help="a whole number, or empty for a random seed")
    num_images = c6.number_input("Images", min_value=1, max_value=16, value=2, key="num_images")
    width = c7.number_input("Width (0 = native)", min_value=0, max_value=2048, value=0, step=8, key="width")
    height = c8.number_input("Height (0 = native)", min_value=0, max_value=2048, value=0, step=8, key="height")
    submitted = st.form_submit_button("Generate", type="primary")

if submitted:
    try:
        seed = int(seed_text) if seed_text.strip() else None
    except ValueError:
        st.error(f"Seed {seed_text!r} is not a whole number: type one, or leave it empty for a random seed.")
        st.stop()
    try:
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative, num_inference_steps=int(steps),
            guidance_scale=float(guidance) or None,
            width=int(width) or None, height=int(height) or None, seed=seed, num_images=int(num_images),
            scheduler=scheduler, base_model=base.strip() or "tiny",
        )
        from studio.base_models import model_hash, recommended_settings, resolve
        from studio.generate import generate_with_pipeline

        with st.spinner("Loading the base model..."):
            pipe = _pipeline(request.base_model)
        bar = st.progress(0.0, text="Generating...")
        resolved = resolve(request.base_model)
        result = generate_with_pipeline(
            pipe, request, model_hash=model_hash(resolved), recommended=recommended_settings(resolved),
            progress=lambda done, total: bar.progress(done / total, text=f"Step {done}/{total}"),
        )
        bar.empty()
        st.session_state["last_result"] = result
    except StudioError as e:
        st.error(str(e))
    except Exception as e:  # an unexpected failure still gets a message, never a raw traceback
        st.error(f"Generation failed: {type(e).__name__}: {e}")

result = st.session_state.get("last_result")
if result is not None:
    st.success(f"{len(result.outputs)} image(s) in {result.seconds:.2f} s, seed {result.request.seed}")
    cols = st.columns(4)
    for i, out in enumerate(result.outputs):
        with cols[i % len(cols)]:
            # Small images are shown enlarged with hard pixel edges, as they are, not blurred.
            shown = out.image
            if shown.width < 192:
                factor = max(1, 192 // shown.width)
                shown = shown.resize((shown.width * factor, shown.height * factor), Image.Resampling.NEAREST)
            st.image(shown, caption=f"seed {out.seed}")
            st.download_button("Download PNG", data=_png_bytes(out), file_name=f"lora-studio-{out.seed}.png",
                               mime="image/png", key=f"download-{i}")
            with st.expander("Recipe"):
                st.code(out.parameters, language=None)
