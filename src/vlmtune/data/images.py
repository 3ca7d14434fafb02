"""Opening training images safely: size checked from the header before decoding, every mode turned into RGB.

Pillow reads only the header in `Image.open`; pixels are decoded by `load()`. So an oversized image (a
decompression bomb, or a 20k x 20k scan) is rejected after reading a few bytes. Pillow's own global limit
(`Image.MAX_IMAGE_PIXELS`) is left alone: its warning is silenced locally and its error is reported as ours.
Animated images (GIF, WebP, APNG) give their first frame: `load()` decodes the current frame, which is the first.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmtune.data.embedded import EmbeddedImage
from vlmtune.errors import DataError

_READ_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, ArithmeticError, struct.error
)
"""What Pillow's decoders raise on corrupt data (a bad EXIF block raises struct.error or KeyError)."""
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_ORIENTATION = 0x0112


ImageSource = Path | str | EmbeddedImage


def image_file(source: ImageSource) -> Path | io.BytesIO:
    """What `PIL.Image.open` takes for an image path or an embedded image."""
    return io.BytesIO(source.data) if isinstance(source, EmbeddedImage) else Path(source)


def _not_a_file(path: Path) -> str | None:
    try:
        if path.is_file():
            return None
        if path.is_dir():
            return f"image path is a folder, not a file: {path}"
        if path.is_symlink():
            return f"image file is a broken symbolic link: {path} -> {path.readlink()}"
        if path.exists():
            return f"image path is not a regular file (a device, pipe or socket): {path}"
    except OSError as exc:  # e.g. ENAMETOOLONG, EACCES on a parent folder
        return f"image file cannot be read ({exc.strerror or exc}): {path}"
    return f"image file not found: {path}"


def _open_header(path: Path | EmbeddedImage, max_megapixels: float) -> Image.Image:
    """Open without decoding and enforce the size limit. The caller closes the image."""
    problem = None if isinstance(path, EmbeddedImage) else _not_a_file(path)
    if problem:
        raise DataError(problem)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(image_file(path))
    except Image.DecompressionBombError as exc:
        raise DataError(
            f"image {path} rejected before decoding: {exc} (Pillow's hard limit); resize it"
        ) from exc
    except UnidentifiedImageError as exc:
        raise DataError(
            f"image {path} is not a readable image file (corrupt, or not an image format)"
        ) from exc
    except _READ_ERRORS as exc:
        raise DataError(f"image {path} cannot be read: {exc}") from exc
    width, height = im.size
    if width * height > max_megapixels * 1e6:
        im.close()
        raise DataError(
            f"image {path} is {width}x{height} = {width * height / 1e6:.1f} megapixels, over "
            f"data.max_image_megapixels={max_megapixels}; resize it (rejected before decoding)"
        )
    if width == 0 or height == 0:
        im.close()
        raise DataError(f"image {path} has zero size ({width}x{height})")
    return im


def image_size(path: ImageSource, max_megapixels: float | None = None) -> tuple[int, int]:
    """(width, height) from the file header only; nothing is decoded.

    Raises DataError for images over Pillow's hard limit (2 x `Image.MAX_IMAGE_PIXELS`, ~179 MP by default).
    """
    with _open_header(_source(path), max_megapixels if max_megapixels is not None else float("inf")) as im:
        return im.size


def _greyscale_to_rgb(im: Image.Image) -> Image.Image:
    """16/32-bit integer and float greyscale, scaled to 8 bits (Pillow's convert would clip, not scale)."""
    arr = np.asarray(im).astype(np.float64)
    peak = float(arr.max()) if arr.size else 0.0
    if im.mode == "F" and peak <= 1.0:
        arr = arr * 255.0
    elif peak > 255:
        arr = arr / 257.0
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L").convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB version of a decoded image: transparency is composited on white, 16-bit greyscale scaled."""
    if im.mode == "P" or (im.mode in ("L", "RGB") and "transparency" in im.info):
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode == "RGB":
        return im
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        return _greyscale_to_rgb(im)
    return im.convert("RGB")


class Decoded(NamedTuple):
    image: Image.Image
    """RGB."""
    mode: str
    """The file's original mode."""
    animated: bool
    """More than one frame (only the first is used)."""


def _source(path: ImageSource) -> Path | EmbeddedImage:
    return path if isinstance(path, EmbeddedImage) else Path(path)


def decode_image(path: ImageSource, max_megapixels: float = 100.0) -> Decoded:
    """The first frame as RGB, its original mode, and whether the file is animated. The EXIF orientation is
    applied, as transformers' `load_image` does.

    Raises DataError for a missing, oversized, corrupt or truncated file, or a mode that cannot become RGB.
    """
    path = _source(path)
    with _open_header(path, max_megapixels) as im:
        mode = im.mode
        try:
            animated = bool(getattr(im, "is_animated", False))
            im.load()
            if im.getexif().get(_ORIENTATION, 1) != 1:
                im = ImageOps.exif_transpose(im)
            rgb = to_rgb(im)
        except _READ_ERRORS as exc:
            raise DataError(f"image {path} is corrupt or truncated ({mode}): {exc}") from exc
    return Decoded(rgb, mode, animated)


def load_image(path: ImageSource, max_megapixels: float = 100.0) -> tuple[Image.Image, str]:
    """(RGB image of the first frame, the file's original mode); see `decode_image`."""
    decoded = decode_image(path, max_megapixels)
    return decoded.image, decoded.mode


def open_image(path: ImageSource, max_megapixels: float = 100.0) -> Image.Image:
    """The image as RGB, decoded only when it is within `max_megapixels` (see `load_image`)."""
    return load_image(path, max_megapixels)[0]
