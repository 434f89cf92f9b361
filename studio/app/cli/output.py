"""The one place the ``lora-studio`` commands write to the console.

Results go to stdout (a line, aligned fields, a table, or one line of JSON for ``--json``); warnings,
notes and errors go to stderr unless a command's output has always carried them. Keeping every
print here keeps the shapes consistent: JSON is always one line, a table always pads the same way,
and an error is always ``error: <one sentence>``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any


def print_line(text: object = "", *, err: bool = False) -> None:
    """One line of text on stdout (``err=True``: stderr)."""
    print(text, file=sys.stderr if err else sys.stdout)


def print_json(value: Any) -> None:
    """``value`` as one line of JSON on stdout: what every ``--json`` prints."""
    print(json.dumps(value))


def print_result(as_json: bool, value: Any, text: object) -> None:
    """The common ending of a command: ``value`` as JSON with ``--json``, else ``text`` as one line."""
    if as_json:
        print_json(value)
    else:
        print_line(text)


def print_fields(pairs: Iterable[tuple[str, object]], width: int) -> None:
    """``label value`` rows with the labels padded to ``width``, as ``adapters show`` prints them."""
    for label, value in pairs:
        print_line(f"{label:<{width}} {value}")


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell, two spaces apart; the last column is free text, unpadded."""
    lines = [tuple(header), *(tuple(r) for r in rows)]
    widths = [max(len(r[i]) for r in lines) for i in range(len(header) - 1)]
    for r in lines:
        print_line("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1])


def print_warning(text: str, *, err: bool = True) -> None:
    """``warning: <text>`` on stderr (``err=False``: stdout, where a command's report includes it)."""
    print_line(f"warning: {text}", err=err)


def print_error(text: object) -> None:
    """``error: <text>`` as the one line on stderr that a failed command shows."""
    print_line(f"error: {text}", err=True)
