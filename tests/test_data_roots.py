"""Data roots: every path typed into the UI must lie under ``$LORA_STUDIO_HOME``, the sample datasets or a
folder listed in ``LORA_STUDIO_DATA_ROOTS`` (symlinks and '..' resolved first). The pages refuse anything
else with a message naming the setting; the library check is ``studio.core.settings.check_data_path``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest
from ui_support import wait_for_jobs

from studio.app import jobs
from studio.core import errors
from studio.core.errors import StudioError
from studio.core.settings import get_settings, reload_settings

ROOT = Path(__file__).resolve().parent.parent
UI = ROOT / "studio" / "app" / "ui"


def _allow(monkeypatch, *roots: Path) -> None:
    monkeypatch.setenv("LORA_STUDIO_DATA_ROOTS", os.pathsep.join(str(r) for r in roots))
    reload_settings()


def _image_folder(folder: Path, count: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (16, 16), (10 * i, 0, 0)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"private caption {i}\n")
    return folder


# ---- library -----------------------------------------------------------------------------------


def test_check_data_path_accepts_the_roots_and_refuses_the_rest(studio_home, tmp_path, monkeypatch):
    from studio.core.settings import check_data_path

    monkeypatch.delenv("LORA_STUDIO_DATA_ROOTS", raising=False)
    reload_settings()
    inside = _image_folder(studio_home / "datasets" / "mine")
    assert check_data_path(inside, what="dataset folder") == inside.resolve()
    assert check_data_path(str(studio_home / "runs" / "not-yet"), what="output folder").is_relative_to(
        studio_home.resolve())
    sample = ROOT / "datasets" / "striped"
    assert check_data_path(sample, what="dataset folder") == sample.resolve()

    private = _image_folder(tmp_path / "private")
    with pytest.raises(errors.PathNotAllowedError, match="LORA_STUDIO_DATA_ROOTS") as caught:
        check_data_path(private, what="dataset folder")
    assert isinstance(caught.value, StudioError) and isinstance(caught.value, PermissionError)
    assert "\n" not in str(caught.value) and "dataset folder" in str(caught.value)
    # '..' that climbs out of a root, and a symlink inside a root that points outside, are outside.
    with pytest.raises(errors.PathNotAllowedError):
        check_data_path(f"{studio_home}/datasets/../../private", what="dataset folder")
    link = studio_home / "datasets" / "link"
    link.symlink_to(private, target_is_directory=True)
    for path in (link, link / "img0.png"):
        with pytest.raises(errors.PathNotAllowedError):
            check_data_path(path, what="dataset folder")
    # A folder whose name merely starts like a root's is not inside it.
    with pytest.raises(errors.PathNotAllowedError):
        check_data_path(Path(str(studio_home) + "-other"), what="dataset folder")
    loop = studio_home / "loop"
    loop.symlink_to(loop)
    for bad in ("  ", "~no-such-user-here/x", loop / "x"):
        with pytest.raises(StudioError):
            check_data_path(bad, what="dataset folder")

    # LORA_STUDIO_DATA_ROOTS adds folders (os.pathsep-separated; empty entries ignored).
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.setenv("LORA_STUDIO_DATA_ROOTS", f"{private}{os.pathsep}{os.pathsep}{other}")
    reload_settings()
    assert get_settings().data_roots == (private, other)
    assert check_data_path(link, what="dataset folder") == private.resolve()
    assert check_data_path(other / "new", what="output folder") == (other / "new").resolve()


def test_check_base_model_lets_hub_ids_and_tiny_through(studio_home, tmp_path, monkeypatch):
    from studio.core.base_models import check_base_model

    monkeypatch.delenv("LORA_STUDIO_DATA_ROOTS", raising=False)
    reload_settings()
    for ref in ("tiny", "owner/name", "runwayml/stable-diffusion-v1-5@main"):
        assert check_base_model(ref) == ref
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")
    for ref in (str(model), str(tmp_path / "missing.safetensors"), "~/../../etc"):
        with pytest.raises(errors.PathNotAllowedError, match="LORA_STUDIO_DATA_ROOTS"):
            check_base_model(ref)
    inside = studio_home / "models" / "m.safetensors"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(b"x")
    assert check_base_model(f" {inside} ") == str(inside)


# ---- pages -------------------------------------------------------------------------------------


def test_datasets_page_refuses_a_folder_outside_the_roots(studio_home, tmp_path, monkeypatch):
    monkeypatch.delenv("LORA_STUDIO_DATA_ROOTS", raising=False)
    reload_settings()
    private = _image_folder(tmp_path / "private", 2)
    at = AppTest.from_file(str(UI / "datasets_page.py"), default_timeout=60).run()
    at.selectbox(key="ds_source").set_value("(type a folder path)").run()
    at.text_input(key="ds_path").input(str(private)).run()
    assert not at.exception
    assert any("LORA_STUDIO_DATA_ROOTS" in e.value for e in at.error), [e.value for e in at.error]
    assert not at.get("image") and not any(t.value.startswith("private caption") for t in at.text_input)
    assert not any(b.label == "Save captions" for b in at.button)

    # A symlink in the studio's own dataset area that points at the private folder is refused too.
    (studio_home / "datasets").mkdir(parents=True)
    (studio_home / "datasets" / "sneaky").symlink_to(private, target_is_directory=True)
    at = AppTest.from_file(str(UI / "datasets_page.py"), default_timeout=60).run()
    at.selectbox(key="ds_source").set_value("sneaky").run()
    assert not at.exception and any("LORA_STUDIO_DATA_ROOTS" in e.value for e in at.error)
    assert not at.get("image")

    # Listed in LORA_STUDIO_DATA_ROOTS, the same folder is shown.
    _allow(monkeypatch, private)
    at = AppTest.from_file(str(UI / "datasets_page.py"), default_timeout=60).run()
    at.selectbox(key="ds_source").set_value("(type a folder path)").run()
    at.text_input(key="ds_path").input(str(private)).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.text_input(key="caption-img0.png").value == "private caption 0"


def test_datasets_page_hides_images_that_link_outside_the_roots(studio_home, tmp_path, monkeypatch):
    monkeypatch.delenv("LORA_STUDIO_DATA_ROOTS", raising=False)
    reload_settings()
    private = _image_folder(tmp_path / "private")
    mine = _image_folder(studio_home / "datasets" / "mine")
    (mine / "leak.png").symlink_to(private / "img0.png")
    at = AppTest.from_file(str(UI / "datasets_page.py"), default_timeout=60).run()
    at.selectbox(key="ds_source").set_value("mine").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    shown = [c for img in at.get("image") for c in img.captions]
    assert "img0.png" in shown and "leak.png" not in shown


def test_datasets_page_listing_is_bounded_and_read_once_per_run(studio_home, monkeypatch):
    from studio.app import dataset_files

    _image_folder(studio_home / "datasets" / "big", 6)
    calls = []
    original = dataset_files.list_images

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(dataset_files, "list_images", counting)
    at = AppTest.from_file(str(UI / "datasets_page.py"), default_timeout=60).run()
    at.selectbox(key="ds_source").set_value("big").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert len(calls) <= 1, f"the folder was listed {len(calls)} times in one run"
    calls.clear()
    at.run()
    assert len(calls) <= 1

    # Past the entry bound (or the depth bound), the page refuses the folder instead of walking all of it.
    monkeypatch.setattr("studio.app.ui.common.MAX_LISTED_ENTRIES", 5)
    at = AppTest.from_file(str(UI / "datasets_page.py"), default_timeout=60).run()
    at.selectbox(key="ds_source").set_value("big").run()
    assert not at.exception and any("more than 5" in e.value for e in at.error), [e.value for e in at.error]
    monkeypatch.setattr("studio.app.ui.common.MAX_LISTED_ENTRIES", 1000)
    deep = studio_home / "datasets" / "deep"
    _image_folder(deep / "a" / "b" / "c" / "d" / "e" / "f")
    at = AppTest.from_file(str(UI / "datasets_page.py"), default_timeout=60).run()
    at.selectbox(key="ds_source").set_value("deep").run()
    assert not at.exception and any("levels" in e.value for e in at.error), [e.value for e in at.error]


def test_train_page_refuses_paths_outside_the_roots(studio_home, tmp_path, monkeypatch):
    monkeypatch.delenv("LORA_STUDIO_DATA_ROOTS", raising=False)
    reload_settings()
    monkeypatch.setattr(jobs, "ensure_runner", lambda: False)  # a wrongly queued job must not train here
    private = _image_folder(tmp_path / "private", 2)
    (private / "train.toml").write_text('[output]\nname = "secret-name"\n')  # never read: it is outside
    model = tmp_path / "model"
    model.mkdir()
    typed = {"dataset.path": "train_dataset", "model.base_model": "train_base"}  # boxes that take a typed path
    for option, value in (("dataset.path", str(private)), ("output.dir", str(tmp_path / "runs")),
                          ("model.base_model", str(model)), ("dataset.reg_data_dir", str(private))):
        at = AppTest.from_file(str(UI / "train_page.py"), default_timeout=120)
        if option in typed:  # typed into the box before the first run (AppTest cannot type a new option later)
            at.session_state[typed[option]] = value
            at.run()
        else:
            at.run()
            at.text_input(key=f"cfg-{option}").input(value)
        assert "secret-name" not in at.text_input(key="cfg-output.name").value
        next(b for b in at.button if b.label == "Start training").click().run()
        assert not at.exception
        assert any("LORA_STUDIO_DATA_ROOTS" in e.value and option in e.value for e in at.error), \
            (option, [e.value for e in at.error])
    assert jobs.list_jobs(start_runner=False) == []


def test_generate_page_refuses_a_base_model_path_outside_the_roots(studio_home, tmp_path, monkeypatch):
    monkeypatch.delenv("LORA_STUDIO_DATA_ROOTS", raising=False)
    reload_settings()
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    at = AppTest.from_file(str(UI / "generate_page.py"), default_timeout=120).run()
    at.text_input(key="base").input(str(model))
    wait_for_jobs(next(b for b in at.button if b.label == "Generate").click().run())
    assert not at.exception
    assert any("LORA_STUDIO_DATA_ROOTS" in e.value for e in at.error), [e.value for e in at.error]
    at.text_input(key="grid_x_values").input("0, 1")  # the grid tab uses the same box
    at.button(key="grid_go").click().run()
    assert not at.exception
    assert any("LORA_STUDIO_DATA_ROOTS" in e.value for e in at.error), [e.value for e in at.error]


def test_adapters_page_import_refuses_a_base_model_path_outside_the_roots(studio_home, tmp_path, monkeypatch):
    monkeypatch.delenv("LORA_STUDIO_DATA_ROOTS", raising=False)
    reload_settings()
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"not weights")
    at = AppTest.from_file(str(UI / "adapters_page.py"), default_timeout=60).run()
    at.file_uploader(key="ad_import_file").set_value(("a.safetensors", b"x", "application/octet-stream"))
    at.text_input(key="ad_import_base").input(str(model))
    next(b for b in at.button if b.label == "Import").click().run()
    assert not at.exception
    assert any("LORA_STUDIO_DATA_ROOTS" in e.value for e in at.error), [e.value for e in at.error]
