"""The studio's errors: each names the problem and what to do about it.

Every error subclasses :class:`StudioError` and the matching built-in, so callers can catch either
(``except KeyError`` still works for a missing adapter). The CLI prints ``str(error)`` as one line
and exits with status 2; the UI shows it in an error box. Nothing here imports torch.
"""

from __future__ import annotations


class StudioError(Exception):
    """Base class of every error the studio raises on purpose."""


class InvalidRequestError(StudioError, ValueError):
    """A request or option has a value the studio cannot use (bad size, steps, name...)."""


class BaseModelNotFoundError(StudioError, FileNotFoundError):
    """A base-model reference names nothing that exists locally (or, offline, on the Hub)."""


class OfflineError(StudioError, ConnectionError):
    """Something needs the network while the studio is offline (HF_HUB_OFFLINE=1)."""


class UnsafeWeightsError(StudioError, ValueError):
    """A weights file is a pickle (.ckpt/.pt/.bin/.pth): the studio loads safetensors only."""


class CorruptWeightsError(StudioError, ValueError):
    """A weights file exists but cannot be read as safetensors (truncated, damaged, wrong kind)."""


class RecipeError(StudioError, ValueError):
    """An image's recipe is missing or unreadable, so it cannot be re-run."""
