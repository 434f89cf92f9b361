"""Small helpers every page uses: enlarged thumbnails, error boxes, the shared registry client and
generation queue, and the checked, bounded and cached folder listing behind the Datasets page."""

from __future__ import annotations

import io
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import streamlit as st
from PIL import Image

from adapters.registry import Registry
from studio.app import dataset_files
from studio.core.errors import DatasetNotFoundError, InvalidRequestError, StudioError
from studio.core.settings import check_data_path, get_settings
from studio.generation.queue import GenerationQueue


def enlarged(image, min_side: int = 160):
    """Small images (the tiny model's 32 px) shown enlarged with hard pixel edges, not blurred.

    ``image`` is a PIL image or a path; a path that cannot be opened comes back as None.
    """
    if not isinstance(image, Image.Image):
        try:
            with Image.open(image) as im:
                image = im.convert("RGB")
        except OSError:
            return None
    if image.width < min_side:
        factor = max(1, -(-min_side // image.width))  # ceiling: 32 px -> x5 = 160 px
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    return image


def png_bytes(image, pnginfo=None) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=pnginfo)
    return buf.getvalue()


@contextmanager
def reported(action: str):
    """Run a library call; its StudioError becomes an error box, anything else a one-line message.

    Never a traceback on the page: the user sees what went wrong and the page keeps what they typed.
    """
    try:
        yield
    except StudioError as e:
        st.error(str(e))
    except Exception as e:  # an unexpected failure still gets words, never a raw traceback
        st.error(f"{action} failed: {type(e).__name__}: {e}")


@st.cache_resource(show_spinner=False)
def generation_queue() -> GenerationQueue:
    """The studio process's one generation queue: every browser session submits to it, and its worker
    thread runs the jobs, so page reruns never wait on the GPU."""
    return GenerationQueue()


def queue_session() -> str:
    """This browser session's name in the queue (sessions take turns there; there is no login)."""
    return st.session_state.setdefault("queue_session", uuid.uuid4().hex)


@st.cache_resource(show_spinner=False)
def _team_queue_for(url: str):
    from studio.app.workers import TeamQueue

    return TeamQueue(url)


def team_queue():
    """The team's training queue (``studio.app.workers.TeamQueue``) when the registry is PostgreSQL, one
    per URL for every session (it holds a connection pool); None for a studio on one machine. Imported
    here, not at the top: the worker module brings the trainer's loop, which only the Train page needs."""
    from studio.app.workers import is_team_registry

    url = get_settings().registry_url
    return _team_queue_for(url) if is_team_registry(url) else None


@st.cache_resource(show_spinner=False)
def registry():
    """One registry client per studio home, shared by every session (it holds a connection pool)."""
    return _registry_for(str(get_settings().home))


def _registry_for(home: str):
    return Registry(home=home)


def get_registry():
    """The registry of the current ``$LORA_STUDIO_HOME`` (re-created when the home changes, as in tests)."""
    reg = registry()
    if reg.store.root != get_settings().blobs_dir:
        registry.clear()
        reg = registry()
    return reg


# A listing visits at most this many files and folders: as many entries as a dataset zip may hold
# (studio.app.dataset_files.MAX_ZIP_ENTRIES). Listing /usr unbounded walked 117k files on every rerun.
MAX_LISTED_ENTRIES = 20_000
# Kohya repeat folders (10_name/) and imagefolder splits (train/) sit one or two levels down.
MAX_LISTED_DEPTH = 4
LISTING_TTL_S = 10  # a folder changed behind the page's back shows up after this long


def _check_size(folder: Path, max_entries: int, max_depth: int) -> None:
    """Refuse a folder with more than ``max_entries`` entries or folders deeper than ``max_depth``,
    stopping at the first entry past either bound (so a huge tree costs ``max_entries`` entries, not
    all of them). Hidden folders count too: the listing walks them. Symlinked folders are not
    entered, as ``Path.rglob`` does not enter them."""
    seen = 0
    pending = [(folder, 0)]
    while pending:
        current, depth = pending.pop()
        try:
            with os.scandir(current) as entries:
                for entry in entries:
                    seen += 1
                    if seen > max_entries:
                        raise InvalidRequestError(
                            f"{folder} holds more than {max_entries:,} files and folders: the Datasets page shows "
                            f"one dataset folder at a time, so pick the folder of a single dataset")
                    if entry.is_dir(follow_symlinks=False):
                        if depth + 1 > max_depth:
                            raise InvalidRequestError(
                                f"{folder} has folders nested more than {max_depth} levels deep: pick the folder of "
                                f"a single dataset (images, or kohya repeat folders such as 10_name/)")
                        pending.append((Path(entry.path), depth + 1))
        except OSError as e:  # unreadable sub-folder: say which, instead of listing part of the dataset
            raise InvalidRequestError(f"cannot read {current} ({e.strerror or e}): check its permissions") from None


def _inside_roots(path: Path) -> bool:
    try:
        check_data_path(path, what="file")
    except StudioError:
        return False
    return True


@st.cache_data(ttl=LISTING_TTL_S, max_entries=16, show_spinner=False)
def _dataset_images(folder: str, mtime_ns: int, max_entries: int, max_depth: int, roots: tuple[str, ...]):
    # mtime_ns and roots are part of the cache key only: a new file at the top, or other roots, list anew.
    _check_size(Path(folder), max_entries, max_depth)
    items, _ = dataset_files.list_images(folder, limit=None)  # on the module: tests count the calls
    # An image or caption that is a symlink to a file outside the roots is left out: it is outside.
    return [i for i in items
            if _inside_roots(i.path) and (not i.caption_path.exists() or _inside_roots(i.caption_path))]


def dataset_images(folder: str | Path) -> tuple[Path, list]:
    """(the folder resolved, its images as ``studio.app.dataset_files.DatasetImage``) for the Datasets page.

    The folder must lie under the data roots (:func:`studio.core.settings.check_data_path`), its tree is
    bounded by :data:`MAX_LISTED_ENTRIES` and :data:`MAX_LISTED_DEPTH`, and the listing is read once
    and reused for :data:`LISTING_TTL_S` seconds (call :func:`forget_listings` after writing captions).
    """
    resolved = check_data_path(folder, what="dataset folder")
    if not resolved.is_dir():
        raise DatasetNotFoundError(f"dataset folder {folder} does not exist or is not a folder: pick one from the "
                                   f"list or type an existing path")
    roots = tuple(str(r) for r in get_settings().allowed_roots)
    return resolved, _dataset_images(str(resolved), resolved.stat().st_mtime_ns, MAX_LISTED_ENTRIES,
                                      MAX_LISTED_DEPTH, roots)


def forget_listings() -> None:
    """Drop cached folder listings (after the page itself changed captions)."""
    _dataset_images.clear()
