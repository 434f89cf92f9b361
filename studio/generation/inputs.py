"""Input images of img2img and inpainting: the inputs store, pinning by sha256, bounded decoding.

Input images are copied into ``$LORA_STUDIO_HOME/inputs`` under the sha256 of their bytes
(:func:`store_input_image`), and a recipe pins that hash: a recipe re-runs exactly even after the
original file moved, and refuses a file that changed (:func:`pin_input`). Every input file is
size-checked before it is read, and decoded within a pixel bound (:func:`bounded_open`), so a
decompression bomb is refused before it is decoded.

Does not hold: the request that names the inputs (``studio.generation.requests``), the recipe
reader that takes them from the store only (``studio.generation.recipes``).
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from studio.core.atomic import write_bytes_atomic
from studio.core.errors import InputFileNotFoundError, InvalidRequestError, RecipeError
from studio.core.hashing import file_sha256
from studio.core.settings import get_settings
from studio.generation.requests import GenerationRequest, one_line

# A 48-megapixel phone photo must fit; 8192 x 8192 = 67 M pixels (four times the largest output) does,
# and decodes to at most 256 MiB as RGBA. It is below Pillow's own decompression-bomb threshold (89 M),
# so Pillow never warns before this bound refuses.
MAX_INPUT_PIXELS = 8192 * 8192
# The file itself: 8192 x 8192 RGB stored raw (BMP, uncompressed PNG) is 192 MiB; 256 MiB holds any
# honest encoding of an image within MAX_INPUT_PIXELS.
MAX_INPUT_BYTES = 256 * 1024 * 1024
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
STORED_SUFFIXES = (".png", ".jpg", ".webp", ".bmp")  # what store_input_image names its copies


class TooManyPixels(Exception):
    """An image claims more pixels than the caller's bound; ``str()`` says how many ("WxH pixels")."""


def bounded_open(source, max_pixels: int):
    """``Image.open`` refusing more than ``max_pixels`` before a pixel is decoded (raises TooManyPixels).

    Pillow's own check (``Image.MAX_IMAGE_PIXELS``, 89 M by default) stays as it is: its warning is
    silenced here because every bound the studio passes is below it and is checked right after, and its
    error (above twice that) is turned into ours. Nothing global changes beyond this call's warnings.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(source)
        except Image.DecompressionBombError:
            raise TooManyPixels(f"more than {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels") from None
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise TooManyPixels(f"{width}x{height} pixels")
    return im


def _too_many_pixels(label: str, error: TooManyPixels) -> InvalidRequestError:
    side = math.isqrt(MAX_INPUT_PIXELS)
    return InvalidRequestError(f"{label} claims {error}, more than the {MAX_INPUT_PIXELS:,} ({side}x{side}) an input "
                               f"image may have: use a smaller image")


def _check_input_size(path: Path, label: str) -> None:
    """Refuse an input file over MAX_INPUT_BYTES before a byte of it is read."""
    size = path.stat().st_size
    if size > MAX_INPUT_BYTES:
        raise InvalidRequestError(f"{label} {path} is {size:,} bytes, more than the {MAX_INPUT_BYTES:,} an input "
                                  f"image may have: use a smaller image")


def inputs_dir() -> Path:
    return get_settings().home / "inputs"


def stored_input(sha256: str) -> Path | None:
    """The inputs store's copy of the image with this sha256, or None."""
    folder = inputs_dir()
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{sha256}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def store_input_image(source) -> Path:
    """Copy an input image (a path, encoded bytes or a PIL image) into ``$LORA_STUDIO_HOME/inputs``,
    named by the sha256 of its bytes, and return that path (what a request's ``init_image`` /
    ``mask_image`` should name: it stays put, so recipes that name it re-run).

    The UI calls this with an upload's bytes; the CLI's files go through it when a request runs.
    """
    suffix = ".png"
    label = f"input image {source}" if isinstance(source, (str, Path)) else "input image"
    if isinstance(source, (str, Path)):
        try:
            path = Path(source).expanduser()
        except RuntimeError:  # "~someone" with no such user
            raise InputFileNotFoundError(f"input image {source} names no user's home folder: give the full "
                                         f"path") from None
        if not path.is_file():
            raise InputFileNotFoundError(f"input image {path} does not exist: pass a PNG, JPEG or WebP file")
        _check_input_size(path, "input image")
        data = path.read_bytes()
        if path.suffix.lower() in IMAGE_SUFFIXES:
            suffix = ".jpg" if path.suffix.lower() == ".jpeg" else path.suffix.lower()
    elif isinstance(source, bytes):
        if len(source) > MAX_INPUT_BYTES:
            raise InvalidRequestError(f"input image is {len(source):,} bytes, more than the {MAX_INPUT_BYTES:,} an "
                                      f"input image may have: use a smaller image")
        data = source
    elif hasattr(source, "save") and hasattr(source, "size"):
        if source.size[0] * source.size[1] > MAX_INPUT_PIXELS:
            raise _too_many_pixels(label, TooManyPixels(f"{source.size[0]}x{source.size[1]} pixels"))
        buffer = io.BytesIO()
        source.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        raise InvalidRequestError(f"an input image must be a path, bytes or a PIL image, not {type(source).__name__}")
    try:
        with bounded_open(io.BytesIO(data), MAX_INPUT_PIXELS) as im:
            fmt = im.format
            im.verify()  # a truncated or damaged file fails here, before anything is stored
    except TooManyPixels as e:
        raise _too_many_pixels(label, e) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        # SyntaxError/ValueError: what some Pillow plugins raise for malformed headers and chunks.
        raise InvalidRequestError(f"{label} is not a readable image ({one_line(e)}): pass a PNG, JPEG or WebP "
                                  f"file") from None
    if not isinstance(source, (str, Path)):
        suffix = {"JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp"}.get(fmt, ".png")
    sha256 = hashlib.sha256(data).hexdigest()
    existing = stored_input(sha256)
    if existing is not None:
        return existing
    folder = inputs_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(folder / f"{sha256}{suffix}", data)  # a reader never sees half an image


def pin_input(label: str, path_text: str | None, pinned: str | None) -> tuple[str | None, str | None]:
    """(stored path, sha256) of an input image; the stored copy wins when the original moved or changed."""
    if path_text is None:
        return None, None
    path = Path(path_text).expanduser()
    if pinned is not None:
        stored = stored_input(pinned)
        if stored is not None:
            return str(stored), pinned
        if not path.is_file():
            raise InputFileNotFoundError(
                f"the {label} {path} is gone and no copy with sha256 {pinned[:12]} is in {inputs_dir()}: "
                f"put the original image back at that path")
        _check_input_size(path, f"the {label}")
        actual = file_sha256(path)
        if actual != pinned:
            raise RecipeError(f"the {label} {path} has sha256 {actual[:12]}, the recipe used {pinned[:12]}: "
                              f"the file changed since the image was made")
    stored = store_input_image(path)
    return str(stored), stored.stem


def load_inputs(request: GenerationRequest):
    """The init image and mask at the request's size (RGB and L), or (None, None) for text-to-image.

    Resized here with PIL (LANCZOS for the picture, NEAREST for the mask so it stays black and white),
    so img2img and inpainting see the same pixels at any size the recipe records.
    """
    if request.init_image is None:
        return None, None
    size = (request.width, request.height)
    init = _decode_input(request.init_image, "the init image", "RGB")
    if init.size != size:
        init = init.resize(size, Image.LANCZOS)
    mask = None
    if request.mask_image is not None:
        mask = _decode_input(request.mask_image, "the mask image", "L")
        if mask.size != size:
            mask = mask.resize(size, Image.NEAREST)
        # Binary: the pipeline binarises at 0.5 too, and the paste-back after generation must agree with it.
        mask = mask.point(lambda v: 255 if v >= 128 else 0)
        if not mask.getbbox():
            raise InvalidRequestError(f"the mask {request.mask_image} is all black: paint the area to repaint "
                                      f"white")
    return init, mask


def _decode_input(path_text: str, label: str, mode: str):
    """Decode a stored input image in ``mode``: size-checked, then pixel-bounded before decoding (a file
    can be put into the inputs store by hand, so the stored copy is checked again)."""
    path = Path(path_text)
    _check_input_size(path, label)
    try:
        with bounded_open(path, MAX_INPUT_PIXELS) as im:
            return im.convert(mode)
    except TooManyPixels as e:
        raise _too_many_pixels(f"{label} {path}", e) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InvalidRequestError(f"{label} {path} is not a readable image ({one_line(e)}): pass a PNG, JPEG or "
                                  f"WebP file") from None


def mask_from_drawing(rgba, size: tuple[int, int]) -> Image.Image | None:
    """The inpainting mask a user drew over the init image: every painted pixel (alpha > 0) white, meaning
    repaint, the rest black; scaled from the drawing's size to ``size`` (the init image's width, height),
    smoothly, as diffusers reads a grey edge as partly repainted. None when nothing was painted.

    ``rgba`` is the drawing as an H x W x 4 array of 0-255 values (what a canvas component returns)."""
    import numpy as np

    array = np.asarray(rgba)
    if array.ndim != 3 or array.shape[2] != 4:
        raise InvalidRequestError(f"a drawn mask must be an RGBA image, got an array of shape {array.shape}")
    painted = array[:, :, 3] > 0
    if not painted.any():
        return None
    mask = Image.fromarray(np.where(painted, 255, 0).astype(np.uint8), "L")
    return mask if mask.size == tuple(size) else mask.resize(tuple(size), Image.Resampling.BILINEAR)
