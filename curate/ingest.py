"""Read raw image-text collections as a stream of records, shard by shard, in a deterministic order.

Layouts: an image folder with sidecar captions (`x.jpg` + `x.txt` or `x.json`), webdataset tar
shards, parquet files with image bytes, a saved `datasets` dataset, or a finished stage output.
A folder may mix them: loose images, `.tar` and `.parquet` files and saved-dataset folders side
by side are all read, in path order (nothing present is ignored).

`plan(root)` lists the input's shards (a group of loose files, one tar, one parquet file, a row
range of a saved dataset) without reading any image; `read_shard(root, shard)` streams one
shard's records, so a reader never holds more than one shard's current sample in memory and a
shard can be read by any worker. `read_records(root)` is every shard in order.
The readers are curate/ingest_tar.py (webdataset) and curate/ingest_tables.py (parquet,
saved datasets, stage outputs); what they yield is curate/records.py.

Every input becomes a record, refused ones with their reason (the caller records the rejection):
nothing is extracted to disk; tar members that are links, absolute or climb out with `..`,
symlinks that leave the input folder, table cells naming local files, hidden files and special
files are refused (`unsafe_path`, `hidden_file`) and never opened; a tar or parquet file that
cannot be read to its end is one `corrupt_shard` record; captions longer than the cap are
`bad_caption`. A caption that is not text (not UTF-8, or control characters) is dropped and its
image read with no caption and a `caption_note` saying why, so recaptioning can give it one. A non-UTF-8 file name is read, its source shown with the bad
bytes escaped (`\\xNN`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from curate.ingest_tables import load_table, parquet, table
from curate.ingest_tar import webdataset
from curate.records import (
    CAPTION_EXTENSIONS,
    JSON_SIDECAR_MAX,
    IngestOptions,
    Record,
    Shard,
    caption_from,
    dropped,
    refused,
    shown,
)
from curate.runtime import reasons
from curate.runtime.cells import NotText, inside
from curate.runtime.decode import Invalid
from curate.runtime.store import MANIFEST, SAMPLES

LAYOUTS = ("folder", "webdataset", "parquet", "datasets", "store")
FILES_PER_SHARD = 256  # loose files per shard of an image folder
ROWS_PER_SHARD = 4096  # rows per shard of a saved dataset or stage output


def _is_dataset_dir(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "state.json").is_file()


def _is_store_dir(path: Path) -> bool:
    return (path / MANIFEST).is_file() and (path / SAMPLES).is_dir()


def detect_layout(root: Path) -> str:
    """The single layout of ROOT, or 'folder' for a folder (which may also hold shards)."""
    if root.is_file():
        if root.suffix == ".tar":
            return "webdataset"
        if root.suffix == ".parquet":
            return "parquet"
        raise ValueError(
            f"input file {root} is neither a .tar shard nor a .parquet file; pass a folder of them"
        )
    if _is_store_dir(root):
        return "store"
    if _is_dataset_dir(root):
        return "datasets"
    return "folder"


def plan(root: str | Path, files_per_shard: int = FILES_PER_SHARD) -> list[Shard]:
    """The shards of the input at ROOT, in reading order; reads no image."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"input {root} does not exist")
    layout = detect_layout(root)
    if layout in ("webdataset", "parquet"):
        return [Shard(layout, "")]
    if layout in ("datasets", "store"):
        return _table_shards(root, layout, "")
    return _folder_plan(root, files_per_shard)


def _table_shards(root: Path, kind: str, rel: str) -> list[Shard]:
    try:
        rows = load_table(root / rel if rel else root, kind).num_rows
    except Exception as error:  # a broken saved dataset is one rejected row
        return [Shard(kind, rel, files=(f"{type(error).__name__}: {error}",))]
    if rows == 0:
        return []
    return [
        Shard(kind, rel, rows=(start, min(rows, start + ROWS_PER_SHARD)))
        for start in range(0, rows, ROWS_PER_SHARD)
    ]


def _folder_plan(root: Path, files_per_shard: int) -> list[Shard]:
    """Walk ROOT without following links: loose entries, and shards found in it, in path order."""
    entries: list[tuple[PurePosixPath, str]] = []  # (relative path, "entry" | shard kind)
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(directory)
        rel_dir = base.relative_to(root)
        keep = []
        for name in sorted(dirnames):
            full, rel = base / name, PurePosixPath((rel_dir / name).as_posix())
            if name.startswith(".") or full.is_symlink():
                entries.append((rel, "entry"))  # refused when read: hidden, or a linked folder
            elif _is_store_dir(full):
                entries.append((rel, "store"))
            elif _is_dataset_dir(full):
                entries.append((rel, "datasets"))
            else:
                keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            full, rel = base / name, PurePosixPath((rel_dir / name).as_posix())
            regular = not full.is_symlink() and not name.startswith(".")
            if regular and name.endswith(".tar"):
                entries.append((rel, "webdataset"))
            elif regular and name.endswith(".parquet"):
                entries.append((rel, "parquet"))
            else:
                entries.append((rel, "entry"))
    entries.sort()
    shards: list[Shard] = []
    loose = [str(rel) for rel, kind in entries if kind == "entry"]
    groups: dict[str, list[str]] = {}
    for rel in loose:  # an image and its sidecars share the path without the suffix
        groups.setdefault(str(PurePosixPath(rel).with_suffix("")), []).append(rel)
    pending: list[str] = []
    emitted: set[str] = set()
    for rel, kind in entries:
        if kind == "entry":
            stem = str(PurePosixPath(rel).with_suffix(""))
            if stem in emitted:
                continue
            emitted.add(stem)
            pending += groups[stem]
            if len(pending) >= files_per_shard:
                shards.append(Shard("files", files=tuple(pending)))
                pending = []
            continue
        if pending:  # keep path order: loose files before the shard that follows them
            shards.append(Shard("files", files=tuple(pending)))
            pending = []
        if kind in ("store", "datasets"):
            shards += _table_shards(root, kind, str(rel))
        else:
            shards.append(Shard(kind, str(rel)))
    if pending:
        shards.append(Shard("files", files=tuple(pending)))
    return shards


def read_records(root: str | Path, options: IngestOptions | None = None) -> Iterator[Record]:
    """Every sample of the input at ROOT, in a stable order (sorted files, stored row order).

    Raises ValueError when the input holds nothing to read (an empty folder, or captions only).
    """
    root = Path(root)
    count = 0
    for shard in plan(root):
        for record in read_shard(root, shard, options):
            count += 1
            yield record
    if count == 0:
        raise ValueError(nothing_to_read(root))


def nothing_to_read(root: Path) -> str:
    """Why an input that yielded no record cannot be curated, in one line."""
    if root.is_dir():
        files = [p for p in root.rglob("*") if p.is_file()]
        captions = sum(p.suffix.lower() in CAPTION_EXTENSIONS for p in files)
        if captions:
            return (
                f"{root} holds no image: only {captions} caption/metadata file(s) "
                f"({', '.join(CAPTION_EXTENSIONS)}) without an image beside them"
            )
        return f"{root} holds no image (the folder is empty); pass a folder of images, tar shards, parquet files or a saved dataset"
    return f"{root} holds no rows"


def read_shard(
    root: str | Path, shard: Shard, options: IngestOptions | None = None
) -> Iterator[Record]:
    """The records of one shard of the input at ROOT (see `plan`)."""
    root, options = Path(root), options or IngestOptions()
    if shard.kind == "files":
        yield from _files(root, shard.files, options)
    elif shard.kind == "webdataset":
        yield from webdataset(root, shard.path, options)
    elif shard.kind == "parquet":
        yield from parquet(root, shard.path, options)
    elif shard.kind in ("datasets", "store"):
        yield from table(root, shard, options)
    else:
        raise ValueError(f"unknown shard kind {shard.kind!r}")


# -- loose files ----------------------------------------------------------------------------------


def read_inside(
    root: Path, rel: str, limit: int | None = None, reason: str = reasons.BAD_CAPTION
) -> bytes:
    """Bytes of ROOT/REL, a regular file or a link to one inside ROOT; `Invalid` for anything else.

    Links out of ROOT, linked folders, pipes and devices are refused (`unsafe_path`) unopened;
    other readers of input folders (e.g. preference pair folders) can use it the same way.

    With LIMIT, a file larger than it raises `Invalid(REASON)` before any byte is read. A hard
    link whose other names are not all inside ROOT is refused like a symbolic link out of it.
    """
    full = root / rel
    info = os.lstat(full)
    if stat.S_ISLNK(info.st_mode):
        if not inside(full, root):
            raise Invalid(
                reasons.UNSAFE_PATH,
                f"symbolic link to {shown(os.readlink(full))!r}, outside the input folder; not followed",
            )
        full = Path(os.path.realpath(full))
        info = os.stat(full)
        if stat.S_ISDIR(info.st_mode):
            raise Invalid(reasons.UNSAFE_PATH, "symbolic link to a folder; not followed")
    if stat.S_ISDIR(info.st_mode):
        raise Invalid(reasons.UNSAFE_PATH, "a folder where a file was expected")
    if not stat.S_ISREG(info.st_mode):
        raise Invalid(
            reasons.UNSAFE_PATH, "not a regular file (a device, pipe or socket); not opened"
        )
    if info.st_nlink > 1 and links_inside(root).get((info.st_dev, info.st_ino), 0) < info.st_nlink:
        raise Invalid(
            reasons.UNSAFE_PATH,
            f"hard link to a file with {info.st_nlink} names, not all inside the input folder; "
            "not read",
        )
    if limit is not None and info.st_size > limit:
        option = "max_caption_bytes" if reason == reasons.BAD_CAPTION else "max_image_bytes"
        raise Invalid(
            reason,
            f"{shown(full.name)} is {info.st_size} bytes, over the limit of {limit} ({option})",
            float(info.st_size),
            float(limit),
        )
    descriptor = os.open(full, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(descriptor, "rb") as handle:
        return handle.read()


@functools.lru_cache(maxsize=4)
def _links_inside(root: str, _: int) -> dict[tuple[int, int], int]:
    found: dict[tuple[int, int], int] = {}
    for directory, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            with contextlib.suppress(OSError):
                info = os.lstat(os.path.join(directory, name))
                if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
                    key = (info.st_dev, info.st_ino)
                    found[key] = found.get(key, 0) + 1
    return found


def links_inside(root: Path) -> dict[tuple[int, int], int]:
    """(device, inode) -> how many names of that multiply-linked file lie inside ROOT (walked
    once per process and input, only when some file has more than one name)."""
    real = os.path.realpath(root)
    return _links_inside(real, os.stat(real).st_mtime_ns)


def _files(root: Path, files: tuple[str, ...], options: IngestOptions) -> Iterator[Record]:
    groups: dict[str, list[str]] = {}
    for rel in files:
        groups.setdefault(str(PurePosixPath(rel).with_suffix("")), []).append(rel)
    for rel in files:
        key = shown(rel)
        name = PurePosixPath(rel).name
        if any(part.startswith(".") for part in PurePosixPath(rel).parts):
            yield refused(
                key, reasons.HIDDEN_FILE, "hidden file or folder (name starts with '.'); not read"
            )
            continue
        if name.lower().endswith(CAPTION_EXTENSIONS):
            continue  # a sidecar (read with its image) or collection metadata such as DEMO_TRUTH.json
        try:
            data = read_inside(root, rel, options.max_image_bytes, reasons.TOO_LARGE)
        except Invalid as invalid:
            yield refused(key, invalid.reason, invalid.detail)
            continue
        except OSError as error:
            yield refused(key, reasons.UNDECODABLE, f"cannot read: {error.strerror or error}")
            continue
        caption, refusal, note = "", None, ""
        for sibling in groups[str(PurePosixPath(rel).with_suffix(""))]:
            sibling_name = PurePosixPath(sibling).name
            if caption or not sibling_name.lower().endswith(CAPTION_EXTENSIONS):
                continue
            limit = (
                JSON_SIDECAR_MAX
                if sibling_name.lower().endswith(".json")
                else options.max_caption_bytes
            )
            try:
                caption = caption_from(
                    sibling_name, read_inside(root, sibling, limit), options.max_caption_bytes
                )
            except NotText as invalid:
                note = dropped(f"caption sidecar {shown(sibling_name)}", invalid)
            except Invalid as invalid:
                refusal = (
                    invalid.reason,
                    f"caption sidecar {shown(sibling_name)}: {invalid.detail}",
                )
                break
            except OSError as error:
                refusal = (
                    reasons.BAD_CAPTION,
                    f"caption sidecar {shown(sibling_name)}: {error.strerror or error}",
                )
                break
        if refusal is not None:
            yield Record(key, data, "", *refusal)
        else:
            yield Record(key, data, caption, caption_note=note)


# -- webdataset tar shards --------------------------------------------------------------------------


# -- tables: parquet, saved datasets, stage outputs -----------------------------------------------
