"""Decoding of untrusted image files and captions into model-ready records.

Every source (`cm3jax.data.sources`) turns its raw bytes into the same thing: an
RGB uint8 array of `resolution x resolution x 3` and a clean caption string. Images
of any size, mode (1, L, LA, P with or without transparency, RGB, RGBA, CMYK,
16-bit I;16 / 32-bit I, float F, ...) and EXIF orientation are accepted: the
orientation is applied, alpha is composited on white, the shorter side is resized to
the resolution (bicubic with `reducing_gap`, i.e. box-reduce then bicubic, for
high-quality downsampling) and the centre square is kept.

Anything that cannot be decoded raises `BadRecordError` with a one-line reason that
starts with the file's name, so a source can return it as an error record and the
caller can skip and count it. Global Pillow state (`ImageFile.LOAD_TRUNCATED_IMAGES`,
`Image.MAX_IMAGE_PIXELS`) is never changed: truncated files fail on the forced full
decode and decompression bombs fail in `Image.open`.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

WHITE = (255, 255, 255, 255)
_REDUCING_GAP = 3.0
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_TRANSPARENCY_MODES = frozenset({"P", "L", "RGB", "1"})
_SIXTEEN_BIT_MAX = 65535
_ORIENTATION_TRANSPOSE = {  # EXIF orientation -> the transpose that displays it upright
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class BadRecordError(ValueError):
    """A record (image or caption) that cannot be decoded; the message names the file."""


def _one_line(text: str) -> str:
    """Collapses a message onto one line."""
    return " ".join(str(text).split())


def decode_image(data: bytes, resolution: int, name: str) -> np.ndarray:
    """Decodes encoded image bytes into a `resolution x resolution x 3` uint8 array.

    Args:
      data: the encoded file (JPEG, PNG, WebP, GIF, TIFF, BMP, ... anything Pillow reads).
      resolution: side of the square output.
      name: the file's name, used as the prefix of error messages.

    Raises:
      BadRecordError: `f'{name}: reason'` for an empty, truncated, corrupt, unknown or
        oversized (decompression bomb) image.
    """
    if not data:
        raise BadRecordError(f"{name}: empty file (0 bytes)")
    img = _open_fully(data, name)
    try:
        return to_rgb_square(img, resolution)
    except Exception as e:  # noqa: BLE001 - any Pillow failure is a bad record
        raise BadRecordError(f"{name}: cannot convert image ({_describe(e)})") from e
    finally:
        img.close()


def read_image_file(path: str, name: str, resolution: int) -> np.ndarray:
    """Reads and decodes one image file; a missing or unreadable file is a bad record."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        missing = isinstance(e, FileNotFoundError)
        reason = "file not found" if missing else f"cannot read ({e.strerror})"
        raise BadRecordError(f"{name}: {reason}") from e
    return decode_image(data, resolution, name)


def _open_fully(data: bytes, name: str) -> Image.Image:
    """Opens and fully decodes the image, so truncated data fails here, not later."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise BadRecordError(f"{name}: not a recognised image format") from e
    except Image.DecompressionBombError as e:
        raise BadRecordError(f"{name}: image too large ({_describe(e)})") from e
    except Exception as e:  # noqa: BLE001
        raise BadRecordError(f"{name}: cannot open image ({_describe(e)})") from e
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 - truncated / corrupt data
        img.close()
        raise BadRecordError(f"{name}: cannot decode image ({_describe(e)})") from e
    return img


def _describe(error: BaseException) -> str:
    """`Type: message` on one line."""
    message = _one_line(str(error))
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def to_rgb_square(img: Image.Image, resolution: int) -> np.ndarray:
    """Orients, converts to RGB, resizes and centre-crops a PIL image.

    The EXIF orientation (if any) is applied, the image is converted to RGB with alpha
    composited on white, and the centre square (side = the shorter side) is resampled
    to `resolution x resolution`. Returns a uint8 array of shape
    `(resolution, resolution, 3)`.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    img = _apply_orientation(img)
    img = to_rgb(img)
    return _resize_center_crop(img, resolution)


def _apply_orientation(img: Image.Image) -> Image.Image:
    """Applies the EXIF orientation tag; an unreadable EXIF block is ignored."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 - broken EXIF: keep the stored orientation
        return img
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    return img if method is None else img.transpose(method)


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts any Pillow mode to RGB; transparency is composited on white."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode.startswith("I") or img.mode == "F":
        img = _high_bit_depth_to_l(img)
    if img.mode in _TRANSPARENCY_MODES and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in _ALPHA_MODES:
        return _composite_on_white(img)
    return img.convert("RGB")


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """Maps 16/32-bit integer and float grey images to 8-bit 'L' by scaling, not clipping.

    Integer modes are read as 16-bit (0..65535, how PNG/TIFF 16-bit files open);
    float images as 0..1 when their maximum is at most 1, else as 0..255.
    """
    values = np.asarray(img)
    if values.ndim != 2:  # e.g. 'I;16' multi-channel variants Pillow may add
        values = values[..., 0]
    if img.mode == "F":
        finite = np.nan_to_num(values.astype(np.float64))
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        scaled = finite * scale
    else:
        scaled = values.astype(np.float64) * (255.0 / _SIXTEEN_BIT_MAX)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Alpha-composites an image with an alpha channel onto a white background."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _resize_center_crop(img: Image.Image, resolution: int) -> np.ndarray:
    """Resamples the centre square of an RGB image to `resolution` (one resampling step)."""
    width, height = img.size
    if width < 1 or height < 1:
        raise ValueError(f"image has an empty size {width}x{height}")
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    box = (left, top, left + side, top + side)
    if side == resolution and left.is_integer() and top.is_integer():
        square = img.crop(tuple(int(v) for v in box))
    else:
        square = img.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box,
                            reducing_gap=_REDUCING_GAP)
    array = np.asarray(square, dtype=np.uint8)
    return np.ascontiguousarray(array.reshape(resolution, resolution, 3))


def decode_caption(raw: bytes | str, name: str) -> str:
    """Returns the caption as clean text: strict UTF-8, whitespace collapsed, non-empty.

    Raises:
      BadRecordError: `f'{name}: reason'` for bytes that are not UTF-8, text with
        unpaired surrogates (not encodable as UTF-8), non-text values, or a caption
        that is empty after whitespace normalisation.
    """
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = _utf8(bytes(raw), name)
    elif not isinstance(raw, str):
        raise BadRecordError(f"{name}: caption is not text (got {type(raw).__name__})")
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRecordError(f"{name}: caption is not valid Unicode ({e.reason})") from e
    text = " ".join(raw.split())
    if not text:
        raise BadRecordError(f"{name}: empty caption")
    return text


def _utf8(data: bytes, name: str) -> str:
    """Strict UTF-8 decoding (a leading byte-order mark is dropped)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        byte = data[e.start : e.start + 1].hex()
        raise BadRecordError(
            f"{name}: caption is not valid UTF-8 (byte 0x{byte} at offset {e.start})") from e
