"""Paths and switches read once from the environment.

``LORA_STUDIO_HOME`` (default ``~/.lora-studio``) holds everything the studio writes: outputs,
the registry, runs, datasets. ``HF_HUB_OFFLINE=1`` makes every Hub access fail fast. Read these
through :func:`get_settings`, which tests can reset with :func:`reload_settings`.
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

    @property
    def outputs_dir(self) -> Path:
        return self.home / "outputs"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    home = Path(os.environ.get("LORA_STUDIO_HOME") or Path.home() / ".lora-studio").expanduser()
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
    return Settings(home=home, offline=offline, default_base_model=os.environ.get("LORA_STUDIO_BASE_MODEL", "tiny"))


def reload_settings() -> Settings:
    """Forget the cached settings and read the environment again (tests change it)."""
    get_settings.cache_clear()
    return get_settings()
