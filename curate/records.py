"""What every reader of an input yields: a record per sample (refused ones with their reason), the shard it came from, and the limits ingest applies."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from curate.runtime import reasons
from curate.runtime.cells import NotText, caption_cell, caption_text
from curate.runtime.decode import Invalid

CAPTION_EXTENSIONS = (".txt", ".json", ".caption")

IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "bytes")

CAPTION_COLUMNS = ("caption", "text", "txt", "prompt")

KEY_COLUMNS = ("key", "__key__", "source", "name", "id")

# a .json sidecar may carry other metadata besides the caption, nested at most this deep
JSON_SIDECAR_MAX = 1 << 20

JSON_MAX_DEPTH = 64

# parquet rows are read in record batches of about this many bytes, whatever the image size
BATCH_BYTES = 8 << 20


@dataclass(frozen=True)
class IngestOptions:
    """What ingest accepts (the curate options of the same names)."""

    max_caption_bytes: int = 16_384
    allow_path_cells: bool = False
    max_image_bytes: int = 256 << 20


@dataclass
class Record:
    key: str  # input-relative source: a path, "shard.tar/member" or "file.parquet:key"
    data: bytes
    caption: str
    refused: str = ""  # a rejection reason decided at ingest time (e.g. unsafe_path)
    detail: str = ""
    caption_note: str = ""  # why a caption that was not text was dropped (the image is kept)


def dropped(where: str, invalid: NotText) -> str:
    """The note a sample keeps when its caption was not text: it is read with no caption, so
    recaptioning gives it one, instead of losing a valid image."""
    return f"{where}: {invalid.detail}; caption dropped, image kept"


@dataclass(frozen=True)
class Shard:
    """One independently readable piece of an input (paths are relative to the input root)."""

    kind: str  # "files" | "webdataset" | "parquet" | "datasets" | "store"
    path: str = ""  # the tar, parquet file or dataset folder ("" = the root itself)
    files: tuple[str, ...] = ()  # kind "files": loose entries, sidecars beside their image
    rows: tuple[int, int] | None = None  # kind "datasets"/"store": [start, stop)


def shown(name: str) -> str:
    """A file name as text that can be recorded: bytes that are not UTF-8 become `\\xNN`."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def refused(key: str, reason: str, detail: str) -> Record:
    """A record decided without reading its content (its id comes from the key, not the bytes)."""
    return Record(key, f"{reason}\0{key}".encode("utf-8", "surrogateescape"), "", reason, detail)


def caption_from(name: str, payload: bytes, max_bytes: int) -> str:
    """The caption in a sidecar's bytes; `Invalid(bad_caption)` when it is not usable text."""
    if not name.lower().endswith(".json"):
        return caption_text(payload, shown(name), max_bytes)
    text = caption_text(payload, shown(name), JSON_SIDECAR_MAX)
    depth = json_depth(text)
    if depth > JSON_MAX_DEPTH:
        raise Invalid(
            reasons.BAD_CAPTION,
            f"{shown(name)} nests {depth} levels deep, over the limit of {JSON_MAX_DEPTH}",
            float(depth),
            float(JSON_MAX_DEPTH),
        )
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise Invalid(reasons.BAD_CAPTION, f"{shown(name)} is not valid JSON: {error}") from None
    if isinstance(meta, dict):
        for column in CAPTION_COLUMNS:
            if isinstance(meta.get(column), str):
                return caption_cell(meta[column], max_bytes)
    return ""


_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def json_depth(text: str) -> int:
    """How deeply TEXT's arrays and objects nest (brackets inside strings not counted), found
    without parsing it, so a sidecar of 100,000 brackets is refused before json.loads recurses."""
    depth = deepest = 0
    for token in _JSON_TOKENS.finditer(text):
        mark = token.group()
        if mark in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif mark in "]}":
            depth -= 1
    return deepest


def unsafe(name: str) -> bool:
    """Absolute, drive-qualified or parent-relative member names could land outside any folder."""
    if not name or name.startswith(("/", "\\")):
        return True
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return ".." in parts or (len(parts[0]) >= 2 and parts[0][1] == ":")


def shard_file(root: Path, rel: str) -> tuple[Path, str]:
    """The file of a tar/parquet shard and the name its records' keys start with."""
    if rel == "":
        return root, root.name
    return root / rel, rel
