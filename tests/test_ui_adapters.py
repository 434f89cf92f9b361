"""The Adapters page through AppTest: catalog filters and paging, an adapter's page, aliases, export,
import, delete with confirmation, and clear messages for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from ui_support import register, save_lora

ROOT = Path(__file__).resolve().parent.parent
PAGE = str(ROOT / "studio" / "app" / "ui" / "adapters_page.py")


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return [save_lora(root, seed=s) for s in range(2)]


def _page() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=120).run()


def _button(at, label):
    return next(b for b in at.button if b.label == label)


def _markdown(at) -> str:
    return "\n".join(m.value for m in at.markdown)


def test_catalog_filters_and_pages(reg, lora_files):
    for i in range(14):
        register(reg, f"style{i:02d}", lora_files[i % 2], trigger_words=[f"zk{i}"],
                 tags=["style"] if i % 2 else ["character"], samples=1 if i == 0 else 0)
    register(reg, "style00", lora_files[1])  # a second version: the card shows the newest
    at = _page()
    assert not at.exception
    assert "14 adapter(s) match; page 1 of 2" in at.caption[0].value
    text = _markdown(at)
    assert "**style00**  \nv2" in text and "style11" in text and "style12" not in text
    _button(at, "Next").click().run()
    assert "page 2 of 2" in at.caption[0].value and "style13" in _markdown(at)

    at.text_input(key="ad_tag").input("character").run()
    assert "6 adapter(s) match; page 1 of 1" in at.caption[0].value  # style00@2 has no tag
    at.text_input(key="ad_tag").input("").run()
    at.text_input(key="ad_trigger").input("zk3").run()
    assert "1 adapter(s)" in at.caption[0].value and "style03" in _markdown(at)
    at.text_input(key="ad_trigger").input("").run()
    at.text_input(key="ad_search").input("nothing-like-this").run()
    assert any("No adapter matches" in i.value for i in at.info)
    at.text_input(key="ad_search").input("").run()
    at.toggle(key="ad_all_versions").set_value(True).run()
    assert "15 version(s) match" in at.caption[0].value
    at.selectbox(key="ad_type").set_value("loha").run()
    assert "0 version(s) match" in at.caption[0].value


def test_adapter_page_aliases_export_and_delete(reg, lora_files):
    register(reg, "striped", lora_files[0], trigger_words=["zkstripes"], samples=2)
    register(reg, "striped", lora_files[1], parents=["striped@1"])
    at = _page()
    _button(at, "Open").click().run()
    assert not at.exception
    assert at.header[0].value == "striped@2"
    v = reg.get("striped@2")
    table = at.table[0].value
    assert v.autov2 in table.to_string() and v.tensor_sha256 in table.to_string()
    assert any("Parents: striped@1" in m.value for m in at.markdown)

    at.text_input(key="ad_alias").input("prod")
    at.button(key="ad_set_alias").click().run()
    assert not at.exception and reg.get("striped@prod").number == 2

    at.button(key="ad_export").click().run()
    assert not at.exception and not at.error
    download = at.get("download_button")
    assert download and "striped_v2_diffusers.safetensors" in download[0].proto.label

    # Delete needs the name typed; with an alias on the version it is refused unless forced.
    assert at.button(key="ad_delete").disabled
    at.text_input(key="ad_delete_confirm").input("striped").run()
    at.button(key="ad_delete").click().run()
    assert not at.exception and "points at" in at.error[0].value
    assert reg.get("striped@2")
    at.checkbox(key="ad_delete_force").check().run()
    at.button(key="ad_delete").click().run()
    assert not at.exception and any("deleted striped@2" in s.value for s in at.success)
    assert [x.number for x in reg.versions("striped")] == [1]
    assert at.header[0].value == "striped@1"  # the page stays on the adapter, at its remaining version


def test_a_protected_alias_asks_for_its_name_and_the_history_shows_who_did_what(reg, lora_files, monkeypatch):
    from studio.core.settings import reload_settings

    monkeypatch.setenv("LORA_STUDIO_USER", "ada")
    reload_settings()
    register(reg, "striped", lora_files[0])
    register(reg, "striped", lora_files[1])
    reg.set_alias("striped@1", "prod", protect=True)
    at = _page()
    _button(at, "Open").click().run()
    assert at.header[0].value == "striped@2"
    assert any("@prod -> v1 🔒 protected" in m.value for m in at.markdown)
    # Moving it to v2: the button waits for the alias's name to be typed.
    at.text_input(key="ad_alias").input("prod").run()
    assert at.button(key="ad_set_alias").disabled
    at.text_input(key="ad_alias_confirm").input("prod").run()
    at.button(key="ad_set_alias").click().run()
    assert not at.exception and not at.error and reg.get("striped@prod").number == 2
    assert reg.adapter("striped").protected == ("prod",)
    # Removing it asks the same.
    assert at.button(key="ad_untag-prod").disabled
    at.text_input(key="ad_untag_confirm-prod").input("prod").run()
    at.button(key="ad_untag-prod").click().run()
    assert not at.exception and "prod" not in reg.adapter("striped").aliases
    at.text_input(key="ad_labels-striped@2").input("portrait, Night").run()
    at.button(key="ad_labels_save").click().run()
    assert not at.exception and list(reg.get("striped@2").tags) == ["portrait", "Night"]
    history = at.table[-1].value.to_string()
    for line in ("registered striped@1", "protected striped@prod (on @1)", "moved striped@prod from @1 to @2 (forced)",
                 "removed striped@prod (was @2) (forced)", "relabelled striped@2: +portrait +Night"):
        assert line in history, history
    assert "ada" in history
    # Deleting the version a protected alias points at: forced, and only after the alias's name is typed.
    reg.set_alias("striped@2", "prod", protect=True)
    at.run()
    at.text_input(key="ad_delete_confirm").input("striped").run()
    at.checkbox(key="ad_delete_force").check().run()
    assert at.button(key="ad_delete").disabled
    at.text_input(key="ad_delete_protected").input("prod").run()
    at.button(key="ad_delete").click().run()
    assert not at.exception and [x.number for x in reg.versions("striped")] == [1]
    assert reg.history("striped")[-1].detail == {"versions": [2], "aliases_removed": ["prod"], "forced": True}
    # Back at the catalog, the newest changes of every adapter, deleted ones too, and whose they were.
    from adapters.registry import Registry

    with Registry(actor="grace") as grace:
        register(grace, "outlined", lora_files[0])
        grace.delete("outlined@1")
    _button(at, "Back to the catalog").click().run()
    activity = at.table[-1].value
    assert list(activity["who"])[-3:] == ["ada", "grace", "grace"]
    assert list(activity["what"])[-2:] == ["registered outlined@1 (trained)", "deleted outlined@1"]
    at.text_input(key="ad_activity_by").input("grace").run()
    assert set(at.table[-1].value["who"]) == {"grace"}
    at.text_input(key="ad_activity_by").input("nobody").run()
    assert any("Nothing recorded by nobody yet." in i.value for i in at.info)


def test_set_bad_alias_and_publish_report_errors(reg, lora_files):
    register(reg, "outlined", lora_files[0])
    at = _page()
    _button(at, "Open").click().run()
    at.text_input(key="ad_alias").input("latest")
    at.button(key="ad_set_alias").click().run()
    assert not at.exception and "latest" in at.error[0].value
    at.text_input(key="ad_repo").input("someone/outlined")
    at.button(key="ad_publish").click().run()
    # Offline (tests) or without studio.app.hub: either way a message, never a traceback.
    assert not at.exception and at.error


def test_import_upload_and_refusals(reg, lora_files, tmp_path):
    at = _page()
    at.file_uploader(key="ad_import_file").set_value(("my style.safetensors", lora_files[1].read_bytes(),
                                                      "application/octet-stream"))
    at.text_input(key="ad_import_trigger").input("zkmine")
    _button(at, "Import").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("imported my_style@1" in s.value for s in at.success)
    assert reg.get("my_style").trigger_words == ("zkmine",)
    assert at.header[0].value == "my_style@1"  # the imported adapter's page opens

    at = _page()
    at.file_uploader(key="ad_import_file").set_value(("bad.safetensors", b"not safetensors", "application/x"))
    _button(at, "Import").click().run()
    assert not at.exception and at.error

    at = _page()
    _button(at, "Import").click().run()
    assert not at.exception and "choose a .safetensors file" in at.error[0].value
