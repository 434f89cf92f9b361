"""Small display helpers every page uses: enlarged thumbnails, error boxes, the shared registry client."""

from __future__ import annotations

import io
from contextlib import contextmanager

import streamlit as st
from PIL import Image

from studio.errors import StudioError


def enlarged(image, min_side: int = 160):
    """Small images (the tiny model's 32 px) shown enlarged with hard pixel edges, not blurred.

    ``image`` is a PIL image or a path; a path that cannot be opened comes back as None.
    """
    if not isinstance(image, Image.Image):
        try:
            with Image.open(image) as im:
                image = im.convert("RGB")
        except OSError:
            return None
    if image.width < min_side:
        factor = max(1, -(-min_side // image.width))  # ceiling: 32 px -> x5 = 160 px
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    return image


def png_bytes(image, pnginfo=None) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=pnginfo)
    return buf.getvalue()


@contextmanager
def reported(action: str):
    """Run a library call; its StudioError becomes an error box, anything else a one-line message.

    Never a traceback on the page: the user sees what went wrong and the page keeps what they typed.
    """
    try:
        yield
    except StudioError as e:
        st.error(str(e))
    except Exception as e:  # an unexpected failure still gets words, never a raw traceback
        st.error(f"{action} failed: {type(e).__name__}: {e}")


@st.cache_resource(show_spinner=False)
def registry():
    """One registry client per studio home, shared by every session (it holds a connection pool)."""
    from studio.settings import get_settings

    return _registry_for(str(get_settings().home))


def _registry_for(home: str):
    from adapters.registry import Registry

    return Registry(home=home)


def get_registry():
    """The registry of the current ``$LORA_STUDIO_HOME`` (re-created when the home changes, as in tests)."""
    from studio.settings import get_settings

    reg = registry()
    if reg.store.root != get_settings().home / "blobs":
        registry.clear()
        reg = registry()
    return reg
