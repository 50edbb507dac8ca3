"""Decode and validate image bytes: every way a file can fail gets its own rejection reason.

`check(data, ...)` either returns a `Decoded` image (upright, RGB, with the bytes the sample
table should store) or raises `Invalid(reason, detail, score, threshold)`. `to_rgb(data)` is the
small public helper other stages use to read the `image` column.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from curate import reasons

# PIL's own bomb check would raise before ours can record the reason; we apply our own cap.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

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


def _open(data: bytes) -> Image.Image:
    if len(data) == 0:
        raise Invalid(reasons.ZERO_BYTE, "file has 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(io.BytesIO(data))
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
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    return image.mode in ("RGB", "L") and orientation in (None, 1)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=6)
    return buffer.getvalue()


def check(data: bytes, min_side: int, max_aspect: float, max_pixels: int) -> Decoded:
    """Decode DATA and apply the validation limits; raise `Invalid` with the reason otherwise."""
    image = _open(data)
    width, height = image.size
    if width * height > max_pixels:
        raise Invalid(
            reasons.DECOMPRESSION_BOMB,
            f"declares {width}x{height} pixels",
            float(width * height),
            float(max_pixels),
        )
    plain = _is_plain(image)
    _load(image)
    try:
        upright = normalise(image)
    except Exception as error:
        raise Invalid(reasons.UNDECODABLE, f"cannot convert mode {image.mode}: {error}") from error
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


def to_rgb(data: bytes) -> Image.Image:
    """Decode image bytes (e.g. the sample table's `image` column) into an upright RGB image.

    Raises ValueError naming what was wrong when the bytes are not a decodable image.
    """
    try:
        image = _open(bytes(data))
        _load(image)
        return normalise(image)
    except Invalid as error:
        raise ValueError(f"cannot decode image bytes ({len(data)} bytes): {error}") from error
