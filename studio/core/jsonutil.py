"""One way to make a value JSON-ready: :func:`jsonable`.

Holds the general cleaner every JSON writer calls before ``json.dumps``: registry records, peft
configs packed into safetensors metadata, training events and results. It changes containers and
values JSON cannot hold into ones it can, and nothing else.

Does not hold: the Hub's ``public_value`` (``studio/app/hub.py``), which has a different job: it
removes local paths from what goes public.
"""

from __future__ import annotations

import enum
import math
from typing import Any


def jsonable(value: Any) -> Any:
    """``value`` built from JSON's types only, so ``json.dumps(..., allow_nan=False)`` accepts it.

    Dicts keep their items with keys as strings; lists and tuples become lists; sets become sorted
    lists (a set has no order, and a file written twice should be the same bytes); an enum (peft's
    ``PeftType``, say) becomes its value; a float that is NaN or infinite becomes ``None`` (JSON has
    none; a diverged loss is written as null and the message beside it says what happened). Other
    values are returned as they are.
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(jsonable(v) for v in value)
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


__all__ = ["jsonable"]
