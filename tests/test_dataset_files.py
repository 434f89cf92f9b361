"""studio.app.dataset_files uploads: size checked before decoding, and a zip added all or nothing (a damaged
entry or a full disk leaves the dataset as it was). Safe names and zip slip: tests/test_ui_datasets.py."""

from __future__ import annotations

import errno
import io
import os
import zipfile

import pytest
from PIL import Image

from studio.app import dataset_files
from studio.core.errors import DiskFullError, InvalidRequestError


def _png(color=(200, 30, 30), size=(48, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _noise_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, format="PNG")
    return buf.getvalue()


def _zip(entries: dict[str, bytes]) -> bytes:
    # Stored (not deflated), so a test can find an entry's bytes in the archive and damage them.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_an_oversized_image_is_refused_before_it_is_decoded(studio_home, monkeypatch):
    import trainer.data

    decoded = []
    real_open = trainer.data.open_image
    monkeypatch.setattr(trainer.data, "open_image", lambda src, *a, **k: decoded.append(len(src)) or
                        real_open(src, *a, **k))
    monkeypatch.setattr(dataset_files, "MAX_FILE_BYTES", 4096)  # the 64 MiB limit, scaled down
    big, small = _noise_png(64), _png()  # 64x64 noise: ~12 KB; the solid image: ~100 bytes
    assert len(big) > 4096 > len(small)
    report = dataset_files.add_files("mine", [("big.png", big), ("small.png", small),
                                              ("set.zip", _zip({"inner/big.png": big}))])
    assert report.added == ["small.png"]
    reasons = dict(report.skipped)
    assert "per-file limit" in reasons["big.png"] and "per-file limit" in reasons["set.zip:inner/big.png"]
    assert decoded == [len(small)]  # only the image within the limit was ever decoded


def test_a_zip_with_a_damaged_entry_adds_nothing_and_names_it(studio_home):
    folder = studio_home / "datasets" / "koh"
    dataset_files.add_files("koh", [("old.png", _png((1, 2, 3)))])
    caption = b"a caption whose bytes get damaged"
    data = _zip({"10_zk/a.png": _png(), "10_zk/a.txt": caption, "10_zk/b.png": _png((0, 90, 0))})
    damaged = data.replace(caption, caption.replace(b"whose", b"WHOSE"))  # same length, wrong CRC-32
    with pytest.raises(InvalidRequestError, match=r"10_zk/a\.txt.*nothing from set\.zip was added"):
        dataset_files.add_files("koh", [("set.zip", damaged)])
    assert _files(folder) == ["old.png"]  # a.png, read before the damaged entry, was not written either
    assert [p.name for p in folder.parent.iterdir()] == ["koh"]  # no staging folder left behind

    # A refused zip into a new dataset leaves no empty dataset folder either.
    with pytest.raises(InvalidRequestError, match="a.txt"):
        dataset_files.add_files("fresh", [("set.zip", damaged)])
    assert not (folder.parent / "fresh").exists()

    report = dataset_files.add_files("koh", [("set.zip", data)])
    assert sorted(report.added) == ["10_zk/a.png", "10_zk/a.txt", "10_zk/b.png"]
    assert (folder / "10_zk" / "a.txt").read_bytes() == caption


def test_a_zip_entry_listed_twice_is_added_once(studio_home):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z, pytest.warns(UserWarning, match="Duplicate name"):
        z.writestr("a.txt", b"first")
        z.writestr("a.txt", b"second")
    report = dataset_files.add_files("dup", [("dup.zip", buf.getvalue())])
    assert report.added == ["a.txt"] and "twice" in report.skipped[0][1]
    assert (studio_home / "datasets" / "dup" / "a.txt").read_bytes() == b"first"


def test_a_full_disk_during_a_zip_leaves_the_dataset_as_it_was(studio_home, monkeypatch):
    import studio.core.atomic

    folder = studio_home / "datasets" / "koh"
    dataset_files.add_files("koh", [("old.png", _png((1, 2, 3)))])
    writes = []
    real_fsync = studio.core.atomic.os.fsync

    def fsync_then_full(fd):  # the second file's flush finds the disk full
        writes.append(fd)
        if len(writes) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(studio.core.atomic.os, "fsync", fsync_then_full)
    with pytest.raises(DiskFullError, match="lora-studio gc") as err:
        dataset_files.add_files("koh", [("set.zip", _zip({"a.png": _png(), "b.png": _png((0, 90, 0))}))])
    assert err.value.folder == str(folder)
    assert _files(folder) == ["old.png"]
    assert [p.name for p in folder.parent.iterdir()] == ["koh"]
