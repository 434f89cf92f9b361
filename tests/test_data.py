"""Training datasets: layouts, image decoding, bad files, buckets, augmentation, captions, fingerprints."""

from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from studio.app.cli import main
from studio.core.errors import DatasetError, DatasetNotFoundError, NoUsableImagesError, UnusableImageError
from trainer.config import DatasetConfig, TrainConfig
from trainer.data import (
    BucketSpec,
    TrainDataset,
    apply_trigger,
    build_caption,
    check_dataset,
    collate,
    detect_layout,
    open_image,
    open_training_dataset,
    prepare_image,
    shuffle_tags,
)

REPO = Path(__file__).resolve().parent.parent
RED, BLUE, GREEN = (220, 30, 30), (30, 60, 220), (30, 170, 50)


def _png(size=(32, 32), colour=RED, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, "PNG")
    return buf.getvalue()


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data, encoding="utf-8")
    return path


def _cfg(path, **kw) -> DatasetConfig:
    """A resolved dataset config at the tiny model's 32 px on an 8 px grid."""
    return DatasetConfig(path=str(path), resolution=32, bucket_reso_steps=8, **kw)


def _folder(root: Path, n: int = 3) -> Path:
    for i in range(n):
        _write(root / f"img{i}.png", _png(colour=(40 * i, 100, 200)))
        _write(root / f"img{i}.txt", f"tag{i}, shared\n")
    return root


# ---- layouts -------------------------------------------------------------------------------


def test_folder_layout_with_sidecars(tmp_path):
    root = _folder(tmp_path / "set")
    _write(root / "sub" / "deep.png", _png(colour=GREEN))  # no caption file
    _write(root / "notes.pdf", b"%PDF")
    _write(root / ".hidden" / "x.png", b"")  # hidden folders are not part of the dataset
    r = check_dataset(root, config=_cfg(root, trigger_word="zk"))
    assert detect_layout(root) == "folder" and r.layout == "folder"
    assert (r.image_count, r.usable_count, r.captioned_count) == (4, 4, 3)
    assert r.caption_sources == {"none": 1, "sidecar": 3}
    assert r.tag_frequency == {"set": {"zk": 4, "shared": 3, "tag0": 1, "tag1": 1, "tag2": 1}}
    assert [(f.path, f.reason) for f in r.ignored_files] == [("notes.pdf", "not an image file type (.pdf)")]
    assert r.bad_files == [] and r.buckets == {"32x32": 4}
    assert any("no caption" in n for n in r.notes)
    wide = check_dataset(root, resolution=64, bucket_step=16)  # keyword overrides, no config
    assert (wide.resolution, wide.bucket_step, wide.buckets) == (64, 16, {"32x32": 4})


def test_kohya_repeat_folders(tmp_path):
    root = tmp_path / "kohya"
    _write(root / "10_zkstyle" / "a.png", _png())
    _write(root / "10_zkstyle" / "a.txt", "zkstyle, a red thing")
    _write(root / "10_zkstyle" / "b.png", _png(colour=BLUE))  # no sidecar: the folder's name is the caption
    _write(root / "3_zkstyle person" / "c.png", _png(colour=GREEN))
    _write(root / "stray.png", _png())
    _write(root / "extras" / "d.png", _png())
    r = check_dataset(root, config=_cfg(root))
    assert r.layout == "kohya"
    assert r.repeats == {"10_zkstyle": 10, "3_zkstyle person": 3}
    assert (r.usable_count, r.samples_per_epoch) == (3, 23)
    assert r.caption_sources == {"folder name": 2, "sidecar": 1}
    assert r.tag_frequency["10_zkstyle"] == {"zkstyle": 2, "a red thing": 1}
    assert r.tag_frequency["3_zkstyle person"] == {"zkstyle person": 1}
    assert sorted(f.path for f in r.ignored_files) == ["extras/d.png", "stray.png"]
    assert all("N_name" in f.reason for f in r.ignored_files)
    ds = open_training_dataset(_cfg(root, repeats=2), seed=0)
    assert len(ds) == 46  # folder repeats x dataset.repeats: (10 + 10 + 3) x 2
    assert ds.caption(ds.index.index(1)) == "zkstyle"


def test_imagefolder_with_metadata_jsonl(tmp_path):
    root = tmp_path / "imf"
    _write(root / "images" / "a.png", _png())
    _write(root / "images" / "b.png", _png(colour=BLUE))
    _write(root / "images" / "unlisted.png", _png(colour=GREEN))
    rows = [{"file_name": "images/a.png", "text": "a red square"}, {"file_name": "images/b.png", "text": ""},
            {"file_name": "images/gone.png", "text": "missing"}]
    _write(root / "metadata.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    _write(root / "train.toml", "[dataset]\n")  # a file named train.* must not become the "train" split
    r = check_dataset(root, config=_cfg(root, trigger_word="zk"))
    assert r.layout == "imagefolder"
    assert (r.image_count, r.usable_count, r.captioned_count) == (3, 2, 1)
    assert [(b.path, b.reason) for b in r.bad_files] == [("images/gone.png", "missing file (listed in the metadata)")]
    assert [(f.path, f.reason) for f in r.ignored_files] == [("images/unlisted.png", "not listed in metadata.jsonl")]
    assert r.tag_frequency == {"imf": {"zk": 2, "a red square": 1}}


def test_imagefolder_caption_column_choice(tmp_path):
    root = tmp_path / "imf"
    _write(root / "a.png", _png())
    _write(root / "metadata.jsonl", json.dumps({"file_name": "a.png", "caption": "cap", "prompt": "pr"}) + "\n")
    assert check_dataset(root, config=_cfg(root)).tag_frequency == {"imf": {"cap": 1}}
    assert check_dataset(root, config=_cfg(root, caption_column="prompt")).tag_frequency == {"imf": {"pr": 1}}
    with pytest.raises(DatasetError, match="dataset.caption_column 'text' is not a column"):
        check_dataset(root, config=_cfg(root, caption_column="text"))
    _write(root / "metadata.jsonl", "{not json\n")
    with pytest.raises(DatasetError, match="cannot read metadata.jsonl"):
        check_dataset(root, config=_cfg(root))


def _save_to_disk(root: Path, captions: list[str], *, as_dict: bool = False, split: str = "train") -> Path:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    images = [{"bytes": _png(colour=(10 * i, 50, 90)), "path": f"{i}.png"} for i in range(len(captions))]
    images.append({"bytes": b"not an image at all", "path": "bad.png"})
    ds = datasets.Dataset.from_dict({"image": images, "text": [*captions, "bad"]}, features=features)
    (datasets.DatasetDict({split: ds}) if as_dict else ds).save_to_disk(str(root))
    return root


@pytest.mark.parametrize("as_dict", [False, True])
def test_save_to_disk_dataset(tmp_path, as_dict):
    root = _save_to_disk(tmp_path / "saved", ["zk, one", "zk, two", ""], as_dict=as_dict)
    r = check_dataset(root, config=_cfg(root))
    assert r.layout == "save_to_disk"
    assert (r.image_count, r.usable_count, r.captioned_count) == (4, 3, 2)
    prefix = "train/" if as_dict else "rows/"
    assert [(b.path, b.reason.split(":")[0]) for b in r.bad_files] == [(f"{prefix}000003", "not an image")]
    ds = open_training_dataset(_cfg(root), seed=0)
    sample = ds[1]
    assert sample["key"] == f"{prefix}000001" and sample["caption"] == "zk, two"
    assert sample["pixel_values"].shape == (3, 32, 32)
    # pixels come back from the Arrow bytes: colour (10, 50, 90) -> (10/127.5 - 1, ...)
    assert torch.allclose(sample["pixel_values"][:, 0, 0], torch.tensor([10, 50, 90]) / 127.5 - 1, atol=1e-6)


def test_save_to_disk_without_a_train_split_is_explained(tmp_path):
    import datasets

    root = tmp_path / "splits"
    ds = datasets.Dataset.from_dict({"image": [{"bytes": _png(), "path": "a.png"}], "text": ["x"]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "text": datasets.Value("string")}))
    datasets.DatasetDict({"a": ds, "b": ds}).save_to_disk(str(root))
    with pytest.raises(DatasetError, match="none is called 'train'"):
        check_dataset(root, config=_cfg(root))
    one = _save_to_disk(tmp_path / "one", ["x"], as_dict=True, split="validation")
    assert check_dataset(one, config=_cfg(one)).usable_count == 1


SHIPPED = {"striped": ("kohya", 28, 280, "zkstripes"), "outlined": ("imagefolder", 28, 28, "zkoutline"),
           "striped_hf": ("save_to_disk", 20, 20, "zkstripes"), "outlined_txt": ("folder", 20, 20, "zkoutline")}


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_datasets(name):
    layout, count, samples, trigger = SHIPPED[name]
    config = TrainConfig.from_toml(REPO / "datasets" / name / "train.toml").resolved()
    r = check_dataset(config.dataset.path, config=config.dataset)
    assert (r.layout, r.usable_count, r.samples_per_epoch) == (layout, count, samples)
    assert r.bad_files == [] and r.ignored_files == [] and r.duplicates == []
    assert r.caption_coverage == 1.0 and r.buckets == {"32x32": count}
    (tags,) = r.tag_frequency.values()
    assert tags[trigger] == count  # the trigger word reaches every caption as trained
    ds = open_training_dataset(config.dataset, seed=config.training.seed)
    # the trigger comes last (make_datasets.py says why); dropout leaves a few captions empty
    assert all(ds.caption(i).endswith(f", {trigger}") or ds.caption(i) == "" for i in range(len(ds)))
    shapes = {ds.caption(i, epoch=0).split(", ")[0].split()[2] for i in range(len(ds)) if ds.caption(i, epoch=0)}
    assert sorted(shapes) == ["circle", "square", "triangle"]


def test_shipped_datasets_are_small_and_match_the_recipe(tmp_path):
    from studio.app.tiny.make_datasets import SAMPLE_SETS, make

    for sample in SAMPLE_SETS:
        shipped = REPO / "datasets" / sample.name
        assert sum(p.stat().st_size for p in shipped.rglob("*") if p.is_file()) < 300_000
        rebuilt = make(sample, tmp_path)
        if sample.layout != "save_to_disk":  # Arrow files carry a fingerprint; compare the content instead
            assert {p.relative_to(rebuilt): p.read_bytes() for p in rebuilt.rglob("*") if p.is_file()} == \
                   {p.relative_to(shipped): p.read_bytes() for p in shipped.rglob("*") if p.is_file()}
        assert check_dataset(rebuilt, config=_cfg(rebuilt)).fingerprint == \
            check_dataset(shipped, config=_cfg(shipped)).fingerprint


def test_missing_or_non_folder_path(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="not found"):
        check_dataset(tmp_path / "nope", config=_cfg(tmp_path / "nope"))
    f = _write(tmp_path / "file.png", _png())
    with pytest.raises(DatasetNotFoundError, match="is not a folder"):
        check_dataset(f, config=_cfg(f))


# ---- image decoding ----------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    # 16x8 landscape: left half red, right half blue. Orientation 6 means "rotate 90 degrees
    # clockwise to display": the photo is 8 wide, 16 tall, red on top.
    img = Image.new("RGB", (16, 8), BLUE)
    img.paste(Image.new("RGB", (8, 8), RED), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    img.save(path, "JPEG", quality=95, exif=exif)
    out = open_image(path)
    assert out.size == (8, 16)
    top, bottom = np.asarray(out)[2, 4].astype(int), np.asarray(out)[13, 4].astype(int)
    assert top[0] > 180 and top[2] < 90 and bottom[2] > 180 and bottom[0] < 90
    r = check_dataset(tmp_path, config=_cfg(tmp_path, min_bucket_reso=8))
    assert r.buckets == {"8x16": 1}  # bucketed by the displayed shape, not the stored one


def test_alpha_is_composited_onto_white():
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 128))
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    out = np.asarray(open_image(buf.getvalue())).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent -> white, not black
    assert out[0, 1, 0] == 255 and abs(out[0, 1, 1] - 127) <= 1 and abs(out[0, 1, 2] - 127) <= 1
    la = Image.new("LA", (1, 1), (0, 0))
    buf = io.BytesIO()
    la.save(buf, "PNG")
    assert np.asarray(open_image(buf.getvalue()))[0, 0].tolist() == [255, 255, 255]


def test_palette_with_transparency_and_other_modes():
    p = Image.new("P", (2, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    buf = io.BytesIO()
    p.save(buf, "PNG", transparency=1)
    assert np.asarray(open_image(buf.getvalue())).tolist() == [[[255, 0, 0], [255, 255, 255]]]
    for mode, fmt in (("CMYK", "JPEG"), ("1", "PNG"), ("L", "PNG"), ("LAB", "TIFF")):
        buf = io.BytesIO()
        Image.new(mode, (4, 4)).save(buf, fmt)
        out = open_image(buf.getvalue())
        assert out.mode == "RGB" and out.size == (4, 4), mode


def test_16_bit_greyscale_maps_to_8_bit():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    assert np.asarray(open_image(buf.getvalue()))[0, :, 0].tolist() == [0, 1, 128, 255]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` 1-bit pixels, with no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _bad_dataset(root: Path) -> Path:
    good = _png()
    _write(root / "good.png", good)
    _write(root / "good.txt", "fine")
    _write(root / "empty.png", b"")
    _write(root / "text.jpg", "this is not a picture")
    noise = Image.effect_noise((64, 64), 60).convert("RGB")  # noise compresses badly: long pixel data
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        noise.save(buf, fmt)
        _write(root / f"truncated.{fmt.lower().replace('jpeg', 'jpg')}", buf.getvalue()[: len(buf.getvalue()) // 2])
    _write(root / "bomb.png", _png_header_only(20000, 20000))  # 400 Mpx declared in 60 bytes
    _write(root / "warn_bomb.png", _png_header_only(10000, 10000))  # 100 Mpx: PIL only warns; we refuse
    buf = io.BytesIO()
    Image.new("F", (4, 4), 0.5).save(buf, "TIFF")
    _write(root / "float.tif", buf.getvalue())
    _write(root / "tiny.png", _png((6, 6)))
    _write(root / "badcap.png", _png(colour=BLUE))
    _write(root / "badcap.txt", b"\xff\xfe\xfa caption in no encoding")
    return root


BAD_REASONS = {
    "empty.png": "empty file (0 bytes)",
    "text.jpg": "not an image",
    "truncated.png": "corrupt or truncated",
    "truncated.jpg": "corrupt or truncated",
    "bomb.png": "decompression bomb guard",
    "warn_bomb.png": "decompression bomb guard",
    "float.tif": "unreadable mode F",
    "tiny.png": "too small: 6x6 px",
    "badcap.png": "caption file badcap.txt is not UTF-8 text",
}


def test_every_bad_file_kind_is_skipped_with_its_reason(tmp_path):
    root = _bad_dataset(tmp_path / "bad")
    r = check_dataset(root, config=_cfg(root))
    assert r.usable_count == 1 and r.image_count == 1 + len(BAD_REASONS)
    reasons = {b.path: b.reason for b in r.bad_files}
    assert set(reasons) == set(BAD_REASONS)
    for path, expected in BAD_REASONS.items():
        assert reasons[path].startswith(expected), (path, reasons[path])
    ds = open_training_dataset(_cfg(root), seed=0)
    assert [rec.key for rec in ds.records] == ["good.png"]
    assert len(ds.report.bad_files) == len(BAD_REASONS)  # the run keeps the list for its report


def test_pixel_limit_is_a_parameter():
    expected = "decompression bomb guard: 32x32 = 1024 pixels exceeds the limit of 100"
    with pytest.raises(UnusableImageError, match=expected):
        open_image(_png(), max_pixels=100)


def test_no_usable_image_is_a_clear_error(tmp_path):
    root = _bad_dataset(tmp_path / "bad")
    (root / "good.png").unlink()
    with pytest.raises(NoUsableImagesError) as e:
        open_training_dataset(_cfg(root), seed=0)
    message = str(e.value)
    assert "no usable image" in message and "empty.png: empty file (0 bytes)" in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoUsableImagesError, match="0 image"):
        open_training_dataset(_cfg(tmp_path / "empty"))
    kohya = tmp_path / "kohya"
    _write(kohya / "10_x" / "notes.md", "x")
    _write(kohya / "loose.png", _png())
    with pytest.raises(NoUsableImagesError, match="outside the repeat folders"):
        open_training_dataset(_cfg(kohya))


# ---- buckets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_upscale", [1.0, 1.5])
@pytest.mark.parametrize("enabled", [True, False])
def test_buckets_never_upscale_past_the_limit(max_upscale, enabled):
    spec = BucketSpec(resolution=64, step=8, max_upscale=max_upscale, enabled=enabled)
    assert (spec.min_side, spec.max_side) == (32, 128)
    for w in range(20, 400, 13):
        for h in range(20, 400, 17):
            try:
                bw, bh = spec.assign(w, h)
            except UnusableImageError as e:
                assert "too small" in str(e)
                assert min(w, h) * max_upscale < 40 or not enabled  # only images too small for a 32 px side
                continue
            assert bw % 8 == 0 and bh % 8 == 0 and 32 <= min(bw, bh) and max(bw, bh) <= 128
            assert max(bw / w, bh / h) <= max_upscale + 1e-9, (w, h, bw, bh)
            assert bw * bh <= 64 * 64
            if not enabled:
                assert bw == bh


def test_bucket_choice_follows_the_aspect_ratio():
    spec = BucketSpec(resolution=64, step=8)
    assert spec.assign(640, 640) == (64, 64)
    bw, bh = spec.assign(1200, 600)  # 2:1 landscape gets a wide bucket of about 64^2 pixels
    assert bw / bh == pytest.approx(2, rel=0.2) and bw * bh >= 0.85 * 64 * 64
    bw, bh = spec.assign(600, 1200)
    assert bh / bw == pytest.approx(2, rel=0.2)
    assert spec.assign(40, 40) == (40, 40)  # smaller than 64: its own bucket, not blown up
    assert BucketSpec(resolution=64, step=8, max_upscale=2.0).assign(40, 40) == (64, 64)
    assert BucketSpec(resolution=64, step=8, enabled=False).assign(1200, 600) == (64, 64)
    assert BucketSpec(resolution=32, step=4).assign(30, 30) == (28, 28)  # the tiny model's 4 px grid


# ---- crops and flips -------------------------------------------------------------------------------


def _two_tone(w: int, h: int) -> Image.Image:
    """Left half red, right half blue, with a green top-left pixel to track flips."""
    img = Image.new("RGB", (w, h), BLUE)
    img.paste(Image.new("RGB", (w // 2, h), RED), (0, 0))
    img.putpixel((0, 0), GREEN)
    return img


def test_center_crop_and_size_conditioning():
    img, crop = prepare_image(_two_tone(64, 32), (32, 32))
    assert img.size == (32, 32)
    # 64x32 covers 32x32 at scale 1 after resizing to 64x32 (no resize), centre window from x=16
    assert crop.original_size == (32, 64) and crop.resized_size == (32, 64)
    assert crop.crop_top_left == (0, 16) and crop.target_size == (32, 32) and not crop.flipped
    arr = np.asarray(img).astype(int)
    assert arr[16, 4, 0] > 180 and arr[16, 28, 2] > 180  # red on the left, blue on the right


def test_random_crop_and_flip_are_deterministic_per_seed():
    src = _two_tone(96, 32)

    def run(seed):
        img, crop = prepare_image(src, (32, 32), random_crop=True, random_flip=True,
                                  rng=np.random.default_rng([seed, 0, 7]))
        return np.asarray(img), crop

    for seed in range(5):
        a, ca = run(seed)
        b, cb = run(seed)
        assert np.array_equal(a, b) and ca == cb
    crops = {run(seed)[1].crop_top_left for seed in range(40)}
    flips = [run(seed)[1].flipped for seed in range(40)]
    assert len(crops) > 5 and 8 < sum(flips) < 32
    flipped_seed = flips.index(True)
    img, crop = prepare_image(_two_tone(32, 32), (32, 32), random_flip=True,
                              rng=np.random.default_rng([flipped_seed, 0, 7]))
    assert crop.flipped and np.asarray(img)[0, 31].tolist() == list(GREEN)  # mirrored: the marker moved right


def test_flip_switch_does_not_change_crops():
    src = _two_tone(96, 32)
    for seed in range(10):
        _, a = prepare_image(src, (32, 32), random_crop=True, rng=np.random.default_rng(seed))
        _, b = prepare_image(src, (32, 32), random_crop=True, random_flip=True, rng=np.random.default_rng(seed))
        expected = a.crop_top_left if not b.flipped else (a.crop_top_left[0], 96 - 32 - a.crop_top_left[1])
        assert b.crop_top_left == expected


def _aug_dataset(tmp_path, **kw) -> TrainDataset:
    root = tmp_path / "aug"
    root.mkdir()
    for i in range(4):
        _two_tone(48, 32).save(root / f"{i}.png")
        _write(root / f"{i}.txt", "a, b, c, d, e")
    return open_training_dataset(_cfg(root, **kw), seed=0)


def test_samples_are_tensors_for_the_vae_and_deterministic(tmp_path):
    ds = _aug_dataset(tmp_path, random_crop=True, random_flip=True, shuffle_caption=True, repeats=3)
    assert len(ds) == 12
    s = ds[5]
    # 48x32 (3:2) goes to the 40x24 bucket, the nearest aspect on the 8 px grid within 32^2 pixels
    assert s["pixel_values"].dtype == torch.float32 and s["pixel_values"].shape == (3, 24, 40)
    assert s["pixel_values"].min() >= -1 and s["pixel_values"].max() <= 1
    assert s["target_size"] == (24, 40) and s["original_size"] == (32, 48)
    again = ds[5]
    assert torch.equal(s["pixel_values"], again["pixel_values"]) and s["caption"] == again["caption"]
    epoch0 = [(ds[i]["flipped"], ds[i]["crop_top_left"], ds[i]["caption"]) for i in range(len(ds))]
    ds.set_epoch(1)
    epoch1 = [(ds[i]["flipped"], ds[i]["crop_top_left"], ds[i]["caption"]) for i in range(len(ds))]
    assert epoch0 != epoch1
    ds.set_epoch(0)
    assert [(ds[i]["flipped"], ds[i]["crop_top_left"], ds[i]["caption"]) for i in range(len(ds))] == epoch0
    batch = collate([ds[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 24, 40) and len(batch["caption"]) == 3
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_bucket_batches(tmp_path):
    root = tmp_path / "mixed"
    for i in range(5):
        _write(root / f"wide{i}.png", _png((64, 32)))
    for i in range(3):
        _write(root / f"square{i}.png", _png((32, 32)))
    ds = open_training_dataset(_cfg(root, repeats=2), seed=3)
    batches = ds.bucket_batches(4, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(16))
    for b in batches:
        assert len({ds.records[ds.index[i]].bucket for i in b}) == 1
    assert batches == ds.bucket_batches(4, epoch=0)
    assert batches != ds.bucket_batches(4, epoch=1)
    assert all(len(b) == 4 for b in ds.bucket_batches(4, epoch=0, drop_last=True))


def test_held_out_split(tmp_path):
    root = _folder(tmp_path / "set", n=6)
    _write(root / "dup.png", (root / "img0.png").read_bytes())  # same bytes as img0: must stay together
    ds = open_training_dataset(_cfg(root, repeats=5, random_flip=True), seed=1)
    train, held = ds.split_held_out(count=2)
    assert len(held.records) >= 2 and len(train.records) + len(held.records) == 7
    assert not {r.sha256 for r in train.records} & {r.sha256 for r in held.records}
    assert len(held) == len(held.records) and not held.augment  # no repeats, no flips
    assert [r.key for r in ds.split_held_out(count=2)[1].records] == [r.key for r in held.records]
    assert ds.split_held_out() == (ds, None)
    assert len(ds.split_held_out(fraction=0.01)[1].records) >= 1
    with pytest.raises(DatasetError, match="validation.held_out_count holds out 7 of 7"):
        ds.split_held_out(count=7)


# ---- captions ------------------------------------------------------------------------------------


def test_trigger_word_and_template():
    assert apply_trigger("a red circle", "zk") == "zk, a red circle"
    assert apply_trigger("a ZK red circle", "zk") == "a ZK red circle"  # present (any case): left alone
    assert apply_trigger("zkstripes, red", "zk") == "zk, zkstripes, red"  # whole words only
    assert apply_trigger("", "zk") == "zk"
    assert apply_trigger("  red  ", "") == "red"
    assert apply_trigger("red", "zk", "{caption}, in the style of {trigger}") == "red, in the style of zk"
    assert apply_trigger("red", "zk", "{caption}") == "red"


def test_caption_dropout_rate():
    drops = [build_caption("a, b", dropout_rate=0.3, rng=np.random.default_rng(i)) == "" for i in range(2000)]
    assert 0.25 < sum(drops) / 2000 < 0.35
    assert all(build_caption("a, b", rng=np.random.default_rng(i)) == "a, b" for i in range(50))


def test_shuffle_keeps_the_first_tokens_and_every_tag():
    caption = "zk, solo, red, blue, green, hat"
    outs = {shuffle_tags(caption, 2, np.random.default_rng(i)) for i in range(40)}
    assert len(outs) > 10
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["zk", "solo"] and sorted(tags) == sorted(caption.split(", "))
    assert shuffle_tags(caption, 2, np.random.default_rng(5)) == shuffle_tags(caption, 2, np.random.default_rng(5))
    assert shuffle_tags(caption, 10, np.random.default_rng(5)) == caption
    assert build_caption("red, blue", trigger_word="zk", shuffle=True, rng=np.random.default_rng(0)).startswith("zk, ")


def test_dropout_does_not_change_the_other_draws():
    def shuffles(rate):
        return [build_caption("a, b, c, d", shuffle=True, dropout_rate=rate, rng=np.random.default_rng(i))
                for i in range(50)]

    assert [s for s in shuffles(0.5) if s] == [s for s, d in zip(shuffles(0.0), shuffles(0.5)) if d]


# ---- fingerprint ---------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_sensitive(tmp_path):
    root = _folder(tmp_path / "set", n=3)
    cfg = _cfg(root)
    base = check_dataset(root, config=cfg).fingerprint
    assert check_dataset(root, config=cfg).fingerprint == base
    copy = tmp_path / "elsewhere" / "set"
    shutil.copytree(root, copy)
    (copy / "img0.png").touch()
    assert check_dataset(copy, config=_cfg(copy)).fingerprint == base  # place and mtime do not matter
    (copy / "img1.txt").write_text("tag1, changed")
    assert check_dataset(copy, config=_cfg(copy)).fingerprint != base
    shutil.rmtree(copy)
    shutil.copytree(root, copy)
    _write(copy / "img2.png", _png(colour=(1, 2, 3)))
    assert check_dataset(copy, config=_cfg(copy)).fingerprint != base
    shutil.rmtree(copy)
    shutil.copytree(root, copy)
    (copy / "img2.png").rename(copy / "renamed.png")
    (copy / "img2.txt").rename(copy / "renamed.txt")
    assert check_dataset(copy, config=_cfg(copy)).fingerprint != base
    # options that change how captions are trained, not the data, leave it alone
    assert check_dataset(root, config=replace(cfg, trigger_word="zk", random_flip=True)).fingerprint == base
    assert open_training_dataset(cfg).fingerprint == base


def test_duplicates_by_content(tmp_path):
    root = _folder(tmp_path / "set", n=2)
    _write(root / "copy.png", (root / "img1.png").read_bytes())
    r = check_dataset(root, config=_cfg(root))
    assert r.duplicates == [["copy.png", "img1.png"]]


# ---- CLI -------------------------------------------------------------------------------------------


def test_cli_datasets_check_json(tmp_path, capsys):
    root = _bad_dataset(tmp_path / "bad")
    assert main(["datasets", "check", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "folder" and report["usable_count"] == 1
    assert report["resolution"] == 32 and report["bucket_step"] == 8  # the tiny model's defaults
    assert {b["path"]: b["reason"] for b in report["bad_files"]}["empty.png"] == "empty file (0 bytes)"
    assert main(["datasets", "check", str(root), "--json", "--resolution", "64"]) == 0
    assert json.loads(capsys.readouterr().out)["resolution"] == 64


def test_cli_datasets_check_human_and_exit_codes(tmp_path, capsys):
    shipped = REPO / "datasets" / "striped"
    assert main(["datasets", "check", str(shipped), "--config", str(shipped / "train.toml")]) == 0
    out = capsys.readouterr().out
    assert "kohya" in out and "10_zkstripes x10" in out and "zkstripes 28" in out
    (tmp_path / "empty").mkdir()
    assert main(["datasets", "check", str(tmp_path / "empty")]) == 1
    assert main(["datasets", "check", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["datasets", "check", str(shipped), "--bucket-step", "6"]) == 2
    assert "dataset.bucket_reso_steps must be a multiple of 4" in capsys.readouterr().err
