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


class RecipeTooCostlyError(RecipeError):
    """A recipe asks for more work (steps x pixels x images) than the studio runs without a confirmation
    (``--yes`` on the command line, a confirmation in the UI)."""


class PathNotAllowedError(StudioError, PermissionError):
    """A path typed into the studio's UI lies outside the folders it may use (``$LORA_STUDIO_HOME``,
    the sample datasets and ``LORA_STUDIO_DATA_ROOTS``); the command line takes any path."""


# ---- adapters: store and registry ----------------------------------------------------------


class InvalidNameError(StudioError, ValueError):
    """An adapter name, alias or reference is malformed (path separators, leading dot, too long...)."""


class AdapterNotFoundError(StudioError, KeyError):
    """A reference names no adapter version; ``candidates`` lists close names or existing versions."""

    def __init__(self, message: str, candidates: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.candidates = list(candidates)

    # KeyError's own __str__ wraps the message in quotes; the CLI prints str(error) as one line.
    __str__ = Exception.__str__


class AmbiguousReferenceError(StudioError, LookupError):
    """A reference (a short hash prefix) matches several versions; ``candidates`` lists them."""

    def __init__(self, message: str, candidates: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.candidates = list(candidates)


class AliasInUseError(StudioError, ValueError):
    """A delete would remove a version a user alias (e.g. ``prod``) points at; pass ``force=True``."""

    def __init__(self, message: str, aliases: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.aliases = list(aliases)


class ProtectedAliasError(StudioError, ValueError):
    """A change would move, unprotect or remove a protected alias (``name@prod``); pass ``force=True``."""

    def __init__(self, message: str, alias: str = "") -> None:
        super().__init__(message)
        self.alias = alias


class InputFileNotFoundError(StudioError, FileNotFoundError):
    """A file the studio was asked to read (weights, a sample image) does not exist."""


class BlobNotFoundError(StudioError, FileNotFoundError):
    """The blob store has no file for a sha256 (never stored, or collected)."""


class HashMismatchError(StudioError, ValueError):
    """Bytes written to the blob store do not hash to what was expected (source changed while copying)."""


class RegistryBusyError(StudioError, TimeoutError):
    """The registry database stayed locked by other writers past the busy timeout and every retry."""


# ---- adapters: file formats ----------------------------------------------------------------


class UnsupportedAdapterError(StudioError, ValueError):
    """A safetensors file is not an adapter layout the studio reads (a full checkpoint, an embedding,
    unknown keys, LyCORIS/kohya-DoRA keys), or a conversion a format cannot express (DoRA to kohya)."""


class IncompatibleAdapterError(StudioError, ValueError):
    """An adapter does not fit the base model: made for another architecture, shapes that differ, or
    keys that name no module of the base. ``architecture`` is what it looks made for (None if unknown)."""

    def __init__(self, message: str, architecture: str | None = None) -> None:
        super().__init__(message)
        self.architecture = architecture


# ---- Hugging Face Hub: publish and pull ------------------------------------------------------


class HubError(StudioError, ConnectionError):
    """A Hub operation failed: the server answered with an error (5xx) or the connection dropped.
    ``status`` is the HTTP status when there was one. Messages never contain the token."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class HubAuthError(HubError, PermissionError):
    """No Hub token is available, or the Hub refused it (401) or refused its permissions (403)."""


class HubNotFoundError(HubError, LookupError):
    """The Hub has no such repo, revision or file (404; private repos look missing without a token)."""


class HubConflictError(HubError, ValueError):
    """The Hub state contradicts the request: a version tag already points at other weights."""


# ---- trainer: configs and datasets -----------------------------------------------------------


class ConfigError(StudioError, ValueError):
    """A training config has an unknown option or a bad value; ``option`` names it (``network.rank``)."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class DatasetNotFoundError(StudioError, FileNotFoundError):
    """A dataset path does not exist or is not a folder."""


class DatasetError(StudioError, ValueError):
    """A dataset folder cannot be read as any layout the studio knows (bad metadata, missing column...)."""


class NoUsableImagesError(DatasetError):
    """A dataset has no image the trainer can use; the message lists what was skipped and why."""


class UnusableImageError(DatasetError):
    """One image cannot be used (corrupt, truncated, empty, a decompression bomb...); ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CheckpointError(StudioError, ValueError):
    """A training checkpoint is missing, incomplete or does not match the run resuming from it."""


class TrainingDivergedError(StudioError, ArithmeticError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingOutOfMemoryError(StudioError, MemoryError):
    """The accelerator ran out of memory; the message gives the run's estimate and settings that would fit."""


# ---- disk ----------------------------------------------------------------------------------


class DiskFullError(StudioError, OSError):
    """A write stopped because the disk (or a quota) is full; nothing partial was left behind.
    ``folder`` is where the write was going. Free space, e.g. with ``lora-studio gc``, and retry."""

    def __init__(self, message: str, folder: str | None = None) -> None:
        super().__init__(message)
        self.folder = folder

    # OSError's own __str__ would print "None" fields; the CLI prints str(error) as one line.
    __str__ = Exception.__str__
