"""The Datasets page: pick or upload a dataset, edit captions in place, check it, preview buckets and crops.

Widgets only: uploads, captions and previews are ``studio.app.dataset_files``; the report is
``trainer.data.check_dataset`` (``lora-studio datasets check``). Every folder shown, chosen or typed,
must lie under the data roots (``studio.core.settings.check_data_path``); its listing is bounded and read
once per few seconds (``studio.app.ui.common.dataset_images``).
"""

from __future__ import annotations

import streamlit as st

from studio.app import dataset_files
from studio.app.ui.common import dataset_images, enlarged, forget_listings, reported
from studio.core.errors import StudioError
from trainer.config import base_model_defaults

PAGE_SIZE = 24
TYPE_A_PATH = "(type a folder path)"

st.title("Datasets")

# ---- upload ------------------------------------------------------------------------------------
with st.expander("Upload images, captions or a zip into the studio's dataset area",
                 expanded=not dataset_files.list_datasets()):
    with st.form("upload", clear_on_submit=True):
        new_name = st.text_input("Dataset name", key="ds_new_name",
                                 help="a folder under $LORA_STUDIO_HOME/datasets; letters, digits, '-', '_', '.'")
        uploads = st.file_uploader("Files", accept_multiple_files=True, key="ds_upload",
                                   type=["png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "txt",
                                         "caption", "zip"],
                                   help="images with same-name .txt captions, or one zip (kohya repeat folders "
                                        "such as 10_mystyle/ are kept)")
        add = st.form_submit_button("Add to dataset", type="primary")
    if add:
        with reported("Upload"), st.spinner("Checking and saving the files..."):
            report = dataset_files.add_files(new_name.strip(), [(f.name, f.getvalue()) for f in uploads or []])
            st.session_state["ds_source"] = new_name.strip()  # show what was just uploaded
            st.success(f"{len(report.added)} file(s) added to {report.folder}"
                       + (f", {len(report.unchanged)} already there" if report.unchanged else ""))
            for shown, why in report.skipped:
                st.warning(f"{shown}: {why}")

# ---- choose ------------------------------------------------------------------------------------
known = dataset_files.list_datasets()
labels = [label for label, _ in known] + [TYPE_A_PATH]
if st.session_state.get("ds_source") not in labels:
    st.session_state.pop("ds_source", None)  # a dataset deleted on disk since the last run
c1, c2 = st.columns([1, 2])
choice = c1.selectbox("Dataset", labels, key="ds_source")
typed = c2.text_input("Folder path", key="ds_path", disabled=choice != TYPE_A_PATH,
                      help="a folder of images under $LORA_STUDIO_HOME, the sample datasets or a folder listed in "
                           "LORA_STUDIO_DATA_ROOTS (the studio reads it, and writes only captions)")
folder = dict(known).get(choice) if choice != TYPE_A_PATH else (typed.strip() or None)
if folder is None:
    st.info("Choose a dataset, or type the path of a folder of images.")
    st.stop()

from trainer.data import LAYOUTS, check_dataset, detect_layout  # noqa: E402  (after st.stop: only pages that show a dataset)

try:
    # Checked against the data roots (a symlink is judged by where it points), bounded, cached.
    folder, images = dataset_images(folder)
    layout = detect_layout(folder)
except StudioError as e:  # a missing folder, or one outside the roots: say so and keep the page
    st.error(str(e))
    st.stop()
total = len(images)
st.caption(f"{folder} · layout: {layout} ({LAYOUTS.get(layout, '')}) · {total} image(s)")
editable = layout in ("folder", "kohya")

tab_grid, tab_check, tab_crop = st.tabs(["Images and captions", "Check", "Buckets and crops"])

# ---- thumbnails and captions -------------------------------------------------------------------
with tab_grid:
    pages = max(1, -(-total // PAGE_SIZE))
    page = st.number_input("Page", min_value=1, max_value=pages, value=1, key="ds_page") if pages > 1 else 1
    shown = images[(page - 1) * PAGE_SIZE:page * PAGE_SIZE]
    if not shown:
        st.info("No images in this folder yet: upload some above.")
    if not editable and shown:
        st.info(f"Captions of a {layout} dataset live in its metadata file, not in .txt sidecars: they are shown "
                "read-only here.")
    with st.form("captions"):
        cols = st.columns(6)
        edits = []
        for i, item in enumerate(shown):
            with cols[i % len(cols)]:
                thumb = enlarged(item.path, 96)
                if thumb is not None:
                    st.image(thumb, caption=item.rel)
                new = st.text_input("Caption", value=item.caption, key=f"caption-{item.rel}",
                                    label_visibility="collapsed", disabled=not editable)
                edits.append((item, new))
        save = st.form_submit_button("Save captions", disabled=not editable or not shown)
    if save:
        changed = [(item, new) for item, new in edits if new.strip() != item.caption]
        with reported("Saving captions"):
            try:
                for item, new in changed:
                    dataset_files.write_caption(item.path, new)
            finally:
                forget_listings()  # the next run reads the captions just written
            st.success(f"saved {len(changed)} caption(s)" if changed else "no caption changed")

# ---- check report --------------------------------------------------------------------------------
with tab_check:
    c1, c2, c3 = st.columns(3)
    resolution = c1.number_input("Resolution (0 = base model's)", min_value=0, max_value=4096, value=0, step=8,
                                 key="ds_resolution")
    step = c2.number_input("Bucket step (0 = base model's)", min_value=0, max_value=256, value=0, key="ds_step")
    if c3.button("Check dataset", type="primary", key="ds_check"):
        with reported("Checking the dataset"), st.spinner("Decoding every image..."):
            st.session_state["ds_report"] = check_dataset(folder, resolution=int(resolution) or None,
                                                          bucket_step=int(step) or None)
    report = st.session_state.get("ds_report")
    if report is not None and report.path == str(folder):
        m = st.columns(5)
        m[0].metric("Images", report.image_count)
        m[1].metric("Usable", report.usable_count)
        m[2].metric("Samples per epoch", report.samples_per_epoch)
        m[3].metric("Caption coverage", f"{report.caption_coverage:.0%}")
        m[4].metric("Skipped", len(report.bad_files))
        if report.bad_files:
            st.error("Images the trainer will skip:")
            st.dataframe([{"file": b.path, "reason": b.reason} for b in report.bad_files], hide_index=True)
        else:
            st.success("every image is usable")
        if report.ignored_files:
            st.warning(f"{len(report.ignored_files)} file(s) ignored by the {report.layout} layout")
            st.dataframe([{"file": b.path, "reason": b.reason} for b in report.ignored_files], hide_index=True)
        if report.duplicates:
            st.warning(f"{len(report.duplicates)} group(s) of identical images")
            st.dataframe([{"files": ", ".join(g)} for g in report.duplicates], hide_index=True)
        c1, c2 = st.columns(2)
        c1.subheader("Buckets")
        c1.bar_chart({"images": report.buckets}, horizontal=True)
        c2.subheader("Tag frequency")
        tags = [{"folder": f, "tag": t, "count": n} for f, counts in report.tag_frequency.items()
                for t, n in sorted(counts.items(), key=lambda kv: -kv[1])[:30]]
        c2.dataframe(tags, hide_index=True)
        for note in report.notes:
            st.caption(note)

# ---- bucket / crop preview -----------------------------------------------------------------------
with tab_crop:
    all_images = images[:500]
    if not all_images:
        st.info("No images to preview.")
    else:
        facts = base_model_defaults("tiny")
        c1, c2, c3 = st.columns(3)
        picked = c1.selectbox("Image", [i.rel for i in all_images], key="crop_image")
        res = c2.number_input("Resolution", min_value=8, max_value=4096, value=facts["native_resolution"],
                              step=8, key="crop_resolution")
        grid = c3.number_input("Bucket step", min_value=4, max_value=256, value=facts["latent_granularity"],
                               key="crop_step")
        item = next(i for i in all_images if i.rel == picked)
        with reported("Preview"):
            preview = dataset_files.crop_preview(item.path, resolution=int(res), bucket_step=int(grid))
            a, b = st.columns(2)
            a.image(enlarged(preview.original, 256),
                    caption=f"original {preview.size[0]}x{preview.size[1]}; kept region outlined")
            b.image(enlarged(preview.sample, 256), caption=f"what the trainer sees: bucket "
                                                           f"{preview.bucket[0]}x{preview.bucket[1]}")
