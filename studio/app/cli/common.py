"""What the command groups share: the parser class, number arguments, the progress-bar silencer."""

from __future__ import annotations

import argparse

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse that prints one line and the usage hint, exit status 2 (as argparse does)."""

    def error(self, message: str):  # noqa: D401
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def whole_number(text: str) -> int:
    """An ``int`` argument whose error names the text (argparse's own says only 'invalid int value')."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    return value


def number(text: str) -> float:
    """A ``float`` argument whose error names the text."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def quiet_libraries() -> None:
    """Silence progress bars of diffusers/transformers on the console (their logs: studio.core.thirdparty)."""
    try:
        # Local: diffusers and transformers load torch (seconds); only commands that run a model call this.
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    except ImportError:
        pass


def open_registry():
    """The adapter registry, opened for one command (use it as a context manager)."""
    # Local: adapters.registry loads SQLAlchemy (~0.3 s), which --help and the other groups never need.
    from adapters.registry import Registry

    return Registry()
