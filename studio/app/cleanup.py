"""Disk cleanup for ``lora-studio gc``: find what the studio's home holds that nothing needs, and free it.

Holds :func:`collect` (one pass over the chosen categories, a dry run by default) and its report
(:class:`CleanupReport`: count and bytes per category, the paths, and what was left alone and why).
Does not hold the rules for blobs: the registry decides which blobs are referenced
(``adapters.registry.Registry.gc``, which re-checks each one under the registry's lock), and this
module only asks it.

What each category frees, everything under ``$LORA_STUDIO_HOME``:

- ``blobs``: blobs in the content-addressed store that no registry version references, neither as
  weights nor as a sample image (left by deleted versions or interrupted registrations), and
  temporary files of interrupted copies older than an hour. No age threshold: the registry's own
  collection is safe while a registration runs (it takes the blob's row lock, and a registration
  that finds its file gone stores it again).
- ``caches``: latent and text-embedding cache entries (``cache/``) last used more than the age
  threshold ago, where "last used" is the later of the file's access and modification times
  (Linux's default ``relatime`` keeps access times to within a day; on a ``noatime`` mount this is
  the time the entry was written). Age is the only sound test: an entry's name is a hash of the
  image, crop and the component's weights hash together, so which base model it belonged to cannot
  be read back. Every entry can be recomputed, and a trainer that finds an entry gone recomputes it.
- ``checkpoints``: checkpoints of finished runs under ``runs/`` whose ``result.json`` is older than
  the threshold. A ``done`` run loses all of them (its adapter is written and a done run cannot be
  resumed); a ``stopped`` or ``failed`` run keeps its newest (what ``--resume latest`` uses) and
  loses the older ones. Half-written ``.tmp-*`` folders of finished runs go too. A run is finished
  when its ``result.json`` is newer than its ``events.jsonl`` (a resumed run appends events after
  the old result) and no queued or running job names it; the adapter, config, events, samples and
  ``result.json`` always stay.
- ``inputs``: img2img and inpainting inputs in ``inputs/`` (``<sha256>.<ext>``, written by
  ``studio.generation.inputs.store_input_image``) older than the threshold that no recipe pins. A recipe
  pins an input by its ``init_image_sha256`` / ``mask_image_sha256`` (``_pin_input`` finds the
  stored copy by that hash) or names its stored path; the recipes read are the ``lora_studio``
  chunks of the PNGs under ``outputs/`` and ``runs/`` (those that stay, when outputs are cleaned in
  the same pass) and the recipes of every registry sample. A PNG kept outside the studio's home
  cannot be seen: a recipe in it re-runs as long as its original input file is still at its path.
- ``outputs``: generated images and other files under ``outputs/`` older than the threshold. These
  are the user's own pictures, so this category runs only when asked for by name.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from studio.app import jobs
from studio.core.errors import InvalidRequestError
from studio.core.settings import get_settings
from trainer.events import EVENTS_FILE, RESULT_FILE
from trainer.loop import CHECKPOINTS, list_checkpoints

CATEGORIES = ("blobs", "caches", "checkpoints", "inputs", "outputs")
# Outputs are the user's images, not the studio's leftovers: cleaned only when named.
DEFAULT_CATEGORIES = ("blobs", "caches", "checkpoints", "inputs")
DEFAULT_OLDER_THAN_DAYS = 30.0
# A temporary file younger than this may belong to a write still running (same bound as Registry.gc).
TEMP_GRACE_S = 3600.0
# A recipe chunk is a few KiB; a bigger text chunk is not one the studio wrote (studio.generation.recipes' bound).
MAX_RECIPE_CHARS = 1 << 20
_DAY_S = 86400.0


@dataclass
class CategoryReport:
    """What one category freed (or, in a dry run, would free)."""

    count: int = field(default=0, metadata={"help": "files or folders removed"})
    bytes: int = field(default=0, metadata={"help": "their size on disk, in bytes"})
    paths: list[str] = field(default_factory=list, metadata={"help": "what was removed"})

    def add(self, path: Path, size: int) -> None:
        self.count += 1
        self.bytes += size
        self.paths.append(str(path))


@dataclass
class CleanupReport:
    """The result of :func:`collect`: per category, and what was deliberately left alone."""

    dry_run: bool
    older_than_days: float
    categories: dict[str, CategoryReport] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list, metadata={"help": "what was left alone, and why"})

    @property
    def count(self) -> int:
        return sum(c.count for c in self.categories.values())

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.categories.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "count": self.count, "bytes": self.bytes}


def collect(*, categories: tuple[str, ...] | list[str] = DEFAULT_CATEGORIES,
            older_than_days: float = DEFAULT_OLDER_THAN_DAYS, dry_run: bool = True,
            now: float | None = None) -> CleanupReport:
    """Find (``dry_run``) or remove what the chosen categories hold that nothing needs.

    Args:
        categories: some of :data:`CATEGORIES`; the default leaves ``outputs`` out.
        older_than_days: the age threshold for caches, checkpoints, inputs and outputs (0: any age).
        dry_run: only report; nothing is touched.
        now: the clock, in Unix seconds (tests pass a fixed one).
    """
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown or not categories:
        raise InvalidRequestError(f"unknown cleanup category {', '.join(map(repr, unknown)) or '(none given)'}: "
                                  f"choose from {', '.join(CATEGORIES)}")
    if isinstance(older_than_days, bool) or not isinstance(older_than_days, (int, float)) or \
            not older_than_days >= 0:
        raise InvalidRequestError(f"the age threshold must be a number of days >= 0, not {older_than_days!r}")
    home = get_settings().home
    now = time.time() if now is None else now
    cutoff = now - older_than_days * _DAY_S
    report = CleanupReport(dry_run=dry_run, older_than_days=float(older_than_days))
    chosen = [c for c in CATEGORIES if c in categories]
    for category in chosen:
        report.categories[category] = CategoryReport()
    if "blobs" in chosen:
        _blobs(report.categories["blobs"], dry_run)
    if "caches" in chosen:
        _caches(home / "cache", report.categories["caches"], dry_run, cutoff, now)
    if "checkpoints" in chosen:
        _checkpoints(home / "runs", report.categories["checkpoints"], report.kept, dry_run, cutoff)
    if "outputs" in chosen:
        _outputs(home / "outputs", report.categories["outputs"], dry_run, cutoff)
    if "inputs" in chosen:  # after outputs: an input only the removed outputs pinned is free in the same pass
        removed = set(report.categories["outputs"].paths) if "outputs" in chosen else set()
        _inputs(home, report.categories["inputs"], report.kept, dry_run, cutoff, removed)
    return report


# ---- removal helpers ---------------------------------------------------------------------------


def _size(path: Path) -> int:
    """Bytes a file or a folder tree holds (0 for what vanished meanwhile)."""
    try:
        if path.is_dir() and not path.is_symlink():
            return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        return path.lstat().st_size
    except OSError:
        return 0


def _remove(path: Path, part: CategoryReport, dry_run: bool) -> None:
    size = _size(path)
    if not dry_run:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            return  # removed by someone else meanwhile: not ours to count
    part.add(path, size)


def _last_used(path: Path) -> float:
    st = path.stat()
    return max(st.st_atime, st.st_mtime)


# ---- categories ----------------------------------------------------------------------------------


def _blobs(part: CategoryReport, dry_run: bool) -> None:
    # Local: adapters.registry loads SQLAlchemy (~0.3 s); `lora-studio --help` imports this module.
    from adapters.registry import Registry

    with Registry() as registry:
        store = registry.store
        if dry_run:
            referenced = _referenced_blobs(registry)
            for sha in store:
                if sha not in referenced:
                    part.add(store.path(sha), _size(store.path(sha)))
            for temp in store.stale_temp_files(TEMP_GRACE_S):
                part.add(temp, _size(temp))
            return
        sizes = {sha: _size(store.path(sha)) for sha in store}
        temps = [(p, _size(p)) for p in store.stale_temp_files(TEMP_GRACE_S)]
        # The registry decides and removes, each blob re-checked under its row lock.
        done = registry.gc(temp_older_than_s=TEMP_GRACE_S)
        for sha in done.blobs_removed:
            part.add(store.path(sha), sizes.get(sha, 0))
        for path, size in temps:
            if not path.exists():
                part.add(path, size)


def _referenced_blobs(registry) -> set[str]:
    """Every blob a version references: its weights and its sample images (what Registry.gc keeps)."""
    referenced: set[str] = set()
    offset, page_size = 0, 500
    while True:
        page = registry.list_versions(sort="created", limit=page_size, offset=offset)
        for v in page.items:
            referenced.add(v.weights_sha256)
            referenced.update(s.sha256 for s in v.samples)
        if not page.has_more:
            return referenced
        offset += page_size


def _caches(root: Path, part: CategoryReport, dry_run: bool, cutoff: float, now: float) -> None:
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        try:
            temp = path.name.endswith(".tmp")
            stale = _last_used(path) < (now - TEMP_GRACE_S if temp else cutoff)
        except FileNotFoundError:
            continue
        if stale:
            _remove(path, part, dry_run)


def _active_run_dirs() -> set[Path]:
    """Run directories of queued or running jobs (a resume may be waiting to continue one)."""
    return {Path(j.run_dir).resolve() for j in jobs.list_jobs(start_runner=False) if not j.finished}


def _checkpoints(runs: Path, part: CategoryReport, kept: list[str], dry_run: bool, cutoff: float) -> None:
    if not runs.is_dir():
        return
    active = _active_run_dirs()
    for run in sorted(p for p in runs.iterdir() if p.is_dir() and (p / CHECKPOINTS).is_dir()):
        result, events = run / RESULT_FILE, run / EVENTS_FILE
        try:
            status = json.loads(result.read_text(encoding="utf-8")).get("status")
            finished_at = result.stat().st_mtime
            unfinished = events.is_file() and events.stat().st_mtime > finished_at
        except (OSError, ValueError, AttributeError):
            kept.append(f"{run}: no readable result.json (running, or killed): its checkpoints are kept")
            continue
        if unfinished or run.resolve() in active:
            kept.append(f"{run}: a job is training in it again: its checkpoints are kept")
            continue
        if status not in ("done", "stopped", "failed") or finished_at >= cutoff:
            continue
        complete = list_checkpoints(run)
        # A stopped or failed run can be resumed from its newest checkpoint: that one stays.
        doomed = complete if status == "done" else complete[:-1]
        doomed += sorted((run / CHECKPOINTS).glob(".tmp-*"))  # halves of saves that crashed
        for path in doomed:
            _remove(path, part, dry_run)


def _outputs(root: Path, part: CategoryReport, dry_run: bool, cutoff: float) -> None:
    if not root.is_dir():
        return
    for path in sorted(root.rglob("*")):
        try:
            if path.is_file() and path.lstat().st_mtime < cutoff:
                _remove(path, part, dry_run)
        except FileNotFoundError:
            continue


def _inputs(home: Path, part: CategoryReport, kept: list[str], dry_run: bool, cutoff: float,
            removed: set[str]) -> None:
    root = home / "inputs"
    if not root.is_dir():
        return
    pinned = _pinned_inputs(home, root, removed)
    for path in sorted(root.iterdir()):
        if not path.is_file():
            continue
        try:
            old = path.stat().st_mtime < cutoff
        except FileNotFoundError:
            continue
        if not old:
            continue
        if path.stem in pinned or path.name in pinned:
            kept.append(f"{path}: pinned by a recipe")
            continue
        _remove(path, part, dry_run)


def _pinned_inputs(home: Path, inputs: Path, removed: set[str]) -> set[str]:
    """sha256s and file names of the inputs recipes pin: PNGs under outputs/ and runs/, registry samples."""
    pins: set[str] = set()
    for folder in (home / "outputs", home / "runs"):
        if folder.is_dir():
            for png in folder.rglob("*.png"):
                if str(png) not in removed:
                    _add_pins(_png_recipe(png), inputs, pins)
    if (home / "registry.db").exists() or os.environ.get("LORA_STUDIO_REGISTRY_URL"):
        # Local: SQLAlchemy, as in _blobs.
        from adapters.registry import Registry

        with Registry() as registry:
            offset, page_size = 0, 500
            while True:
                page = registry.list_versions(sort="created", limit=page_size, offset=offset)
                for v in page.items:
                    for s in v.samples:
                        _add_pins(s.recipe, inputs, pins)
                if not page.has_more:
                    break
                offset += page_size
    return pins


def _png_recipe(path: Path) -> dict | None:
    """The ``lora_studio`` JSON chunk of a PNG, or None (not a PNG, no recipe, damaged, too large).

    Pillow reads only the chunks before the pixels (where the studio writes its recipe) and never
    decodes the image; a size that looks like a decompression bomb is just not a recipe here.
    """
    # Local: Pillow (~0.1 s with its plugins) only when there are PNGs to read.
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                text = im.info.get("lora_studio")
        if not isinstance(text, str) or len(text) > MAX_RECIPE_CHARS:
            return None
        recipe = json.loads(text)
    except Exception:  # any file at all may sit in these folders: unreadable = no recipe
        return None
    return recipe if isinstance(recipe, dict) else None


def _add_pins(recipe, inputs: Path, pins: set[str]) -> None:
    """Add the inputs a recipe pins: a payload ``{"request": {...}}`` or a bare request dict."""
    if not isinstance(recipe, dict):
        return
    request = recipe.get("request", recipe)
    if not isinstance(request, dict):
        return
    for key in ("init_image_sha256", "mask_image_sha256"):
        if isinstance(request.get(key), str):
            pins.add(request[key])
    for key in ("init_image", "mask_image"):
        value = request.get(key)
        if isinstance(value, str) and value:
            path = Path(value)
            if path.parent == inputs or path.parent.name == inputs.name:
                pins.add(path.name)
                pins.add(path.stem)


def human_bytes(n: int) -> str:
    """``1536`` -> ``1.5 KiB``: sizes for people (the JSON report keeps exact bytes)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


__all__ = ["CATEGORIES", "DEFAULT_CATEGORIES", "DEFAULT_OLDER_THAN_DAYS", "CategoryReport", "CleanupReport",
           "collect", "human_bytes"]
