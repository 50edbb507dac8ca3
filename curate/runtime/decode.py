"""Decode and validate image bytes: every way a file can fail gets its own rejection reason.

`check(data, ...)` either returns a `Decoded` image (upright, RGB, with the bytes the sample
table should store) or raises `Invalid(reason, detail, score, threshold)`. `decode_image(data)`
is the one decoder every other stage uses (caption, precompute, prefs, make-prefs, dpo, the
captioning server); `to_rgb(data)` is the same with a ValueError. Every path checks the pixel
count an image declares before any pixel is decoded, so a small file declaring a huge canvas
costs nothing. PIL's own process-wide guard (`Image.MAX_IMAGE_PIXELS`) is left as it is.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from curate.runtime import reasons

ImageFile.LOAD_TRUNCATED_IMAGES = False

# The default cap, in pixels: PIL's own default limit (about 89.5 MP, a 9459 x 9459 canvas).
DEFAULT_MAX_PIXELS = 89_478_485

EXIF_ORIENTATION = 0x0112
TRUNCATION_HINTS = ("truncated", "not enough data", "broken data stream", "premature end")
# Signatures of image formats: bytes that start like one but do not open are undecodable, not "not an image".
MAGIC = (
    b"\xff\xd8\xff",
    b"\x89PNG",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"\x00\x00\x01\x00",
)


class Invalid(Exception):
    """An input that cannot become a sample, with the reason it is rejected."""

    def __init__(
        self,
        reason: str,
        detail: str = "",
        score: float | None = None,
        threshold: float | None = None,
    ):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.score, self.threshold = reason, detail, score, threshold


@dataclass
class Decoded:
    image: Image.Image  # upright RGB
    stored: bytes  # the original bytes when already plain RGB/L, else a lossless PNG of `image`
    normalised: bool  # True when `stored` is a PNG we made


def _bomb(width: int, height: int, max_pixels: int) -> Invalid:
    return Invalid(
        reasons.DECOMPRESSION_BOMB,
        f"declares {width}x{height} pixels, over the cap of {max_pixels}",
        float(width * height),
        float(max_pixels),
    )


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header only; refuse a declared size over MAX_PIXELS before decoding anything."""
    if len(data) == 0:
        raise Invalid(reasons.ZERO_BYTE, "file has 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:  # PIL's own guard, above twice its limit
        found = re.search(r"\((\d+) pixels\)", str(error))
        pixels = float(found.group(1)) if found else None
        declared = f"{int(pixels)} pixels" if pixels is not None else "a size past PIL's own limit"
        raise Invalid(
            reasons.DECOMPRESSION_BOMB,
            f"declares {declared}, over the cap of {max_pixels}",
            pixels,
            float(max_pixels),
        ) from error
    except UnidentifiedImageError as error:
        if data.startswith(MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            raise Invalid(
                reasons.UNDECODABLE, f"starts like an image but cannot be parsed: {error}"
            ) from error
        raise Invalid(
            reasons.NOT_AN_IMAGE, f"no image format recognised ({len(data)} bytes)"
        ) from error
    except OSError as error:
        if any(hint in str(error).lower() for hint in TRUNCATION_HINTS):
            raise Invalid(reasons.TRUNCATED, str(error)) from error
        raise Invalid(reasons.UNDECODABLE, f"{type(error).__name__}: {error}") from error
    except Exception as error:  # a malformed header of a recognised format
        raise Invalid(reasons.UNDECODABLE, f"{type(error).__name__}: {error}") from error
    width, height = image.size
    if width * height > max_pixels:
        raise _bomb(width, height, max_pixels)
    return image


def _load(image: Image.Image) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
    except OSError as error:
        message = str(error)
        if any(hint in message.lower() for hint in TRUNCATION_HINTS):
            raise Invalid(reasons.TRUNCATED, message) from error
        raise Invalid(reasons.UNDECODABLE, message) from error
    except Exception as error:
        raise Invalid(reasons.UNDECODABLE, f"{type(error).__name__}: {error}") from error


def normalise(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB: EXIF transposed, palette/alpha composited on white, CMYK and 16-bit converted."""
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 or mode.startswith("I;16") else 255.0
        return Image.fromarray(
            np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L"
        ).convert("RGB")
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 if array.max() <= 1.0 else 1.0
        return Image.fromarray(np.clip(array * scale + 0.5, 0, 255).astype(np.uint8), "L").convert(
            "RGB"
        )
    if mode == "1":
        return image.convert("L").convert("RGB")
    return image.convert("RGB")


def _is_plain(image: Image.Image) -> bool:
    """Plain RGB/L without a turning EXIF tag; an unreadable EXIF block counts as not plain."""
    if image.mode not in ("RGB", "L"):
        return False
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block: store our own PNG instead
        return False
    return orientation in (None, 1)


def _upright(image: Image.Image) -> Image.Image:
    """Load the pixels and normalise them; every failure is an `Invalid` with its reason."""
    _load(image)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return normalise(image)
    except OSError as error:
        if any(hint in str(error).lower() for hint in TRUNCATION_HINTS):
            raise Invalid(reasons.TRUNCATED, str(error)) from error
        raise Invalid(reasons.UNDECODABLE, f"cannot convert mode {image.mode}: {error}") from error
    except Exception as error:
        raise Invalid(reasons.UNDECODABLE, f"cannot convert mode {image.mode}: {error}") from error


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=6)
    return buffer.getvalue()


def check(data: bytes, min_side: int, max_aspect: float, max_pixels: int) -> Decoded:
    """Decode DATA and apply the validation limits; raise `Invalid` with the reason otherwise."""
    image = _open(data, max_pixels)
    upright = _upright(image)
    plain = _is_plain(image)
    width, height = upright.size
    if min(width, height) == 0:
        raise Invalid(reasons.UNDECODABLE, f"{width}x{height} has no pixels")
    aspect = max(width, height) / min(width, height)
    if aspect > max_aspect:
        raise Invalid(
            reasons.ASPECT_RATIO, f"{width}x{height}", round(aspect, 4), float(max_aspect)
        )
    if min(width, height) < min_side:
        raise Invalid(
            reasons.TOO_SMALL, f"{width}x{height}", float(min(width, height)), float(min_side)
        )
    if plain:
        return Decoded(upright, data, False)
    return Decoded(upright, _png(upright), True)


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image in DATA with only its header read (size, mode), refusing more than MAX_PIXELS.

    `.load()` decodes the pixels (raising OSError on a truncated file); raises `Invalid` otherwise.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise Invalid(reasons.INVALID_CELL, f"image is {type(data).__name__}, not bytes")
    return _open(bytes(data), max_pixels)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Upright RGB from image bytes, refusing more than MAX_PIXELS; raises `Invalid` otherwise."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise Invalid(reasons.INVALID_CELL, f"image is {type(data).__name__}, not bytes")
    return _upright(_open(bytes(data), max_pixels))


def plain_format(data: bytes) -> str | None:
    """PIL's format name of DATA when its bytes show the image as decoded (RGB/L, upright), else None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            return image.format if image.mode == "RGB" and _is_plain(image) else None
    except Exception:  # only a hint for passing bytes through unchanged
        return None


def to_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes (e.g. the sample table's `image` column) into an upright RGB image.

    Raises ValueError naming what was wrong when the bytes are not a decodable image.
    """
    try:
        return decode_image(data, max_pixels)
    except Invalid as error:
        size = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else "no"
        raise ValueError(f"cannot decode image bytes ({size} bytes): {error}") from error
