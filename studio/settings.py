"""Paths and switches read once from the environment.

``LORA_STUDIO_HOME`` (default ``~/.lora-studio``) holds everything the studio writes: outputs,
the registry, runs, datasets. ``LORA_STUDIO_REGISTRY_URL`` (any SQLAlchemy URL, e.g.
``postgresql+psycopg://host/db``) moves the adapter registry's database elsewhere; by default it is
the SQLite file ``$LORA_STUDIO_HOME/registry.db`` (the blobs stay in ``$LORA_STUDIO_HOME/blobs``).
``HF_HUB_OFFLINE=1`` makes every Hub access fail fast. Read these through :func:`get_settings`,
which tests can reset with :func:`reload_settings`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    home: Path
    offline: bool
    default_base_model: str
    registry_url: str | None = None

    @property
    def outputs_dir(self) -> Path:
        return self.home / "outputs"

    @property
    def blobs_dir(self) -> Path:
        """The content-addressed blob store (adapter weights, sample images)."""
        return self.home / "blobs"

    @property
    def registry_database_url(self) -> str:
        """``LORA_STUDIO_REGISTRY_URL`` when set, else the SQLite file ``$LORA_STUDIO_HOME/registry.db``."""
        return self.registry_url or f"sqlite:///{self.home / 'registry.db'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    home = Path(os.environ.get("LORA_STUDIO_HOME") or Path.home() / ".lora-studio").expanduser()
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
    return Settings(
        home=home,
        offline=offline,
        default_base_model=os.environ.get("LORA_STUDIO_BASE_MODEL", "tiny"),
        registry_url=os.environ.get("LORA_STUDIO_REGISTRY_URL", "").strip() or None,
    )


def reload_settings() -> Settings:
    """Forget the cached settings and read the environment again (tests change it)."""
    get_settings.cache_clear()
    return get_settings()
