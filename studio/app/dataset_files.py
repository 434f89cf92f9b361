"""The studio's dataset area: uploads and zips in, sidecar captions edited in place, crop previews out.

Holds what the Datasets page (and scripts) do to dataset folders: :func:`add_files` copies uploaded
images, caption files and zips into ``$LORA_STUDIO_HOME/datasets/<name>`` with safe names (a zip
entry that would land outside the folder is refused: "zip slip"); :func:`list_images` pages through
a folder's images with their captions; :func:`write_caption` saves one caption to its ``.txt``
sidecar atomically; :func:`crop_preview` shows the bucket and the crop the trainer will use.

Does not hold: reading a dataset for training, layouts and the check report (``trainer/data.py``,
whose :func:`~trainer.data.check_dataset`, ``BucketSpec`` and ``prepare_image`` this module calls so
the preview is exactly what training sees).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from studio.core.atomic import disk_full_error, write_bytes_atomic
from studio.core.errors import (
    DatasetNotFoundError,
    DiskFullError,
    InvalidNameError,
    InvalidRequestError,
    UnusableImageError,
)
from studio.core.settings import SAMPLE_DATASETS_DIR

CAPTION_EXTENSIONS = (".txt", ".caption")
# Per upload: a zip may not expand past 2 GiB or 20,000 entries (a zip bomb stops at the first check,
# before anything is written); a single image above 64 MiB is not a training image.
MAX_EXPANDED_BYTES = 2 * 1024**3
MAX_ZIP_ENTRIES = 20_000
MAX_FILE_BYTES = 64 * 1024**2
MAX_CAPTION_CHARS = 10_000
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_SKIP_PARTS = {"__MACOSX"}


@dataclass
class AddReport:
    """What :func:`add_files` did: files written (relative paths), and files refused with the reason."""

    folder: str
    added: list[str] = field(default_factory=list, metadata={"help": "paths written, relative to the folder"})
    unchanged: list[str] = field(default_factory=list, metadata={"help": "already there with the same bytes"})
    skipped: list[tuple[str, str]] = field(default_factory=list, metadata={"help": "(name as uploaded, why)"})


@dataclass(frozen=True)
class DatasetImage:
    """One image of a folder with its caption (``caption_path`` is the sidecar, which may not exist yet)."""

    path: Path
    rel: str
    caption: str
    caption_path: Path


def datasets_root() -> Path:
    """``$LORA_STUDIO_HOME/datasets``: where uploads go and the Datasets page looks first."""
    from studio.core.settings import get_settings

    return get_settings().home / "datasets"


def sample_datasets_root() -> Path:
    """The sample datasets shipped in the project's ``datasets/`` folder."""
    return SAMPLE_DATASETS_DIR


def dataset_folder(name: str) -> Path:
    """The folder of dataset ``name`` in the studio's area (a registry-style name: no slashes, no dot first)."""
    from adapters.registry import check_name

    try:
        check_name(name, "dataset name")
    except InvalidNameError as e:
        raise InvalidNameError(f"{e}: use letters, digits, '-', '_' and '.', e.g. my_style") from None
    return datasets_root() / name


def list_datasets() -> list[tuple[str, Path]]:
    """(label, folder) for every dataset in the studio's area, then the project's sample datasets."""
    out = []
    for root, prefix in ((datasets_root(), ""), (sample_datasets_root(), "sample: ")):
        if root.is_dir():
            out += [(prefix + d.name, d) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    return out


def _image_suffixes() -> frozenset[str]:
    from trainer.data import IMAGE_EXTENSIONS

    return IMAGE_EXTENSIONS


def safe_name(name: str) -> str:
    """A file name made safe: last path part only, runs of other characters as '_', no leading dot."""
    base = PurePosixPath(name.replace("\\", "/")).name
    stem, dot, suffix = base.rpartition(".")
    if not dot:
        stem, suffix = base, ""
    stem = _SAFE.sub("_", stem).strip("._-")[:100] or "file"
    suffix = _SAFE.sub("", suffix).lower()[:10]
    return f"{stem}.{suffix}" if suffix else stem


def _safe_parts(member: str) -> list[str]:
    """A zip entry's path as safe folder/file names; refuses absolute paths and '..' (zip slip)."""
    raw = member.replace("\\", "/")
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        raise InvalidRequestError(f"zip entry {member!r} has an absolute path: refused")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise InvalidRequestError(f"zip entry {member!r} climbs out of its folder ('..'): refused")
    return [safe_name(p) if i == len(parts) - 1 else (_SAFE.sub("_", p).strip(".") or "_")
            for i, p in enumerate(parts)]


def _check(folder: Path, parts: list[str], data: bytes, shown: str, report: AddReport) -> Path | None:
    """Where an uploaded file should be written, or None with the reason recorded in ``report``.

    The size is checked first: a file over the limit is refused without decoding it (decoding 64 MiB
    of compressed pixels can take seconds and gigabytes of memory).
    """
    suffix = Path(parts[-1]).suffix.lower()
    if suffix not in _image_suffixes() and suffix not in CAPTION_EXTENSIONS:
        report.skipped.append((shown, f"not an image or caption file ({suffix or 'no extension'})"))
        return None
    if len(data) > MAX_FILE_BYTES:
        report.skipped.append((shown, f"{len(data)} bytes: over the {MAX_FILE_BYTES // 1024**2} MiB per-file limit"))
        return None
    if suffix in CAPTION_EXTENSIONS:
        try:
            data.decode("utf-8-sig")
        except UnicodeDecodeError:
            report.skipped.append((shown, "caption file is not UTF-8 text"))
            return None
    else:
        from trainer.data import open_image

        try:
            open_image(data)  # decodes it: a corrupt or bomb image is refused now, not at training time
        except UnusableImageError as e:
            report.skipped.append((shown, str(e)))
            return None
    target = folder.joinpath(*parts)
    root = folder.resolve()
    if not target.resolve().is_relative_to(root):  # a symlinked sub-folder could still point away
        report.skipped.append((shown, "would be written outside the dataset folder: refused"))
        return None
    rel = target.relative_to(folder).as_posix()
    if target.exists():
        if target.read_bytes() == data:
            report.unchanged.append(rel)
        else:
            report.skipped.append((shown, f"{rel} already exists with other content: rename the file or delete "
                                          f"the old one first"))
        return None
    return target


def _put(folder: Path, parts: list[str], data: bytes, shown: str, report: AddReport) -> None:
    target = _check(folder, parts, data, shown, report)
    if target is not None:
        write_bytes_atomic(target, data)
        report.added.append(target.relative_to(folder).as_posix())


# Reading an entry raises these for a damaged archive: BadZipFile (bad CRC-32, bad local header),
# zlib.error (corrupt deflate data), EOFError (truncated), NotImplementedError (an unsupported
# compression method), RuntimeError (an encrypted entry without a password).
_ZIP_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError)


def _add_zip(folder: Path, shown: str, data: bytes, report: AddReport) -> None:
    """Add a zip's entries all or nothing.

    Every entry is read (its CRC-32 checked), checked and written into a staging folder beside the
    dataset (same filesystem, so moving in is a rename) before anything lands in the dataset; a
    damaged entry, a refused path or a full disk leaves the dataset as it was. Only the moves can
    still fail midway (a rename needs no new space); those already made are undone.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise InvalidRequestError(f"{shown} is not a readable zip file ({e})") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) > MAX_ZIP_ENTRIES:
            raise InvalidRequestError(f"{shown} has {len(members)} files; the limit is {MAX_ZIP_ENTRIES}")
        expanded = sum(m.file_size for m in members)
        if expanded > MAX_EXPANDED_BYTES:
            raise InvalidRequestError(f"{shown} expands to {expanded} bytes, over the {MAX_EXPANDED_BYTES // 1024**3} "
                                      f"GiB limit: upload it in parts")
        # Every entry's path is checked before anything is read: one bad path refuses the whole zip.
        planned = []
        for m in members:
            parts = _safe_parts(m.filename)
            if not parts or any(p in _SKIP_PARTS or p.startswith(".") for p in m.filename.split("/") if p):
                continue  # macOS resource forks and hidden files
            if (m.external_attr >> 16) & 0o170000 == 0o120000:
                raise InvalidRequestError(f"zip entry {m.filename!r} is a symbolic link: refused")
            planned.append((m, parts))
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.zip-"))
        try:
            entries = AddReport(folder=report.folder)
            moves: dict[Path, Path] = {}  # final path -> staged copy
            for m, parts in planned:
                entry = f"{shown}:{m.filename}"
                try:
                    with archive.open(m) as f:
                        chunk = f.read(MAX_FILE_BYTES + 1)  # never trusts the declared size alone
                except _ZIP_READ_ERRORS as e:
                    raise InvalidRequestError(f"zip entry {m.filename!r} is damaged ({e}): nothing from {shown} was "
                                              f"added; make the zip again and upload it") from None
                target = _check(folder, parts, chunk, entry, entries)
                if target is None:
                    continue
                if target in moves:  # a zip may list one name twice; the first copy wins
                    entries.skipped.append((entry, "the zip holds this name twice: the first copy was kept"))
                    continue
                try:
                    moves[target] = write_bytes_atomic(staging.joinpath(*parts), chunk)
                except DiskFullError as e:  # name the dataset's folder, not the staging one
                    raise disk_full_error(e.__cause__, folder) from e.__cause__
            _move_in(folder, moves)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    report.added += [target.relative_to(folder).as_posix() for target in moves]
    report.unchanged += entries.unchanged
    report.skipped += entries.skipped


def _move_in(folder: Path, moves: dict[Path, Path]) -> None:
    """Rename staged files to their places; on any error undo the renames made and the folders made."""
    done: list[Path] = []
    made: list[Path] = []
    try:
        for target, staged in moves.items():
            missing = [p for p in reversed(target.parents) if p.is_relative_to(folder) and not p.exists()]
            for p in missing:
                p.mkdir()
                made.append(p)
            if target.exists():  # written by a concurrent upload since the check: never overwritten
                raise InvalidRequestError(f"{target} appeared while the zip was being added: upload it again")
            os.replace(staged, target)
            done.append(target)
    except BaseException:
        for target in done:
            target.unlink(missing_ok=True)
        for p in reversed(made):
            try:
                p.rmdir()
            except OSError:
                pass
        raise


def add_files(name: str, files: list[tuple[str, bytes]]) -> AddReport:
    """Add uploaded files to dataset ``name`` in the studio's area (created if missing).

    ``files`` are ``(file name as uploaded, bytes)``: images (decoded to check them), caption files
    (``.txt``/``.caption``, UTF-8) and ``.zip`` archives (their folders kept, so kohya repeat
    folders ``10_style/`` survive). Names are made safe; a zip with an absolute path, a '..' or a
    link in it is refused whole, and so is a zip with a damaged entry: a zip is added all or
    nothing. Existing files are never overwritten. Each file is written atomically (temporary
    file, then rename).
    """
    folder = dataset_folder(name)
    if not files:
        raise InvalidRequestError("no files given: choose images, caption files or a zip")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    report = AddReport(folder=str(folder))
    try:
        for shown, data in files:
            if str(shown).lower().endswith(".zip"):
                _add_zip(folder, shown, data, report)
            else:
                _put(folder, [safe_name(shown)], data, shown, report)
    except BaseException:
        if created and not any(folder.iterdir()):  # a refused first upload leaves no empty dataset behind
            folder.rmdir()
        raise
    return report


def _check_folder(folder: str | Path) -> Path:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetNotFoundError(f"dataset folder {folder} does not exist or is not a folder: pick one from the "
                                   f"list or type an existing path")
    return folder


def list_images(folder: str | Path, *, caption_extension: str = ".txt", offset: int = 0,
                limit: int | None = 48) -> tuple[list[DatasetImage], int]:
    """A page of a folder's images (sorted, sub-folders included, hidden files skipped) with their
    sidecar captions, and the total count. Captions are the first non-empty line, as kohya reads them."""
    folder = _check_folder(folder)
    suffixes = _image_suffixes()
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file()
                   and not any(part.startswith(".") or part in _SKIP_PARTS
                               for part in p.relative_to(folder).parts))
    page = paths[offset:] if limit is None else paths[offset:offset + limit]
    out = []
    for p in page:
        sidecar = p.with_suffix(caption_extension)
        caption = ""
        if sidecar.is_file():
            try:
                lines = [line.strip() for line in sidecar.read_text(encoding="utf-8-sig").splitlines()]
                caption = next((line for line in lines if line), "")
            except (OSError, UnicodeDecodeError):
                caption = ""
        out.append(DatasetImage(path=p, rel=p.relative_to(folder).as_posix(), caption=caption, caption_path=sidecar))
    return out, len(paths)


def write_caption(image: str | Path, caption: str, *, caption_extension: str = ".txt") -> Path:
    """Save ``caption`` to the image's sidecar file (``cat.png`` -> ``cat.txt``) atomically.

    One line: line breaks become spaces, since trainers read the first non-empty line only.
    """
    image = Path(image)
    if not image.is_file():
        raise DatasetNotFoundError(f"image {image} does not exist: reload the dataset")
    if caption_extension not in CAPTION_EXTENSIONS:
        raise InvalidRequestError(f"caption extension must be one of {', '.join(CAPTION_EXTENSIONS)}")
    text = " ".join(str(caption).split())
    if len(text) > MAX_CAPTION_CHARS:
        raise InvalidRequestError(f"caption is {len(text)} characters; the limit is {MAX_CAPTION_CHARS}")
    sidecar = image.with_suffix(caption_extension)
    write_bytes_atomic(sidecar, (text + "\n").encode("utf-8"))
    return sidecar


@dataclass(frozen=True)
class CropPreview:
    """What the trainer sees of one image: its bucket, the crop box on the original, the cropped sample."""

    original: object  # PIL image, RGB, with the kept region outlined
    sample: object  # PIL image: the bucket-sized crop the trainer trains on
    bucket: tuple[int, int]  # (width, height)
    size: tuple[int, int]  # the original's (width, height)
    box: tuple[int, int, int, int]  # kept region in original pixels (left, top, right, bottom)


def crop_preview(image: str | Path, *, resolution: int, bucket_step: int, enable_bucket: bool = True,
                 min_bucket_reso: int = 0, max_bucket_reso: int = 0, max_upscale: float = 1.0) -> CropPreview:
    """The bucket and centre crop the trainer uses for ``image`` (trainer.data's own code, no copy)."""
    from PIL import ImageDraw

    from trainer.data import BucketSpec, open_image, prepare_image

    img = open_image(Path(image))
    spec = BucketSpec(resolution=resolution, step=bucket_step, min_side=min_bucket_reso, max_side=max_bucket_reso,
                      max_upscale=max_upscale, enabled=enable_bucket)
    bucket = spec.assign(*img.size)
    sample, crop = prepare_image(img, bucket)
    # Map the crop back to original pixels: the resize scale is resized / original per axis.
    (rh, rw), (top, left), (bh, bw) = crop.resized_size, crop.crop_top_left, crop.target_size
    sx, sy = img.width / rw, img.height / rh
    box = (round(left * sx), round(top * sy), round((left + bw) * sx), round((top + bh) * sy))
    outlined = img.copy()
    draw = ImageDraw.Draw(outlined)
    width = max(1, min(img.size) // 64)
    draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=(255, 0, 255), width=width)
    return CropPreview(original=outlined, sample=sample, bucket=bucket, size=img.size, box=box)
