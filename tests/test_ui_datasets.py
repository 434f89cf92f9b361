"""The Datasets page (AppTest) and studio.app.dataset_files: uploads, zip slip, captions, checks, crop previews."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from studio.app import dataset_files
from studio.core.errors import InvalidNameError, InvalidRequestError

ROOT = Path(__file__).resolve().parent.parent
PAGE = str(ROOT / "studio" / "app" / "ui" / "datasets_page.py")


def _png(color=(200, 30, 30), size=(48, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


# ---- library ---------------------------------------------------------------------------------


def test_add_files_keeps_safe_names_and_refuses_bad_files(studio_home):
    report = dataset_files.add_files("mine", [("../../evil name!.PNG", _png()), ("evil name!.txt", b"a red box"),
                                              ("notes.exe", b"MZ"), ("broken.png", b"not an image")])
    folder = studio_home / "datasets" / "mine"
    assert sorted(report.added) == ["evil_name.png", "evil_name.txt"]
    assert (folder / "evil_name.txt").read_text() == "a red box"
    reasons = dict(report.skipped)
    assert "not an image or caption" in reasons["notes.exe"] and "not an image" in reasons["broken.png"]
    assert not (studio_home / "evil name!.PNG").exists()
    # The same bytes again are left alone; other bytes under an existing name are refused, not overwritten.
    again = dataset_files.add_files("mine", [("evil_name.png", _png()), ("evil_name.txt", b"other")])
    assert again.unchanged == ["evil_name.png"] and "already exists" in again.skipped[0][1]
    assert (folder / "evil_name.txt").read_text() == "a red box"


def test_zip_keeps_repeat_folders_and_refuses_zip_slip(studio_home):
    report = dataset_files.add_files("koh", [("set.zip", _zip({"10_zkstyle/a.png": _png(), "10_zkstyle/a.txt": b"x",
                                                               "__MACOSX/._a.png": b"junk"}))])
    assert sorted(report.added) == ["10_zkstyle/a.png", "10_zkstyle/a.txt"]
    for bad in ("../escape.png", "/abs/escape.png", "a/../../escape.png"):
        with pytest.raises(InvalidRequestError, match="refused"):
            dataset_files.add_files("koh", [("evil.zip", _zip({"ok.png": _png(), bad: _png()}))])
    assert not (studio_home / "datasets" / "escape.png").exists() and not (studio_home / "escape.png").exists()
    assert not (studio_home / "datasets" / "koh" / "ok.png").exists()  # a refused zip writes nothing
    with pytest.raises(InvalidRequestError, match="not a readable zip"):
        dataset_files.add_files("koh", [("fake.zip", b"PK no")])
    with pytest.raises(InvalidNameError):
        dataset_files.add_files("../up", [("a.png", _png())])


def test_captions_are_written_atomically_to_sidecars(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "cat.png")
    path = dataset_files.write_caption(tmp_path / "cat.png", "a cat,\n on a mat ")
    assert path == tmp_path / "cat.txt" and path.read_text() == "a cat, on a mat\n"
    items, total = dataset_files.list_images(tmp_path)
    assert total == 1 and items[0].caption == "a cat, on a mat"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_crop_preview_is_the_trainers_bucket(tmp_path):
    Image.new("RGB", (96, 48), (0, 0, 255)).save(tmp_path / "wide.png")
    preview = dataset_files.crop_preview(tmp_path / "wide.png", resolution=32, bucket_step=8)
    from trainer.data import BucketSpec

    assert preview.bucket == BucketSpec(resolution=32, step=8).assign(96, 48)
    assert preview.sample.size == preview.bucket and preview.size == (96, 48)
    left, top, right, bottom = preview.box
    assert 0 <= left < right <= 96 and 0 <= top < bottom <= 48


# ---- page ------------------------------------------------------------------------------------


def _page() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=60).run()


def test_upload_then_edit_captions_then_check(studio_home):
    at = _page()
    assert not at.exception
    at.text_input(key="ds_new_name").input("shapes")
    at.file_uploader(key="ds_upload").set_value([("one.png", _png(), "image/png"),
                                                ("two.png", _png((0, 200, 0)), "image/png"),
                                                ("one.txt", b"a red box", "text/plain")])
    at.button[0].click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "3 file(s) added" in at.success[0].value
    assert at.selectbox(key="ds_source").value == "shapes"
    assert len(at.get("image")) >= 2

    at.text_input(key="caption-two.png").input("a green box")
    at.text_input(key="caption-one.png").input("a red box, bold")
    next(b for b in at.button if b.label == "Save captions").click().run()
    assert not at.exception and any("saved 2 caption(s)" in s.value for s in at.success)
    folder = studio_home / "datasets" / "shapes"
    assert (folder / "two.txt").read_text() == "a green box\n"
    assert (folder / "one.txt").read_text() == "a red box, bold\n"

    at.button(key="ds_check").click().run()
    assert not at.exception
    assert [m.value for m in at.metric][:2] == ["2", "2"]
    assert any("every image is usable" in s.value for s in at.success)


def test_bad_upload_and_missing_folder_are_messages(studio_home):
    at = _page()
    at.text_input(key="ds_new_name").input("bad/name")
    at.file_uploader(key="ds_upload").set_value([("one.png", _png(), "image/png")])
    at.button[0].click().run()
    assert not at.exception and "dataset name" in at.error[0].value

    at = _page()
    at.text_input(key="ds_new_name").input("zips")
    at.file_uploader(key="ds_upload").set_value([("evil.zip", _zip({"../x.png": _png()}), "application/zip")])
    at.button[0].click().run()
    assert not at.exception and "refused" in at.error[0].value

    at = _page()
    at.selectbox(key="ds_source").set_value("(type a folder path)").run()
    at.text_input(key="ds_path").input(str(studio_home / "nope")).run()
    assert not at.exception and "does not exist" in at.error[0].value


def test_sample_dataset_shows_read_only_metadata_captions_and_crop_preview():
    at = _page()
    at.selectbox(key="ds_source").set_value("sample: outlined").run()
    assert not at.exception
    assert any("read-only" in i.value for i in at.info)
    # The crop tab renders the original with its kept region and the bucket-sized sample.
    assert any("what the trainer sees" in c for c in _captions(at))


def _captions(at) -> list[str]:
    return [c for img in at.get("image") for c in img.captions]
