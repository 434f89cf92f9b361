"""Paths and switches read once from the environment.

``LORA_STUDIO_HOME`` (default ``~/.lora-studio``) holds everything the studio writes: outputs,
the registry, runs, datasets. ``LORA_STUDIO_REGISTRY_URL`` (any SQLAlchemy URL, e.g.
``postgresql+psycopg://host/db``) moves the adapter registry's database elsewhere; by default it is
the SQLite file ``$LORA_STUDIO_HOME/registry.db``. The blobs stay in ``$LORA_STUDIO_HOME/blobs`` unless
``LORA_STUDIO_STORE`` names a folder (a team's shared disk). ``LORA_STUDIO_USER`` is who registry
changes are recorded as (default the OS user).
``HF_HUB_OFFLINE=1`` makes every Hub access fail fast. ``LORA_STUDIO_DATA_ROOTS`` lists more
folders (separated by ``os.pathsep``, ``:`` on Linux and macOS) whose files the UI may read and
write, beside ``$LORA_STUDIO_HOME`` and the sample datasets: a path typed into a page must lie under
one of them (:func:`check_data_path`), since anyone who can open the page can type it. The command
line, run by the machine's own user, takes any path. ``LORA_STUDIO_OFFLOAD`` (``auto``, ``model`` or
``none``) says whether pipelines on a GPU keep idle components in CPU memory
(:func:`studio.core.base_models.wants_offload`). Read these through :func:`get_settings`, which
tests can reset with :func:`reload_settings`.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from studio.core.errors import InvalidRequestError, PathNotAllowedError

_TRUE = {"1", "true", "yes", "on"}
OFFLOAD_MODES = ("auto", "model", "none")
DATA_ROOTS_VARIABLE = "LORA_STUDIO_DATA_ROOTS"
# The project's own sample datasets (datasets/ beside the packages): presets and the Datasets page use them.
# The checkout (or installed tree) that holds app_streamlit.py and the sample datasets: studio/core/ is two below it.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DATASETS_DIR = PROJECT_ROOT / "datasets"


@dataclass(frozen=True)
class Settings:
    home: Path
    offline: bool
    default_base_model: str
    registry_url: str | None = None
    data_roots: tuple[Path, ...] = ()
    offload: str = "auto"
    user: str = "unknown"  # who registry changes are recorded as: LORA_STUDIO_USER, else the OS user
    store: Path | None = None  # LORA_STUDIO_STORE: the blob store on a shared path (a team's NFS), else in home

    @property
    def outputs_dir(self) -> Path:
        return self.home / "outputs"

    @property
    def blobs_dir(self) -> Path:
        """The content-addressed blob store (adapter weights, sample images): ``LORA_STUDIO_STORE`` when
        set (one folder a team's machines share, beside a PostgreSQL registry), else ``home/blobs``."""
        return self.store or self.home / "blobs"

    @property
    def registry_database_url(self) -> str:
        """``LORA_STUDIO_REGISTRY_URL`` when set, else the SQLite file ``$LORA_STUDIO_HOME/registry.db``."""
        return self.registry_url or f"sqlite:///{self.home / 'registry.db'}"

    @property
    def allowed_roots(self) -> tuple[Path, ...]:
        """The folders the UI may use: the studio's home, the sample datasets, ``LORA_STUDIO_DATA_ROOTS``."""
        return (self.home, SAMPLE_DATASETS_DIR, *self.data_roots)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    home = Path(os.environ.get("LORA_STUDIO_HOME") or Path.home() / ".lora-studio").expanduser()
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
    return Settings(
        home=home,
        offline=offline,
        default_base_model=os.environ.get("LORA_STUDIO_BASE_MODEL", "tiny"),
        registry_url=os.environ.get("LORA_STUDIO_REGISTRY_URL", "").strip() or None,
        data_roots=tuple(Path(p.strip()).expanduser() for p in os.environ.get(DATA_ROOTS_VARIABLE, "").split(os.pathsep)
                         if p.strip()),
        offload=_offload_mode(os.environ.get("LORA_STUDIO_OFFLOAD", "auto")),
        user=os.environ.get("LORA_STUDIO_USER", "").strip() or _os_user(),
        store=Path(os.environ["LORA_STUDIO_STORE"].strip()).expanduser() if os.environ.get("LORA_STUDIO_STORE",
                                                                                            "").strip() else None,
    )


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid with no passwd entry (containers) and no USER variable
        return f"uid-{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def _offload_mode(value: str) -> str:
    mode = value.strip().lower() or "auto"
    if mode not in OFFLOAD_MODES:
        raise InvalidRequestError(f"LORA_STUDIO_OFFLOAD={value!r}: use one of {', '.join(OFFLOAD_MODES)}")
    return mode


def reload_settings() -> Settings:
    """Forget the cached settings and read the environment again (tests change it)."""
    get_settings.cache_clear()
    return get_settings()


def check_data_path(path: str | os.PathLike, *, what: str) -> Path:
    """``path`` resolved (symlinks and ``..`` followed), if it lies under one of the settings'
    :attr:`~Settings.allowed_roots`; else :class:`~studio.core.errors.PathNotAllowedError` naming ``what``.

    The UI calls this on every path a visitor types, before anything reads or writes it: a symlink
    inside a root that points elsewhere is judged by where it points. The path need not exist (an
    output folder a run will create). The CLI does not call it: its user may use any path.
    """
    text = os.fspath(path).strip() if isinstance(path, (str, os.PathLike)) else ""
    if not text:
        raise InvalidRequestError(f"the {what} is empty: type a folder or file path")
    try:
        resolved = Path(text).expanduser().resolve()
    except (RuntimeError, OSError) as e:  # "~nosuchuser", a symlink loop
        raise InvalidRequestError(f"the {what} {text} cannot be resolved ({e}): type a plain folder or file path") \
            from None
    roots = get_settings().allowed_roots
    if any(resolved.is_relative_to(root.expanduser().resolve()) for root in roots):
        return resolved
    raise PathNotAllowedError(
        f"the {what} {text} is outside the folders the studio may use ({', '.join(str(r) for r in roots)}): "
        f"move it under one of them, or add its folder to {DATA_ROOTS_VARIABLE} (folders separated by "
        f"{os.pathsep!r}) and restart the studio"
    )
