"""Base-model families: what differs between SD-1, SDXL, SD3 and Flux, in one place each.

A family says which diffusers pipeline classes run it, how prompts become the conditioning the
denoiser sees (training needs this without a pipeline), which modules LoRA targets by default, its
native resolution, and the names other tools use for it (kohya's ``ss_base_model_version``,
Stability's ModelSpec ``modelspec.architecture``).

Families live one per module (``sd1.py``, ``sdxl.py``, ``flux.py`` and ``sd3.py``) and are added to
:data:`FAMILIES` by one explicit :func:`register_family` call each, at the
bottom of this file. Nothing here imports torch or diffusers at import time.
"""

from __future__ import annotations

from studio.core.errors import InvalidRequestError
from studio.core.families.architectures import ARCHITECTURES
from studio.core.families.base import Family

FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add ``family`` under its ``name``; registering a name twice is a programming error."""
    if family.name in FAMILIES:
        raise ValueError(f"family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    """The family called ``name`` (e.g. ``"sd1"``); unknown names list the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise InvalidRequestError(
            f"unknown base-model family {name!r}: known families are {', '.join(sorted(FAMILIES))}"
        ) from None


def family_for_pipeline_class(class_name: str) -> Family:
    """The family whose pipelines include ``class_name`` (as written in ``model_index.json``)."""
    for family in FAMILIES.values():
        if class_name in family.pipeline_class_names:
            return family
    raise InvalidRequestError(
        f"{class_name} is not a pipeline of a supported family; supported: "
        + "; ".join(f"{f.name}: {', '.join(f.pipeline_class_names)}" for f in FAMILIES.values())
    )


def family_of_pipeline(pipe) -> Family:
    """The family a loaded diffusers pipeline belongs to (by its class, as ``model_index.json`` names it)."""
    return family_for_pipeline_class(type(pipe).__name__)


def kohya_prefixes() -> dict[str, str]:
    """Every kohya-style key prefix a family or a known architecture uses -> the component it names."""
    # The architectures' tables first: they say what a prefix means with no family in view (lora_te3_ is
    # a third encoder, SD3's); a family's own meaning (FLUX's lora_unet_ and lora_te3_) is its own table.
    out: dict[str, str] = {}
    for arch in ARCHITECTURES.values():
        for prefix, component in arch.kohya_prefixes.items():
            out.setdefault(prefix, component)
    for family in FAMILIES.values():
        for prefix, component in family.kohya_prefix_map().items():
            out.setdefault(prefix, component)
    return out


def architecture_of(family: Family | str):
    """The :class:`Architecture` of a family (or family name)."""
    family = get_family(family) if isinstance(family, str) else family
    return family.architecture or ARCHITECTURES[family.name]


from studio.core.families.flux import FLUX  # noqa: E402  (registration needs the functions above)
from studio.core.families.sd1 import SD1  # noqa: E402
from studio.core.families.sd3 import SD3  # noqa: E402
from studio.core.families.sdxl import SDXL  # noqa: E402

register_family(SD1)
register_family(SDXL)
register_family(SD3)
register_family(FLUX)
