"""Training datasets: layouts, captions, aspect-ratio buckets, image decoding, checks and fingerprints.

What a user points the trainer at, in the four layouts the ecosystem uses (found automatically):

- ``folder``: images with a same-name caption file beside each (``cat.png`` + ``cat.txt``), in
  any sub-folders;
- ``imagefolder``: Hugging Face's layout, images plus ``metadata.jsonl`` (``file_name`` and a
  ``text``/``caption``/``prompt`` column), read through ``datasets.load_dataset("imagefolder")``;
- ``kohya``: repeat folders ``N_name`` (``10_mystyle`` = every image in it 10 times per epoch);
  captions from sidecar files, else the folder's name part (``mystyle``), as kohya does;
- ``save_to_disk``: a ``datasets.Dataset`` (or ``DatasetDict``'s train split) saved with
  ``save_to_disk``, with an image column and a caption column.

Every image is decoded once when the dataset is scanned, so a corrupt, truncated, empty,
non-image, oversized ("decompression bomb") or unconvertible file is skipped with its reason before
any model is loaded; a dataset left with no usable image raises
:class:`~studio.core.errors.NoUsableImagesError`. :func:`check_dataset` returns the same scan as a
:class:`DatasetReport` (``lora-studio datasets check``); :func:`open_training_dataset` returns a
:class:`TrainDataset`, a map-style dataset a ``torch.utils.data.DataLoader`` can read, with
bucket-grouped batches, deterministic augmentation per (seed, epoch, sample) and a held-out split.

Not here: VAE latents, text embeddings and their caches, and the training loop (``trainer/loop.py``).
Nothing imports torch until a sample's pixels are asked for, and Hugging Face ``datasets`` only for
the two layouts that need it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import struct
import tempfile
import warnings
import zlib
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from studio.core.errors import DatasetError, DatasetNotFoundError, NoUsableImagesError, UnusableImageError
from studio.core.settings import get_settings
from trainer.config import DatasetConfig, base_model_defaults, default_bucket_bounds

LAYOUTS: dict[str, str] = {
    "folder": "images with same-name caption files",
    "imagefolder": "Hugging Face imagefolder: images + metadata.jsonl",
    "kohya": "kohya repeat folders N_name (each image N times per epoch)",
    "save_to_disk": "a Hugging Face dataset saved with save_to_disk",
}
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CAPTION_COLUMNS = ("text", "caption", "prompt")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# 8192 x 8192 = 67 Mpx: above any camera a LoRA dataset comes from, and below PIL's own guard
# (89 Mpx warns, 179 Mpx refuses). A 67 Mpx RGB image already takes 200 MB once decoded.
DEFAULT_MAX_PIXELS = 8192 * 8192
MASK_SUFFIX = "-masklabel"  # OneTrainer's name for a loss mask beside an image
# Files that belong in a dataset folder without being images: never reported as ignored.
_QUIET_SUFFIXES = frozenset({".txt", ".caption", ".toml", ".md", ".json", ".jsonl", ".csv", ".parquet",
                             ".arrow", ".npz", ".safetensors"})
_KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")
_SKIP_DIRS = frozenset({"__MACOSX", "__pycache__"})


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkippedFile:
    """A file that is not trained on, and why (path relative to the dataset folder)."""

    path: str
    reason: str


@dataclass(frozen=True)
class ImageRecord:
    """One usable image: where it is, its caption as written, and what the scan measured.

    ``size`` and ``bucket`` are ``(width, height)`` after EXIF orientation. ``caption`` is the raw
    caption from the dataset ("" when there is none); the trigger word and template are applied per
    sample. ``file`` is an absolute path, or ``None`` for a row of a saved dataset (``row``).
    """

    key: str
    caption: str
    caption_source: str
    folder: str
    repeats: int
    sha256: str
    size: tuple[int, int]
    bucket: tuple[int, int]
    file: str | None = None
    row: int | None = None
    reg: bool = False  # a regularisation (class) image: no trigger word, weighted by prior_loss_weight


@dataclass
class DatasetReport:
    """What :func:`check_dataset` found. Counts are images, except ``samples_per_epoch`` (x repeats).

    ``tag_frequency`` has kohya's ``ss_tag_frequency`` shape, ``{folder: {tag: count}}``, counted on
    the captions as trained (trigger word and template applied, before dropout and shuffling), so
    the trigger word shows up in it. ``buckets`` maps ``"WxH"`` to images; ``duplicates`` lists
    groups of paths with identical bytes. ``bad_files`` are the images skipped (unreadable, or too
    small for the smallest bucket), ``ignored_files`` the files the layout leaves out (not an image
    type, outside the repeat folders, not listed in metadata.jsonl).
    """

    path: str
    layout: str
    layout_description: str
    image_count: int
    usable_count: int
    samples_per_epoch: int
    repeats: dict[str, int]
    captioned_count: int
    caption_sources: dict[str, int]
    tag_frequency: dict[str, dict[str, int]]
    buckets: dict[str, int]
    duplicates: list[list[str]]
    bad_files: list[SkippedFile]
    ignored_files: list[SkippedFile]
    fingerprint: str
    resolution: int
    bucket_step: int
    notes: list[str] = field(default_factory=list)

    @property
    def caption_coverage(self) -> float:
        """Fraction of usable images with a non-empty caption (1.0 for an empty dataset)."""
        return self.captioned_count / self.usable_count if self.usable_count else 1.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["caption_coverage"] = round(self.caption_coverage, 4)
        return d

    def summary(self) -> str:
        """One line: layout, counts and the first skipped files (for errors and logs)."""
        text = (f"{self.path} ({self.layout}): {self.image_count} image(s) found, {self.usable_count} usable, "
                f"{len(self.bad_files)} skipped")
        if self.bad_files:
            shown = "; ".join(f"{b.path}: {b.reason}" for b in self.bad_files[:5])
            more = f"; and {len(self.bad_files) - 5} more" if len(self.bad_files) > 5 else ""
            text += f" ({shown}{more})"
        if self.ignored_files:
            text += f"; {len(self.ignored_files)} file(s) ignored (first: {self.ignored_files[0].path}: " \
                    f"{self.ignored_files[0].reason})"
        return text


# --------------------------------------------------------------------------------------------
# buckets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BucketSpec:
    """Aspect-ratio buckets: sides are multiples of ``step`` and hold about ``resolution``^2 pixels.

    The standard buckets are, for every width w on the grid between ``min_side`` and
    ``max_side``, the tallest height h on the grid with w x h <= resolution^2 (kohya's scheme).
    An image goes to the bucket nearest its aspect ratio, resized to cover it and cropped. If
    that would enlarge it by more than ``max_upscale``, it gets its own smaller bucket instead:
    its size times ``max_upscale`` rounded down to the grid, so it is never blown up. With
    ``enabled`` off the only standard bucket is the square ``resolution`` x ``resolution``.
    """

    resolution: int
    step: int = 8
    min_side: int = 0
    max_side: int = 0
    max_upscale: float = 1.0
    enabled: bool = True

    def __post_init__(self) -> None:
        low, high = default_bucket_bounds(self.resolution, self.step)
        object.__setattr__(self, "min_side", self.min_side or low)
        object.__setattr__(self, "max_side", self.max_side or high)

    @classmethod
    def from_config(cls, config: DatasetConfig) -> BucketSpec:
        if not config.resolution or not config.bucket_reso_steps:
            raise ValueError("dataset.resolution and dataset.bucket_reso_steps are 0 ('the base model's own'): "
                             "call TrainConfig.resolved() first")
        return cls(resolution=config.resolution, step=config.bucket_reso_steps, min_side=config.min_bucket_reso,
                   max_side=config.max_bucket_reso, max_upscale=config.max_upscale, enabled=config.enable_bucket)

    def buckets(self) -> list[tuple[int, int]]:
        return _standard_buckets(self.resolution, self.step, self.min_side, self.max_side, self.enabled)

    def assign(self, width: int, height: int) -> tuple[int, int]:
        """The ``(width, height)`` bucket of an image; raises UnusableImageError if it is too small."""
        aspect = math.log(width / height)
        # Nearest aspect ratio first (in log space, so 2:1 and 1:2 are equally far from 1:1), then
        # the larger bucket.
        best = min(self.buckets(), key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))
        if max(best[0] / width, best[1] / height) <= self.max_upscale + 1e-9:
            return best
        # Too small for a standard bucket: scale by at most max_upscale, and never past resolution^2
        # pixels, then round down to the grid. Rounding down means the cover scale is <= that scale.
        scale = min(self.max_upscale, math.sqrt(self.resolution**2 / (width * height)))
        if self.enabled:
            bw = min(self.max_side, int(width * scale) // self.step * self.step)
            bh = min(self.max_side, int(height * scale) // self.step * self.step)
        else:
            bw = bh = int(min(width, height) * scale) // self.step * self.step
        if min(bw, bh) < self.min_side:
            raise UnusableImageError(
                f"too small: {width}x{height} px would need a {bw}x{bh} bucket (no more than {self.max_upscale:g}x "
                f"upscaling), below the smallest bucket side {self.min_side} (dataset.min_bucket_reso)"
            )
        return bw, bh


@lru_cache(maxsize=64)
def _standard_buckets(resolution: int, step: int, low: int, high: int, enabled: bool) -> list[tuple[int, int]]:
    if not enabled:
        return [(resolution, resolution)]
    area = resolution * resolution
    out = []
    for w in range(low, high + 1, step):
        h = min(high, area // w // step * step)
        if h >= low:
            out.append((w, h))
    if not out:
        raise DatasetError(f"no bucket fits between {low} and {high} px on a {step} px grid at resolution {resolution}")
    return out


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


def open_image(source: str | Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               keep_alpha: bool = False) -> Image.Image:
    """Decode an image to RGB: EXIF orientation applied, transparency composited onto white
    (``keep_alpha``: an image with transparency is returned as RGBA instead, for its mask).

    Palette, greyscale, 16-bit, CMYK and LAB images are converted; 16-bit values map 65535 to 255
    (divide by 257). Raises :class:`~studio.core.errors.UnusableImageError` with a reason for an empty
    file, something that is not an image, a corrupt or truncated file, an image over
    ``max_pixels`` (a decompression bomb), and floating-point images (no agreed value range).
    """
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        data = _read_file(Path(source))
    if not data:
        raise UnusableImageError("empty file (0 bytes)")
    # catch_warnings changes process-wide filters: fine for the scan and for DataLoader workers,
    # which are processes; threads decoding at once could briefly see each other's filter.
    with warnings.catch_warnings():
        # PIL warns between 89 and 179 Mpx and raises above: both mean "do not decode this".
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise UnusableImageError(
                    f"decompression bomb guard: {width}x{height} = {width * height} pixels exceeds the limit of "
                    f"{max_pixels}"
                )
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise UnusableImageError(f"decompression bomb guard: {e}") from None
        except UnidentifiedImageError:
            raise UnusableImageError("not an image: no image format recognises its bytes") from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as e:
            # PIL reports broken data with all of these, depending on the format's decoder.
            raise UnusableImageError(f"corrupt or truncated: {e}") from None
    if img.width == 0 or img.height == 0:
        raise UnusableImageError("corrupt: the image has no pixels")
    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, struct.error, KeyError, TypeError) as e:
        raise UnusableImageError(f"corrupt EXIF orientation: {e}") from None
    if keep_alpha and (img.mode in ("RGBA", "RGBa", "LA", "La", "PA", "P") or "transparency" in img.info):
        return img.convert("RGBA")
    return _to_rgb(img)


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UnusableImageError("missing file") from None
    except OSError as e:
        raise UnusableImageError(f"cannot read file: {e.strerror or e}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "F":
        raise UnusableImageError("unreadable mode F: floating-point pixels have no agreed range; "
                                 "save the image as 8- or 16-bit")
    if mode.startswith("I"):
        # 16-bit greyscale (PNG/TIFF) opens as I;16* or I; 65535 / 257 = 255.
        values = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA", "P") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise UnusableImageError(f"unreadable mode {mode}: {e}") from None


@dataclass(frozen=True)
class Crop:
    """How a sample was cut from its image, for SDXL-style size conditioning and latent caches.

    ``original_size`` and ``target_size`` are ``(height, width)`` as SDXL orders them;
    ``crop_top_left`` is ``(top, left)`` in the resized image as presented (after a flip, measured
    from the mirrored image's left edge).
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]
    flipped: bool


def prepare_image(
    img: Image.Image,
    bucket: tuple[int, int],
    *,
    random_crop: bool = False,
    random_flip: bool = False,
    rng: np.random.Generator | None = None,
) -> tuple[Image.Image, Crop]:
    """Resize ``img`` to cover ``bucket`` (width, height), crop to it, maybe mirror it.

    The crop is centred unless ``random_crop``; with ``random_flip`` half the samples are mirrored.
    Both draw from ``rng`` (always the same two draws, so one switch does not change the other's
    choices).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    u_crop, u_flip = rng.random(2)
    bw, bh = bucket
    w, h = img.size
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), Image.Resampling.LANCZOS)
    if random_crop:
        # One uniform draw picks the offset along the one axis with slack (cover-resize leaves at
        # most one, give or take a rounding pixel on the other).
        left, top = int(u_crop * (rw - bw + 1)), int(u_crop * (rh - bh + 1))
        left, top = min(left, rw - bw), min(top, rh - bh)
    else:
        left, top = (rw - bw) // 2, (rh - bh) // 2
    img = img.crop((left, top, left + bw, top + bh))
    flipped = bool(random_flip and u_flip < 0.5)
    if flipped:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = rw - bw - left
    return img, Crop(original_size=(h, w), resized_size=(rh, rw), crop_top_left=(top, left),
                     target_size=(bh, bw), flipped=flipped)


def to_tensor(img: Image.Image):
    """An RGB image as a float32 CHW tensor in [-1, 1], what the VAE encoder expects."""
    import torch

    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0  # 0 -> -1, 255 -> 1
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


# --------------------------------------------------------------------------------------------
# captions
# --------------------------------------------------------------------------------------------


def contains_trigger(caption: str, trigger_word: str) -> bool:
    """Whether ``trigger_word`` appears in ``caption`` as whole words (case-insensitive)."""
    if not trigger_word:
        return True
    return re.search(rf"(?<!\w){re.escape(trigger_word)}(?!\w)", caption, re.IGNORECASE) is not None


def apply_trigger(caption: str, trigger_word: str = "", template: str = "{trigger}, {caption}") -> str:
    """The caption with the trigger word added through ``template``, unless it already has it."""
    caption = caption.strip()
    if not trigger_word or contains_trigger(caption, trigger_word):
        return caption
    if not caption:
        return trigger_word
    text = template.format(trigger=trigger_word, caption=caption)
    # A template such as "{trigger}, {caption}" can leave doubled or dangling commas when a part
    # is blank: tidy them.
    return re.sub(r"\s*,(\s*,)+\s*", ", ", text).strip().strip(",").strip()


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def shuffle_tags(caption: str, keep_tokens: int, rng: np.random.Generator) -> str:
    """Shuffle comma-separated tags, keeping the first ``keep_tokens`` in place (kohya's rule)."""
    tags = split_tags(caption)
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    order = rng.permutation(len(tail))
    return ", ".join(head + [tail[i] for i in order])


def build_caption(
    raw: str,
    *,
    trigger_word: str = "",
    template: str = "{trigger}, {caption}",
    shuffle: bool = False,
    keep_tokens: int = 0,
    dropout_rate: float = 0.0,
    rng: np.random.Generator | None = None,
) -> str:
    """The caption a sample is trained with: dropout, then tag shuffle, then the trigger word.

    A dropped caption is "" (unconditional, which is what caption dropout is for). The dropout
    draw is always made, so turning dropout on does not change which shuffles the others get.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    if rng.random() < dropout_rate:
        return ""
    caption = shuffle_tags(raw, keep_tokens, rng) if shuffle else raw
    return apply_trigger(caption, trigger_word, template)


# --------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------


@dataclass
class _Candidate:
    """An image the layout says belongs to the dataset, before it is decoded."""

    key: str
    folder: str
    repeats: int
    caption: str
    caption_source: str
    file: Path | None = None
    row: int | None = None
    error: str | None = None  # known before decoding: missing file, unreadable caption file


@dataclass
class _Discovery:
    layout: str
    candidates: list[_Candidate]
    ignored: list[SkippedFile]
    notes: list[str]
    saved: tuple[str, str | None, str] | None = None  # (folder, split, image column) for save_to_disk


def detect_layout(root: str | Path) -> str:
    """Which of :data:`LAYOUTS` a folder uses (see the module docstring for the rules)."""
    root = Path(root)
    if (root / "dataset_dict.json").is_file() or ((root / "state.json").is_file()
                                                   and (root / "dataset_info.json").is_file()):
        return "save_to_disk"
    if _metadata_files(root):
        return "imagefolder"
    if any(_KOHYA_FOLDER.match(d.name) for d in _subdirs(root)):
        return "kohya"
    return "folder"


def _subdirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not _hidden(d.name))


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in _SKIP_DIRS


def _metadata_files(root: Path) -> list[Path]:
    # At the top or one level down (the train/ split folder of an imagefolder).
    found = [root / m for m in METADATA_FILES if (root / m).is_file()]
    for d in _subdirs(root):
        found += [d / m for m in METADATA_FILES if (d / m).is_file()]
    return found


def _walk(root: Path) -> list[Path]:
    """Every file under ``root``, sorted, skipping hidden files and folders."""
    out = []
    for path in root.rglob("*"):
        rel = path.relative_to(root).parts
        if any(_hidden(p) for p in rel) or not path.is_file():
            continue
        out.append(path)
    return sorted(out)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not is_mask_name(path)


def is_mask_name(path: str | Path) -> bool:
    """A mask image beside a training image (``<name>-masklabel.png``), not a training image itself."""
    return Path(path).stem.endswith(MASK_SUFFIX) and Path(path).suffix.lower() in IMAGE_EXTENSIONS


def mask_path(image: str | Path) -> Path:
    """Where the mask of ``image`` lies: ``<name>-masklabel.png`` beside it (OneTrainer's convention)."""
    image = Path(image)
    return image.with_name(f"{image.stem}{MASK_SUFFIX}.png")


def open_mask(data: bytes, *, from_alpha: bool, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image | None:
    """A greyscale mask (white = learn), EXIF orientation applied as for the image: a mask file's
    luminance, or (``from_alpha``) an image's alpha channel; None when an image has no alpha."""
    img = open_image(data, max_pixels=max_pixels, keep_alpha=True)
    if not from_alpha:
        return img.convert("L")
    return img.getchannel("A") if "A" in img.getbands() else None


def _other_file(path: Path, root: Path, caption_extension: str) -> SkippedFile | None:
    suffix = path.suffix.lower()
    if suffix in _QUIET_SUFFIXES or suffix == caption_extension.lower() or is_mask_name(path):
        return None
    return SkippedFile(_rel(path, root), f"not an image file type ({suffix or 'no extension'})")


def _read_caption(image: Path, extension: str) -> tuple[str | None, str | None]:
    """(caption, error) from the sidecar file; caption None when there is no sidecar.

    Like kohya, the first non-empty line is the caption (a UTF-8 byte-order mark is dropped).
    """
    sidecar = image.with_suffix(extension)
    if not extension or not sidecar.is_file():
        return None, None
    try:
        text = sidecar.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        return None, f"caption file {sidecar.name} is not UTF-8 text"
    except OSError as e:
        return None, f"cannot read caption file {sidecar.name}: {e.strerror or e}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else ""), None


def _discover_folder(root: Path, cfg: DatasetConfig) -> _Discovery:
    candidates, ignored = [], []
    for path in _walk(root):
        if not _is_image_name(path):
            if (skipped := _other_file(path, root, cfg.caption_extension)) is not None:
                ignored.append(skipped)
            continue
        caption, error = _read_caption(path, cfg.caption_extension)
        candidates.append(_Candidate(key=_rel(path, root), folder=root.name, repeats=cfg.repeats,
                                     caption=caption or "", caption_source="sidecar" if caption else "none",
                                     file=path, error=error))
    return _Discovery("folder", candidates, ignored, [])


def _discover_kohya(root: Path, cfg: DatasetConfig) -> _Discovery:
    candidates, ignored, notes = [], [], []
    repeat_dirs = {}
    for d in _subdirs(root):
        m = _KOHYA_FOLDER.match(d.name)
        if m:
            repeat_dirs[d.name] = (int(m.group(1)), m.group(2).strip())
    for path in _walk(root):
        top = path.relative_to(root).parts[0]
        if not _is_image_name(path):
            if (skipped := _other_file(path, root, cfg.caption_extension)) is not None:
                ignored.append(skipped)
            continue
        if top not in repeat_dirs or len(path.relative_to(root).parts) == 1:
            ignored.append(SkippedFile(_rel(path, root), "outside the repeat folders: in the kohya layout images go "
                                                         "in folders named N_name, e.g. 10_mystyle"))
            continue
        n, name = repeat_dirs[top]
        if n == 0:
            ignored.append(SkippedFile(_rel(path, root), f"in {top}: a repeat count of 0 trains nothing"))
            continue
        caption, error = _read_caption(path, cfg.caption_extension)
        if caption:
            source = "sidecar"
        else:
            # kohya's DreamBooth mode: an image without a caption file is captioned with the
            # folder's name part ("10_sks dog" -> "sks dog").
            caption, source = name, "folder name"
        candidates.append(_Candidate(key=_rel(path, root), folder=top, repeats=n * cfg.repeats, caption=caption,
                                     caption_source=source, file=path, error=error))
    if cfg.repeats != 1:
        notes.append(f"repeats: folder counts N multiplied by dataset.repeats ({cfg.repeats})")
    return _Discovery("kohya", candidates, ignored, notes)


@contextmanager
def _quiet_datasets():
    """Import ``datasets`` with its progress bars and logging silenced; restore them afterwards."""
    import datasets

    bars_were_on = not datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


def _caption_column(columns: list[str], cfg: DatasetConfig, where: str) -> str | None:
    if cfg.caption_column:
        if cfg.caption_column not in columns:
            raise DatasetError(f"dataset.caption_column {cfg.caption_column!r} is not a column of {where}; "
                               f"columns: {', '.join(columns)}")
        return cfg.caption_column
    return next((c for c in CAPTION_COLUMNS if c in columns), None)


def _discover_imagefolder(root: Path, cfg: DatasetConfig) -> _Discovery:
    with _quiet_datasets() as datasets, tempfile.TemporaryDirectory(prefix="lora-studio-imagefolder-") as cache:
        # A throw-away cache: the rows are read into memory at once, and nothing is left in
        # ~/.cache. The imagefolder builder ships inside `datasets`, so no network is needed.
        # Explicit data files, not data_dir: with data_dir, datasets picks splits by file name, so
        # the train.toml beside the images becomes the whole "train" split and the images vanish.
        # A train/ folder holding its own metadata is the train split of a split layout.
        base = root / "train" if any(m.parent == root / "train" for m in _metadata_files(root)) else root
        files = [str(p) for p in _walk(base) if _is_image_name(p) or p.name in METADATA_FILES]
        try:
            ds = datasets.load_dataset("imagefolder", data_files={"train": files}, split="train", cache_dir=cache)
        except Exception as e:  # datasets raises many types here (JSON, schema, builder errors)
            names = ", ".join(_rel(m, root) for m in _metadata_files(root))
            raise DatasetError(f"{root}: cannot read {names} as an imagefolder dataset: {e}") from None
        image_columns = [n for n, f in ds.features.items() if isinstance(f, datasets.Image)]
        if not image_columns:
            raise DatasetError(f"{root}: the imagefolder has no image column")
        image_column = image_columns[0]
        columns = [c for c in ds.column_names if c != image_column]
        caption_column = _caption_column(columns, cfg, "metadata.jsonl")
        rows = ds.cast_column(image_column, datasets.Image(decode=False)).to_list()
    candidates, listed = [], set()
    for row in rows:
        path = Path(row[image_column]["path"])
        listed.add(path.resolve())
        caption = row.get(caption_column) if caption_column else None
        caption = caption.strip() if isinstance(caption, str) else ""
        candidates.append(_Candidate(key=_rel(path, root) if path.is_relative_to(root) else str(path),
                                     folder=root.name, repeats=cfg.repeats, caption=caption,
                                     caption_source="metadata" if caption else "none", file=path,
                                     error=None if path.is_file() else "missing file (listed in the metadata)"))
    ignored = []
    for path in _walk(root):
        if _is_image_name(path) and path.resolve() not in listed:
            ignored.append(SkippedFile(_rel(path, root), "not listed in metadata.jsonl"))
        elif not _is_image_name(path) and (skipped := _other_file(path, root, cfg.caption_extension)):
            ignored.append(skipped)
    notes = [] if caption_column else [f"no caption column ({', '.join(CAPTION_COLUMNS)}) in the metadata"]
    candidates.sort(key=lambda c: c.key)
    return _Discovery("imagefolder", candidates, ignored, notes)


@lru_cache(maxsize=4)
def _saved_table(folder: str, split: str | None, image_column: str):
    """A saved dataset with undecoded images (memory-mapped; cached per process for __getitem__)."""
    with _quiet_datasets() as datasets:
        obj = datasets.load_from_disk(folder)
        ds = obj[split] if split is not None else obj
        return ds.cast_column(image_column, datasets.Image(decode=False))


def _discover_saved(root: Path, cfg: DatasetConfig) -> _Discovery:
    with _quiet_datasets() as datasets:
        try:
            obj = datasets.load_from_disk(str(root))
        except Exception as e:  # FileNotFoundError, JSON and Arrow errors, version mismatches
            raise DatasetError(f"{root}: cannot open the dataset saved with save_to_disk: {e}") from None
        split = None
        if isinstance(obj, datasets.DatasetDict):
            if "train" in obj:
                split = "train"
            elif len(obj) == 1:
                split = next(iter(obj))
            else:
                raise DatasetError(f"{root} holds the splits {', '.join(obj)} and none is called 'train': "
                                   f"save the split to train on by itself")
            ds = obj[split]
        else:
            ds = obj
        if cfg.image_column:
            if cfg.image_column not in ds.column_names:
                raise DatasetError(f"dataset.image_column {cfg.image_column!r} is not a column of {root}; "
                                   f"columns: {', '.join(ds.column_names)}")
            image_column = cfg.image_column
        else:
            image_columns = [n for n, f in ds.features.items() if isinstance(f, datasets.Image)]
            if not image_columns:
                raise DatasetError(f"{root} has no image column (a datasets.Image feature); columns: "
                                   f"{', '.join(ds.column_names)}")
            image_column = image_columns[0]
        caption_column = _caption_column([c for c in ds.column_names if c != image_column], cfg, str(root))
        captions = ds[caption_column] if caption_column else [""] * len(ds)
    prefix = f"{split}/" if split else "rows/"
    candidates = []
    for i, caption in enumerate(captions):
        caption = caption.strip() if isinstance(caption, str) else ""
        candidates.append(_Candidate(key=f"{prefix}{i:06d}", folder=root.name, repeats=cfg.repeats, caption=caption,
                                     caption_source="column" if caption else "none", row=i))
    notes = [] if caption_column else [f"no caption column ({', '.join(CAPTION_COLUMNS)})"]
    return _Discovery("save_to_disk", candidates, [], notes, saved=(str(root), split, image_column))


def _row_bytes(saved: tuple[str, str | None, str], row: int) -> bytes:
    value = _saved_table(*saved)[row][saved[2]]
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            return _read_file(Path(value["path"]))
    raise UnusableImageError("the row has no image bytes or path")


_DISCOVER = {
    "folder": _discover_folder,
    "imagefolder": _discover_imagefolder,
    "kohya": _discover_kohya,
    "save_to_disk": _discover_saved,
}


# --------------------------------------------------------------------------------------------
# scanning
# --------------------------------------------------------------------------------------------


@dataclass
class _Scan:
    root: Path
    discovery: _Discovery
    spec: BucketSpec
    records: list[ImageRecord]
    bad: list[SkippedFile]


def _scan(root: str | Path, cfg: DatasetConfig, spec: BucketSpec, max_pixels: int) -> _Scan:
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetNotFoundError(f"dataset folder {root} not found")
    if not root.is_dir():
        raise DatasetNotFoundError(f"{root} is not a folder: point dataset.path at the folder holding the images")
    root = root.resolve()
    discovery = _DISCOVER[detect_layout(root)](root, cfg)
    records, bad = [], []
    for c in discovery.candidates:
        try:
            if c.error:
                raise UnusableImageError(c.error)
            data = _read_file(c.file) if c.file is not None else _row_bytes(discovery.saved, c.row)
            img = open_image(data, max_pixels=max_pixels)
            bucket = spec.assign(*img.size)
        except UnusableImageError as e:
            bad.append(SkippedFile(c.key, e.reason))
            continue
        records.append(ImageRecord(
            key=c.key, caption=c.caption, caption_source=c.caption_source, folder=c.folder, repeats=c.repeats,
            sha256=hashlib.sha256(data).hexdigest(), size=img.size, bucket=bucket,
            file=str(c.file) if c.file is not None else None, row=c.row,
        ))
    return _Scan(root, discovery, spec, records, bad)


def fingerprint(records: list[ImageRecord]) -> str:
    """sha256 over the sorted (path, content sha256, caption) of the images trained on.

    It changes when an image's bytes, its caption or its place change, and not when files are
    touched, copied elsewhere or scanned in another order: a key for latent caches and lineage.
    """
    rows = sorted((r.key, r.sha256, r.caption) for r in records)
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def _report(scan: _Scan, cfg: DatasetConfig) -> DatasetReport:
    records = scan.records
    tags: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        tags[r.folder].update(split_tags(apply_trigger(r.caption, cfg.trigger_word, cfg.caption_template)))
    by_hash: dict[str, list[str]] = defaultdict(list)
    for r in records:
        by_hash[r.sha256].append(r.key)
    buckets = Counter(f"{r.bucket[0]}x{r.bucket[1]}" for r in records)
    repeats = {}
    for r in records:
        repeats.setdefault(r.folder, r.repeats)
    notes = list(scan.discovery.notes)
    uncaptioned = sum(1 for r in records if not r.caption)
    if uncaptioned and cfg.trigger_word:
        notes.append(f"{uncaptioned} image(s) have no caption and train on the trigger word alone")
    elif uncaptioned:
        notes.append(f"{uncaptioned} image(s) have no caption and no trigger word: they train unconditionally")
    return DatasetReport(
        path=str(scan.root),
        layout=scan.discovery.layout,
        layout_description=LAYOUTS[scan.discovery.layout],
        image_count=len(scan.discovery.candidates),
        usable_count=len(records),
        samples_per_epoch=sum(r.repeats for r in records),
        repeats=repeats,
        captioned_count=len(records) - uncaptioned,
        caption_sources=dict(sorted(Counter(r.caption_source for r in records).items())),
        tag_frequency={folder: dict(counter.most_common()) for folder, counter in sorted(tags.items())},
        buckets=dict(sorted(buckets.items(), key=lambda kv: (-kv[1], kv[0]))),
        duplicates=[keys for keys in by_hash.values() if len(keys) > 1],
        bad_files=scan.bad,
        ignored_files=scan.discovery.ignored,
        fingerprint=fingerprint(records),
        resolution=scan.spec.resolution,
        bucket_step=scan.spec.step,
        notes=notes,
    )


def _effective(path: str | Path | None, config: DatasetConfig | None, resolution: int | None,
               bucket_step: int | None) -> DatasetConfig:
    """A dataset config with path, resolution and bucket step filled in (0 = the default base model's)."""
    cfg = config or DatasetConfig()
    changes: dict[str, Any] = {}
    if path is not None:
        changes["path"] = str(path)
    if resolution:
        changes["resolution"] = resolution
    if bucket_step:
        changes["bucket_reso_steps"] = bucket_step
    cfg = replace(cfg, **changes)  # runs the checks again
    if not cfg.resolution or not cfg.bucket_reso_steps:
        facts = base_model_defaults(get_settings().default_base_model)
        cfg = replace(cfg, resolution=cfg.resolution or facts["native_resolution"],
                      bucket_reso_steps=cfg.bucket_reso_steps or facts["latent_granularity"])
    return cfg


def check_dataset(
    path: str | Path,
    *,
    resolution: int | None = None,
    bucket_step: int | None = None,
    config: DatasetConfig | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DatasetReport:
    """Scan a dataset folder and report what training would use; never raises for bad images.

    ``config`` supplies the caption and bucket options (trigger word, caption extension, bucket
    bounds...); ``resolution`` and ``bucket_step`` override it. Left at 0 everywhere, they are the
    default base model's (the tiny model: 32 px on an 8 px grid).
    """
    cfg = _effective(path, config, resolution, bucket_step)
    return _report(_scan(path, cfg, BucketSpec.from_config(cfg), max_pixels), cfg)


# --------------------------------------------------------------------------------------------
# the training dataset
# --------------------------------------------------------------------------------------------


class TrainDataset:
    """Map-style dataset of training samples (a ``DataLoader`` reads it; ``collate`` batches it).

    Sample ``i`` is image ``index[i]`` (each image appears ``repeats`` times). Its augmentation and
    caption are drawn from a generator seeded by ``(seed, epoch, i)``, so a run, a resumed run and
    every worker process see the same samples; call :meth:`set_epoch` at each epoch.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        config: DatasetConfig,
        *,
        seed: int = 0,
        augment: bool = True,
        report: DatasetReport | None = None,
        saved: tuple[str, str | None, str] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.records = list(records)
        self.config = config
        self.seed = seed
        self.augment = augment
        self.report = report
        self.epoch = 0
        self._saved = saved
        self._max_pixels = max_pixels
        train = [i for i, r in enumerate(self.records) if not r.reg for _ in range(r.repeats)]
        # kohya's balance: an epoch holds as many regularisation samples as training samples, the
        # regularisation images (with their repeats) taken in turn, from the first, as often as that needs.
        pool = [i for i, r in enumerate(self.records) if r.reg for _ in range(r.repeats)]
        self.index = train + ([pool[k % len(pool)] for k in range(len(train))] if pool else [])

    def __len__(self) -> int:
        return len(self.index)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, i: int, stream: int, epoch: int | None = None) -> np.random.Generator:
        # Streams: 0 = caption, 1 = image. Independent generators, so a caption option never
        # changes which crops or flips the images get.
        return np.random.default_rng([self.seed, self.epoch if epoch is None else epoch, i, stream])

    def caption(self, i: int, epoch: int | None = None) -> str:
        """The caption sample ``i`` trains with in ``epoch`` (default: the current one)."""
        c = self.config
        record = self.records[self.index[i]]
        trigger = "" if record.reg else c.trigger_word  # the class keeps its own look: no trigger word
        if not self.augment:
            return apply_trigger(record.caption, trigger, c.caption_template)
        return build_caption(record.caption, trigger_word=trigger, template=c.caption_template,
                             shuffle=c.shuffle_caption, keep_tokens=c.keep_tokens,
                             dropout_rate=c.caption_dropout_rate, rng=self._rng(i, 0, epoch))

    def image(self, i: int, epoch: int | None = None) -> tuple[Image.Image, Crop]:
        """Sample ``i``'s image, bucketed, cropped and maybe flipped, with how it was cut."""
        record = self.records[self.index[i]]
        data = _read_file(Path(record.file)) if record.file is not None else _row_bytes(self._saved, record.row)
        img = open_image(data, max_pixels=self._max_pixels)
        return prepare_image(img, record.bucket, random_crop=self.augment and self.config.random_crop,
                             random_flip=self.augment and self.config.random_flip, rng=self._rng(i, 1, epoch))

    def mask(self, i: int, epoch: int | None = None):
        """Sample ``i``'s loss mask as a float32 1xHxW tensor in [0, 1], cut exactly as its image (the same
        bucket, crop and flip, from the same draws); all ones for an image with no mask file and no alpha."""
        import torch

        record = self.records[self.index[i]]
        mask = None
        if record.file is not None and mask_path(record.file).is_file():
            mask = open_mask(_read_file(mask_path(record.file)), from_alpha=False, max_pixels=self._max_pixels)
        else:
            data = _read_file(Path(record.file)) if record.file is not None else _row_bytes(self._saved, record.row)
            mask = open_mask(data, from_alpha=True, max_pixels=self._max_pixels)
        w, h = record.bucket
        if mask is None:
            return torch.ones((1, h, w), dtype=torch.float32)
        if mask.size != record.size:  # a mask drawn at another size still covers the same picture
            mask = mask.resize(record.size, Image.Resampling.BILINEAR)
        mask, _ = prepare_image(mask, record.bucket, random_crop=self.augment and self.config.random_crop,
                                random_flip=self.augment and self.config.random_flip, rng=self._rng(i, 1, epoch))
        return torch.from_numpy(np.asarray(mask, dtype=np.float32)[None] / 255.0)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self.index):
            raise IndexError(f"sample {i} out of range (dataset of {len(self.index)})")
        img, crop = self.image(i)
        record = self.records[self.index[i]]
        extra = {"mask": self.mask(i)} if self.config.masked_loss else {}
        return {
            **extra,
            "pixel_values": to_tensor(img),
            "caption": self.caption(i),
            "reg": record.reg,
            "key": record.key,
            "sha256": record.sha256,
            "index": i,
            "original_size": crop.original_size,
            "crop_top_left": crop.crop_top_left,
            "target_size": crop.target_size,
            "flipped": crop.flipped,
        }

    def bucket_batches(self, batch_size: int, *, epoch: int | None = None, shuffle: bool = True,
                       drop_last: bool = False) -> list[list[int]]:
        """Sample indices in batches whose images share a bucket, shuffled per (seed, epoch).

        A bucket's last batch may be short unless ``drop_last``. Usable as a DataLoader's
        ``batch_sampler``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, record_index in enumerate(self.index):
            groups[self.records[record_index].bucket].append(i)
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch, 2**31])
        batches = []
        for bucket in sorted(groups):
            members = groups[bucket]
            if shuffle:
                members = [members[j] for j in rng.permutation(len(members))]
            for start in range(0, len(members), batch_size):
                batch = members[start:start + batch_size]
                if len(batch) == batch_size or not drop_last:
                    batches.append(batch)
        if shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        return batches

    def split_held_out(self, *, count: int = 0, fraction: float = 0.0) -> tuple[TrainDataset, TrainDataset | None]:
        """(training set, held-out set) for a validation loss; ``(self, None)`` when both are 0.

        Images with identical bytes stay together (a duplicate on both sides would leak). The choice
        depends only on the seed and the image keys. The held-out set has no repeats and no
        augmentation, so its loss is comparable from step to step.
        """
        unique = sum(not r.reg for r in self.records)  # regularisation images are never held out
        wanted = count or (max(1, round(fraction * unique)) if fraction else 0)
        if not wanted:
            return self, None
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(self.records):
            if not r.reg:
                groups[r.sha256].append(i)
        order = sorted(groups, key=lambda h: hashlib.sha256(f"{self.seed}:{self.records[groups[h][0]].key}".encode())
                       .digest())
        held: list[int] = []
        for h in order:
            if len(held) >= wanted:
                break
            held += groups[h]
        if len(held) >= unique:
            option = "validation.held_out_count" if count else "validation.held_out_fraction"
            raise DatasetError(f"{option} holds out {wanted} of {unique} usable image(s), leaving none to train on")
        held_set = set(held)
        train = [r for i, r in enumerate(self.records) if i not in held_set]
        held_records = [replace(self.records[i], repeats=1) for i in sorted(held_set)]
        common = {"seed": self.seed, "saved": self._saved, "max_pixels": self._max_pixels}
        return (TrainDataset(train, self.config, augment=self.augment, report=self.report, **common),
                TrainDataset(held_records, self.config, augment=False, **common))


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a batch from :meth:`TrainDataset.__getitem__` (one bucket, so one tensor shape)."""
    import torch

    batch = {key: [s[key] for s in samples] for key in samples[0] if key not in ("pixel_values", "mask")}
    batch["pixel_values"] = torch.stack([s["pixel_values"] for s in samples])
    if "mask" in samples[0]:
        batch["mask"] = torch.stack([s["mask"] for s in samples])
    return batch


def open_training_dataset(
    config: DatasetConfig, *, seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS
) -> TrainDataset:
    """Scan ``config.path`` and return its :class:`TrainDataset` (``report`` holds the scan).

    ``config`` must be resolved (:meth:`TrainConfig.resolved`). Raises NoUsableImagesError, naming
    what was skipped and why, when no image can be used: before any model is loaded.
    """
    if not config.path:
        raise DatasetError("dataset.path is not set: point it at a folder of images")
    spec = BucketSpec.from_config(config)
    scan = _scan(config.path, config, spec, max_pixels)
    report = _report(scan, config)
    if not scan.records:
        raise NoUsableImagesError(f"no usable image in {report.summary()}")
    return TrainDataset(scan.records + _regularisation_records(config, spec, max_pixels), config, seed=seed,
                        report=report, saved=scan.discovery.saved, max_pixels=max_pixels)


def _regularisation_records(config: DatasetConfig, spec: BucketSpec, max_pixels: int) -> list[ImageRecord]:
    """The images of ``config.reg_data_dir``, bucketed like the dataset's, marked ``reg`` (keys ``reg/...``)."""
    if not config.reg_data_dir:
        return []
    scan = _scan(config.reg_data_dir, config, spec, max_pixels)
    if scan.discovery.saved is not None:
        raise DatasetError(f"dataset.reg_data_dir {config.reg_data_dir} is a saved dataset: regularisation images must "
                           f"be files (a folder of images with captions, kohya folders or an imagefolder)")
    if not scan.records:
        raise NoUsableImagesError(f"no usable regularisation image in {_report(scan, config).summary()} "
                                  f"(dataset.reg_data_dir)")
    return [replace(r, reg=True, key=f"reg/{r.key}") for r in scan.records]


__all__ = [
    "BucketSpec",
    "Crop",
    "DatasetReport",
    "ImageRecord",
    "LAYOUTS",
    "SkippedFile",
    "TrainDataset",
    "apply_trigger",
    "build_caption",
    "check_dataset",
    "collate",
    "detect_layout",
    "fingerprint",
    "open_image",
    "open_training_dataset",
    "prepare_image",
    "shuffle_tags",
    "to_tensor",
]
