"""Keep third-party libraries quiet and their optional parts unloaded until they are asked for.

Holds :func:`quiet_third_party` (what every entry point calls first: ``lora-studio``, ``python -m
trainer``, the Streamlit frame) and :func:`allow_bitsandbytes` (what the code that needs
bitsandbytes calls before importing it). Does not hold the studio's own messages: those are printed
by the commands and pages that own them.

Why this exists: ``import peft`` imports bitsandbytes whenever it is installed (``peft/helpers.py``),
and on CPUs with AVX512-BF16 bitsandbytes' CPU backend then logs "Failed to load CPU
gemm_4bit_forward from kernels-community ... pip install kernels" at import. Every command would
print it, and it tells users to install a package that downloads code from the Hub. So bitsandbytes
stays unimportable (``sys.modules`` holds ``None``, which makes ``import`` raise ImportError and
``importlib.util.find_spec`` return None: peft then treats it as absent) until the 8-bit optimizer
asks for it. What the libraries still log (transformers' torchvision note, tensorboard, accelerate,
Python warnings) goes to ``$LORA_STUDIO_HOME/logs/libraries.log``, or to stderr with ``--verbose``
(``LORA_STUDIO_VERBOSE=1``).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from studio.core.settings import get_settings

LOG_FILE_NAME = "libraries.log"
# Loggers of the libraries the studio drives; their records leave the console unless --verbose.
LIBRARY_LOGGERS = ("bitsandbytes", "transformers", "diffusers", "peft", "accelerate", "torch", "tensorboard",
                   "tensorboardX", "huggingface_hub", "datasets", "PIL", "py.warnings")
# Optional heavy packages that stay unimported until a feature asks for them.
_GUARDED = ("bitsandbytes",)
_configured: dict[str, object] = {}


def _verbose_from_env() -> bool:
    return os.environ.get("LORA_STUDIO_VERBOSE", "").strip().lower() in {"1", "true", "yes", "on"}


def log_file() -> Path:
    """Where library log records go when the console is kept quiet."""
    return get_settings().home / "logs" / LOG_FILE_NAME


def _guard_optional_imports() -> None:
    for name in _GUARDED:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError; find_spec -> None


def allow_bitsandbytes():
    """Lift the import guard and import bitsandbytes (for the 8-bit optimizer, quantized bases).

    Raises ImportError when it is not installed, like a plain import. Libraries that already looked
    for it (peft at import) keep their answer; the optimizer and quantization code import it directly.
    """
    if sys.modules.get("bitsandbytes", False) is None:
        del sys.modules["bitsandbytes"]
    import bitsandbytes

    return bitsandbytes


def quiet_third_party(*, verbose: bool | None = None) -> None:
    """Guard optional imports and route library logs and warnings to the log file (stderr if verbose).

    Idempotent: the Streamlit frame calls it on every rerun. Call it before torch, diffusers or peft
    are imported; records logged before it was called are not moved.
    """
    verbose = _verbose_from_env() if verbose is None else verbose
    _guard_optional_imports()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error" if not verbose else "warning")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error" if not verbose else "warning")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # tensorboard probes for TensorFlow and logs from C++
    if _configured.get("verbose") == verbose:
        return
    handler: logging.Handler
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = _file_handler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    old = _configured.get("handler")
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if old is not None:
            logger.removeHandler(old)  # type: ignore[arg-type]
        logger.addHandler(handler)
        logger.propagate = False  # nothing reaches the root logger's last-resort stderr handler
    logging.captureWarnings(True)  # warnings.warn(...) -> the "py.warnings" logger above
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
    _configured.update(verbose=verbose, handler=handler)


def _file_handler() -> logging.Handler:
    path = log_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return logging.FileHandler(path, encoding="utf-8")
    except OSError:
        # An unwritable home must not stop a command: library records are advisory, so drop them.
        return logging.NullHandler()
