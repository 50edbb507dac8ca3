"""Read image and caption cells of parquet files and saved datasets without trusting them.

A cell that should hold image bytes may hold anything: a string, a number (`bytes(n)` would make
n zero bytes), or a `datasets` Image dict whose `path` names any file on the machine. Every stage
that reads such tables (curate, caption, precompute, prefs, make-prefs) goes through
`image_cell`, which returns bytes or raises `Invalid` with the reason. A `path` is read only
when the caller passes the folder it must stay inside (the `allow_path_cells` option); with no
folder it is refused, never opened.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from curate.runtime import reasons
from curate.runtime.decode import Invalid

BYTES_TYPES = (bytes, bytearray, memoryview)


def inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """True when PATH, with every link resolved, is ROOT or lies under it."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def image_cell(value: Any, root: str | os.PathLike | None = None) -> bytes:
    """The image bytes of a cell: raw bytes, or a `datasets` Image dict {'bytes', 'path'}.

    A dict with only a `path` is read when ROOT is given and the path (relative paths are taken
    from ROOT) resolves inside ROOT; otherwise it is refused as `unsafe_path`. A null cell is
    empty bytes (the decoder names it `zero_byte`); any other type is `invalid_cell`.
    """
    if value is None:
        return b""
    if isinstance(value, BYTES_TYPES):
        return bytes(value)
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is not None:
            if not isinstance(data, BYTES_TYPES):
                raise Invalid(
                    reasons.INVALID_CELL,
                    f"image cell's 'bytes' is {type(data).__name__}, not bytes",
                )
            return bytes(data)
        path = value.get("path")
        if not path:
            return b""
        if not isinstance(path, str):
            raise Invalid(
                reasons.INVALID_CELL, f"image cell's 'path' is {type(path).__name__}, not text"
            )
        return _read_path_cell(path, root)
    raise Invalid(reasons.INVALID_CELL, f"image cell is {type(value).__name__}, not bytes")


def _read_path_cell(path: str, root: str | os.PathLike | None) -> bytes:
    if root is None:
        raise Invalid(
            reasons.UNSAFE_PATH,
            f"image cell names a file path ({path!r}) instead of holding bytes; paths are not "
            "read (allow_path_cells reads those inside the input folder)",
        )
    full = Path(root) / path  # an absolute PATH stays absolute
    if not inside(full, root):
        raise Invalid(
            reasons.UNSAFE_PATH, f"image cell path {path!r} resolves outside the input folder"
        )
    if not full.is_file():
        raise Invalid(reasons.ZERO_BYTE, f"image cell path {path!r} is not a file in the input")
    return full.read_bytes()


class NotText(Invalid):
    """Caption bytes that are not text (not UTF-8, or holding control characters): the caption
    is unusable, but the image beside it may still be a good sample (curate keeps it and drops
    the caption; recaptioning gives it one)."""

    def __init__(self, detail: str) -> None:
        super().__init__(reasons.BAD_CAPTION, detail)


def caption_cell(value: Any, max_bytes: int) -> str:
    """A caption cell as clean text: None is '', bytes must be UTF-8, at most MAX_BYTES long.

    Raises `Invalid(bad_caption)` naming the problem (and the limit) otherwise.
    """
    if value is None:
        return ""
    if isinstance(value, BYTES_TYPES):
        return caption_text(bytes(value), "caption cell", max_bytes)
    if not isinstance(value, str):
        raise Invalid(reasons.BAD_CAPTION, f"caption cell is {type(value).__name__}, not text")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise Invalid(
            reasons.BAD_CAPTION,
            f"caption is {size} bytes, over the limit of {max_bytes} (max_caption_bytes)",
            float(size),
            float(max_bytes),
        )
    return _plain_text(value, "caption cell")


def caption_text(payload: bytes, origin: str, max_bytes: int) -> str:
    """Caption bytes (a sidecar file or a cell) as text, refusing binary and oversized data."""
    if len(payload) > max_bytes:
        raise Invalid(
            reasons.BAD_CAPTION,
            f"{origin} is {len(payload)} bytes, over the limit of {max_bytes} (max_caption_bytes)",
            float(len(payload)),
            float(max_bytes),
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as error:
        raise NotText(
            f"{origin} is not UTF-8 text (byte 0x{payload[error.start]:02x} at offset {error.start})",
        ) from None
    return _plain_text(text, origin)


def _plain_text(text: str, origin: str) -> str:
    control = next(
        (c for c in text if (ord(c) < 32 and c not in "\t\n\r") or 0xD800 <= ord(c) <= 0xDFFF),
        None,
    )
    if control is not None:
        raise NotText(
            f"{origin} holds control character U+{ord(control):04X} (binary data, not a caption)",
        )
    return text.strip()
