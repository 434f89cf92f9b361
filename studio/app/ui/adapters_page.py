"""The Adapters page: the catalog (search, filters, paged cards, the newest changes and who made them) and
one adapter's page (versions, metadata, lineage, samples, hashes, aliases, export, delete, publish, its
history), plus importing a file.

Widgets only: every action is one ``adapters.registry.Registry`` or ``adapters.ingest`` call (the
``lora-studio adapters ...`` commands). Listings are paged queries (``list_versions(limit=,
offset=)``), so a catalog of 10,000 versions costs one page of rows per rerun, never a full load.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import streamlit as st

from adapters.formats import coverage_text
from adapters.ingest import export_adapter, import_adapter
from adapters.registry import ADAPTER_TYPES, decode_sample
from studio.app.dataset_files import safe_name
from studio.app.ui.common import enlarged, get_registry, reported
from studio.core.base_models import check_base_model
from studio.core.errors import InvalidRequestError, StudioError
from studio.core.families import FAMILIES

PAGE_SIZE = 12
ANY = "any"

reg = get_registry()
st.title("Adapters")
HISTORY_ROWS = 200  # the newest events; `adapters history` prints them all
ACTIVITY_ROWS = 50  # the catalog's newest changes, under the cards

if st.session_state.get("ad_deleted"):  # set by a delete just before its rerun
    st.success(st.session_state.pop("ad_deleted"))


def _thumbnail(sample, min_side: int, what: str):
    """The sample enlarged for display, or None after a one-line note: a bad stored file (one registered
    before samples were checked, or damaged on disk) costs its card the picture, never the page."""
    try:
        return enlarged(decode_sample(sample.path, what), min_side)
    except StudioError as e:
        st.caption(f"sample not shown: {e}")
        return None


def _history_table(events, empty: str) -> None:
    """Audit events as a table, oldest first (``AuditEvent.summary`` is their one wording, as in the CLI)."""
    if events:
        st.table([{"when (UTC)": f"{e.at:%Y-%m-%d %H:%M:%S}", "who": e.actor, "what": e.summary} for e in events])
    else:
        st.info(empty)


def _open(name: str, number: int | None = None) -> None:
    st.session_state["ad_open"] = name
    st.session_state["ad_version"] = number


def _close() -> None:
    st.session_state["ad_open"] = None


# ---- import ----------------------------------------------------------------------------------
with st.expander("Import an adapter file (diffusers/peft or kohya .safetensors)"):
    with st.form("import", clear_on_submit=False):
        upload = st.file_uploader("Adapter file", type=["safetensors"], key="ad_import_file")
        c1, c2, c3 = st.columns(3)
        imp_name = c1.text_input("Name (empty = from the file)", key="ad_import_name")
        imp_trigger = c2.text_input("Trigger words (comma-separated; empty = from the file)", key="ad_import_trigger")
        imp_tags = c3.text_input("Tags (comma-separated)", key="ad_import_tags")
        imp_base = st.text_input("Base model it is for", value="tiny", key="ad_import_base")
        do_import = st.form_submit_button("Import", type="primary")
    if do_import:
        with reported("Import"):
            if upload is None:
                raise InvalidRequestError("choose a .safetensors file to import")
            base = check_base_model(imp_base.strip() or "tiny")  # a path typed here must lie under the data roots

            with tempfile.TemporaryDirectory(prefix="lora-studio-upload-") as tmp, \
                    st.spinner("Checking the file against the base model..."):
                # The upload keeps its (made safe) name: an import without a name is named after the file.
                path = Path(tmp) / safe_name(upload.name)
                path.write_bytes(upload.getvalue())
                version = import_adapter(
                    reg, path, name=imp_name.strip() or None, base=base,
                    trigger_words=[w.strip() for w in imp_trigger.split(",")] if imp_trigger.strip() else None,
                    tags=[t.strip() for t in imp_tags.split(",")] if imp_tags.strip() else None)
            st.success(f"imported {version.ref}")
            _open(version.name, version.number)

opened = st.session_state.get("ad_open")

# ---- the catalog -----------------------------------------------------------------------------
if not opened:
    c1, c2, c3, c4, c5 = st.columns([3, 1, 1, 1, 2])
    search = c1.text_input("Search names and descriptions", key="ad_search")
    family = c2.selectbox("Family", [ANY, *sorted(FAMILIES)], key="ad_family")
    kind = c3.selectbox("Type", [ANY, *ADAPTER_TYPES], key="ad_type")
    tag = c4.text_input("Tag", key="ad_tag")
    trigger = c5.text_input("Trigger word", key="ad_trigger")
    all_versions = st.toggle("Every version (not only the newest of each adapter)", key="ad_all_versions")
    filters = dict(search=search or None, tag=tag or None, trigger=trigger or None,
                   family=None if family == ANY else family, adapter_type=None if kind == ANY else kind,
                   latest_only=not all_versions)
    # A filter change starts again at page 1 (the page number of another result set means nothing).
    if st.session_state.get("ad_filters") != filters:
        st.session_state["ad_filters"] = filters
        st.session_state["ad_page"] = 1
    page_no = int(st.session_state.get("ad_page", 1))
    with reported("Listing adapters"):
        page = reg.list_versions(**filters, sort="name", limit=PAGE_SIZE, offset=(page_no - 1) * PAGE_SIZE)
        pages = max(1, -(-page.total // PAGE_SIZE))
        st.caption(f"{page.total} {'version' if all_versions else 'adapter'}(s) match; page {page_no} of {pages}")
        if not page.items:
            st.info("No adapter matches. Train one on the Train page, or import a file above.")
        cols = st.columns(4)
        for i, v in enumerate(page.items):
            with cols[i % 4].container(border=True):
                preview = _thumbnail(v.samples[0], 128, f"the sample of {v.ref}") if v.samples else None
                if preview is not None:
                    st.image(preview)
                st.markdown(f"**{v.name}**  \nv{v.number} · {v.adapter_type} · rank {v.rank or '?'} · {v.family}")
                if v.trigger_words:
                    st.caption("trigger: " + ", ".join(v.trigger_words))
                if v.tags:
                    st.caption("tags: " + ", ".join(v.tags))
                st.button("Open", key=f"open-{v.ref}", on_click=_open, args=(v.name, v.number))
        p1, p2, _ = st.columns([1, 1, 6])
        if p1.button("Previous", disabled=page_no <= 1, key="ad_prev"):
            st.session_state["ad_page"] = page_no - 1
            st.rerun()
        if p2.button("Next", disabled=not page.has_more, key="ad_next"):
            st.session_state["ad_page"] = page_no + 1
            st.rerun()
    with st.expander("Recent changes across the catalog: who did what"):
        by = st.text_input("Only the changes of (a user name; empty: everyone's)", key="ad_activity_by")
        with reported("Reading the history"):
            _history_table(reg.history(limit=ACTIVITY_ROWS, actor=by.strip() or None),
                           f"Nothing recorded{' by ' + by.strip() if by.strip() else ''} yet.")
        st.caption(f"The newest {ACTIVITY_ROWS}; deleted adapters' changes included. `lora-studio adapters history "
                   f"[NAME] [--by USER] [--action KIND]` prints the same.")
    st.stop()

# ---- one adapter -------------------------------------------------------------------------------
st.button("Back to the catalog", on_click=_close, key="ad_back")
try:
    info = reg.adapter(opened)
except Exception as e:  # deleted in another tab: back to the catalog with a message
    st.error(str(e))
    _close()
    st.stop()
numbers = list(info.versions)
wanted = st.session_state.get("ad_version")
number = st.selectbox("Version", numbers[::-1], index=numbers[::-1].index(wanted) if wanted in numbers else 0,
                      format_func=lambda n: f"v{n}" + "".join(f" @{a}" for a, m in info.aliases.items() if m == n),
                      key=f"ad_version_pick-{opened}")
v = reg.get(f"{opened}@{number}")
st.header(v.ref)
if v.description:
    st.write(v.description)

tab_info, tab_lineage, tab_samples, tab_actions, tab_history = st.tabs(
    ["Details", "Lineage", "Samples", "Aliases and actions", "History"])
with tab_info:
    rows = {
        "type": v.adapter_type, "rank": v.rank, "alpha": v.alpha, "family": v.family, "base model": v.base_model,
        "components": ", ".join(v.components), "target modules": ", ".join(v.target_modules),
        "applies to": (coverage_text(v.metrics["applies_to"]) if "applies_to" in (v.metrics or {})
                       else "not counted (registered by an older version of the studio)"),
        "trigger words": ", ".join(v.trigger_words), "tags": ", ".join(v.tags), "license": v.license,
        "author": v.author, "origin": v.origin, "created": v.created_at.isoformat(timespec="seconds"),
        "size": f"{v.size_bytes:,} bytes", "sha256": v.weights_sha256, "tensor sha256 (sshs_model_hash)":
        v.tensor_sha256, "AutoV2 (Civitai)": v.autov2, "A1111 legacy hash": v.a1111_legacy,
    }
    st.table([{"field": k, "value": "" if val is None else str(val)} for k, val in rows.items()])
    if v.metrics:
        st.json(v.metrics, expanded=False)
    with st.expander(f"safetensors metadata ({len(v.safetensors_metadata)} keys)"):
        st.json(v.safetensors_metadata, expanded=False)
with tab_lineage:
    if v.parents:
        st.write("Parents: " + ", ".join(f"{p.ref}{'' if p.present else ' (deleted)'}" for p in v.parents))
    else:
        st.write("No parent versions.")
    children = reg.children(v.ref)
    if children:
        st.write("Children: " + ", ".join(c.ref for c in children))
    st.write(f"Dataset fingerprint: {v.dataset_fingerprint or 'not recorded (not trained here)'}")
    if v.source:
        st.json(v.source, expanded=False)
    if v.training_config:
        with st.expander("Training config"):
            st.json(v.training_config, expanded=False)
with tab_samples:
    if not v.samples:
        st.info("No sample images recorded for this version.")
    cols = st.columns(4)
    for i, s in enumerate(v.samples):
        with cols[i % 4]:
            img = _thumbnail(s, 160, f"sample {i + 1} of {v.ref}")
            if img is not None:
                st.image(img, caption=str(s.recipe.get("prompt", "")) if isinstance(s.recipe, dict) else "")
            with st.expander("Recipe"):
                st.code(json.dumps(s.recipe, indent=1, sort_keys=True), language="json")

with tab_actions:
    st.subheader("Aliases")
    st.caption("A protected alias (what production reads, e.g. prod) moves or goes only after you type its name; "
               "every change is recorded in the History tab.")
    c1, c2, c3 = st.columns([2, 1, 1])
    alias = c1.text_input("Alias to point at this version (e.g. prod)", key="ad_alias").strip()
    protect = c2.checkbox("Protect it", key="ad_alias_protect")
    guarded = alias in info.protected and info.aliases.get(alias) != number
    typed = ""
    if guarded:
        typed = st.text_input(f"@{alias} is protected and points at v{info.aliases[alias]}: type {alias} to move it "
                              f"to v{number}", key="ad_alias_confirm").strip()
    if c3.button("Set alias", key="ad_set_alias", disabled=guarded and typed != alias):
        with reported("Setting the alias"):
            reg.set_alias(v.ref, alias, protect=True if protect else None, force=guarded and typed == alias)
            st.success(f"{opened}@{alias} -> v{number}")
            st.rerun()
    for a, n in sorted(info.aliases.items()):
        if a == "latest":
            continue
        locked = a in info.protected
        c1, c2, c3 = st.columns([2, 1, 1])
        c1.write(f"@{a} -> v{n}" + (" 🔒 protected" if locked else ""))
        confirm_remove = c2.text_input(f"Type {a} to remove it", key=f"ad_untag_confirm-{a}",
                                       label_visibility="collapsed", placeholder=f"type {a} to remove it"
                                       ).strip() if locked else ""
        if c3.button(f"Remove @{a}", key=f"ad_untag-{a}", disabled=locked and confirm_remove != a):
            with reported("Removing the alias"):
                reg.remove_alias(opened, a, force=locked and confirm_remove == a)
                st.rerun()

    st.subheader("Labels")
    c1, c2 = st.columns([3, 1])
    typed_labels = c1.text_input("Labels, separated by commas (what the catalog's tag filter finds)",
                                 value=", ".join(v.tags), key=f"ad_labels-{v.ref}")
    if c2.button("Save labels", key="ad_labels_save"):
        wanted = [t.strip() for t in typed_labels.split(",") if t.strip()]
        keys = {t.lower() for t in wanted}
        with reported("Saving the labels"):
            reg.set_labels(v.ref, add=wanted, remove=[t for t in v.tags if t.lower() not in keys])
            st.rerun()

    st.subheader("Export")
    c1, c2 = st.columns([1, 2])
    fmt = c1.selectbox("Format", ["diffusers", "kohya"], key="ad_export_format",
                       help="diffusers/peft keys, or kohya keys for A1111 / ComfyUI / Civitai")
    if c2.button("Prepare download", key="ad_export"):
        with reported("Export"), tempfile.TemporaryDirectory(prefix="lora-studio-export-") as tmp, \
                st.spinner("Writing the file..."):
            out = export_adapter(reg, v.ref, format=fmt, out=Path(tmp) / f"{v.name}_v{v.number}_{fmt}.safetensors")
            st.session_state["ad_export_file"] = (v.ref, fmt, out.name, out.read_bytes())
    ready = st.session_state.get("ad_export_file")
    if ready and ready[0] == v.ref and ready[1] == fmt:
        st.download_button(f"Download {ready[2]}", data=ready[3], file_name=ready[2],
                           mime="application/octet-stream", key="ad_download")

    st.subheader("Publish to the Hugging Face Hub")
    c1, c2, c3, c4 = st.columns([2, 1, 1, 1])
    repo_id = c1.text_input("Repository id (owner/name)", key="ad_repo")
    private = c2.checkbox("Private", value=True, key="ad_private")
    kohya = c3.checkbox("Also a kohya file", key="ad_kohya")
    if c4.button("Publish", key="ad_publish"):
        # Local: huggingface_hub and its HTTP client load only when someone publishes.
        from studio.app.hub import publish_version

        with reported("Publishing"), st.spinner(f"Uploading {v.ref} to {repo_id}..."):
            result = publish_version(reg, v.ref, repo_id.strip(), private=private, kohya=kohya)
            st.success(f"published {v.ref}: {result.url}")
            for warning in result.warnings:  # e.g. a sample left out, no base_model on the card
                st.warning(warning)

    st.subheader("Delete")
    scope = st.radio("What", [f"this version ({v.ref})", f"the whole adapter ({opened}, {len(numbers)} version(s))"],
                     key="ad_delete_scope")
    force = st.checkbox("Also if an alias points at it (removes the alias)", key="ad_delete_force")
    whole = scope.startswith("the whole")
    confirm = st.text_input(f"Type {opened} to confirm", key="ad_delete_confirm")
    # Protected aliases it would remove go only after their names are typed, as on their own.
    doomed = [a for a in info.protected if whole or info.aliases.get(a) == number]
    typed_ok = True
    if doomed and force:
        names = ", ".join(doomed)
        typed = st.text_input(f"It removes the protected alias(es) {', '.join('@' + a for a in doomed)}: type "
                              f"{names} as well", key="ad_delete_protected")
        typed_ok = [t.strip() for t in typed.split(",") if t.strip()] == doomed
    if st.button("Delete", type="primary", key="ad_delete", disabled=confirm.strip() != opened or not typed_ok):
        with reported("Delete"):
            report = reg.delete(opened if whole else v.ref, force=force)
            st.session_state["ad_deleted"] = f"deleted {', '.join(report.deleted)}"
            if whole or len(numbers) == 1:
                _close()
            else:
                st.session_state["ad_version"] = None
            st.rerun()

with tab_history:
    st.caption(f"Who registered, aliased, deleted or published {opened}, and when (newest last). "
               f"`lora-studio adapters history {opened}` prints the same.")
    with reported("Reading the history"):
        _history_table(reg.history(opened, limit=HISTORY_ROWS),
                       "Nothing recorded yet (changes made before the studio kept a history are not listed).")
