"""Read raw image-text collections as a stream of records, shard by shard, in a deterministic order.

Layouts: an image folder with sidecar captions (`x.jpg` + `x.txt` or `x.json`), webdataset tar
shards, parquet files with image bytes, a saved `datasets` dataset, or a finished stage output.
A folder may mix them: loose images, `.tar` and `.parquet` files and saved-dataset folders side
by side are all read, in path order (nothing present is ignored).

`plan(root)` lists the input's shards (a group of loose files, one tar, one parquet file, a row
range of a saved dataset) without reading any image; `read_shard(root, shard)` streams one
shard's records, so a reader never holds more than one shard's current sample in memory and a
shard can be read by any worker. `read_records(root)` is every shard in order.

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
import json
import os
import re
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from curate.runtime import reasons
from curate.runtime.cells import NotText, caption_cell, caption_text, image_cell, inside
from curate.runtime.decode import Invalid
from curate.runtime.store import MANIFEST, SAMPLES

CAPTION_EXTENSIONS = (".txt", ".json", ".caption")
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "bytes")
CAPTION_COLUMNS = ("caption", "text", "txt", "prompt")
KEY_COLUMNS = ("key", "__key__", "source", "name", "id")
LAYOUTS = ("folder", "webdataset", "parquet", "datasets", "store")
FILES_PER_SHARD = 256  # loose files per shard of an image folder
ROWS_PER_SHARD = 4096  # rows per shard of a saved dataset or stage output
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


def _refused(key: str, reason: str, detail: str) -> Record:
    """A record decided without reading its content (its id comes from the key, not the bytes)."""
    return Record(key, f"{reason}\0{key}".encode("utf-8", "surrogateescape"), "", reason, detail)


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
        rows = _load_table(root / rel if rel else root, kind).num_rows
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
        yield from _webdataset(root, shard.path, options)
    elif shard.kind == "parquet":
        yield from _parquet(root, shard.path, options)
    elif shard.kind in ("datasets", "store"):
        yield from _table(root, shard, options)
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


def _caption_from(name: str, payload: bytes, max_bytes: int) -> str:
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


def _files(root: Path, files: tuple[str, ...], options: IngestOptions) -> Iterator[Record]:
    groups: dict[str, list[str]] = {}
    for rel in files:
        groups.setdefault(str(PurePosixPath(rel).with_suffix("")), []).append(rel)
    for rel in files:
        key = shown(rel)
        name = PurePosixPath(rel).name
        if any(part.startswith(".") for part in PurePosixPath(rel).parts):
            yield _refused(
                key, reasons.HIDDEN_FILE, "hidden file or folder (name starts with '.'); not read"
            )
            continue
        if name.lower().endswith(CAPTION_EXTENSIONS):
            continue  # a sidecar (read with its image) or collection metadata such as DEMO_TRUTH.json
        try:
            data = read_inside(root, rel, options.max_image_bytes, reasons.TOO_LARGE)
        except Invalid as invalid:
            yield _refused(key, invalid.reason, invalid.detail)
            continue
        except OSError as error:
            yield _refused(key, reasons.UNDECODABLE, f"cannot read: {error.strerror or error}")
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
                caption = _caption_from(
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


def _unsafe(name: str) -> bool:
    """Absolute, drive-qualified or parent-relative member names could land outside any folder."""
    if not name or name.startswith(("/", "\\")):
        return True
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return ".." in parts or (len(parts[0]) >= 2 and parts[0][1] == ":")


def _sample_key(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), (dot + extension).lower()


def _shard_file(root: Path, rel: str) -> tuple[Path, str]:
    """The file of a tar/parquet shard and the name its records' keys start with."""
    if rel == "":
        return root, root.name
    return root / rel, rel


def _webdataset(root: Path, rel: str, options: IngestOptions) -> Iterator[Record]:
    shard, shard_name = _shard_file(root, rel)
    shard_name = shown(shard_name)
    members = 0
    try:
        tar = tarfile.open(shard, "r")  # noqa: SIM115 - closed by the `with tar` below
    except (tarfile.TarError, OSError, EOFError, ValueError) as error:
        yield _refused(shard_name, reasons.CORRUPT_SHARD, f"cannot open the tar shard: {error}")
        return
    with tar:
        pending: dict[str, dict[str, tuple[bytes, str]]] = {}
        order: list[str] = []
        seen: dict[str, int] = {}  # member name -> how many times met, for duplicates
        try:
            for member in tar:
                members += 1
                if member.isdir():
                    continue
                name = shown(member.name)
                source = f"{shard_name}/{name}"
                if _unsafe(member.name) or not member.isfile():
                    kind = (
                        "absolute or parent-relative path"
                        if _unsafe(member.name)
                        else f"{'link' if member.issym() or member.islnk() else 'special'} member"
                    )
                    yield _refused(source, reasons.UNSAFE_PATH, f"refused {kind}: {name!r}")
                    continue
                key, extension = _sample_key(name)
                if key in pending and extension in pending[key]:
                    seen[name] = seen.get(name, 1) + 1
                    yield _refused(
                        f"{source}#{seen[name]}",
                        reasons.DUPLICATE_MEMBER,
                        f"member {name!r} appears {seen[name]} times in the shard; only the first "
                        "is read",
                    )
                    continue
                if extension not in CAPTION_EXTENSIONS and member.size > options.max_image_bytes:
                    yield _refused(
                        source,
                        reasons.TOO_LARGE,
                        f"member {name!r} is {member.size} bytes, over the limit of "
                        f"{options.max_image_bytes} (max_image_bytes); not read",
                    )
                    continue
                if key not in pending:
                    order.append(key)
                    pending[key] = {}
                if extension in CAPTION_EXTENSIONS:
                    limit = (
                        JSON_SIDECAR_MAX
                        if extension.endswith(".json")
                        else options.max_caption_bytes
                    )
                    if member.size > limit:
                        pending[key][extension] = (
                            b"",
                            f"{member.size} bytes, over the limit of {limit} (max_caption_bytes)",
                        )
                        continue
                pending[key][extension] = (tar.extractfile(member).read(), "")
                # webdataset shards keep a sample's files together: flush finished keys early
                while len(order) > 1:
                    yield from _tar_sample(shard_name, order[0], pending.pop(order.pop(0)), options)
            trailing = _trailing_garbage(shard, tar.offset)
        except (tarfile.TarError, OSError, EOFError, ValueError) as error:
            for key in order:
                yield from _tar_sample(shard_name, key, pending.pop(key), options)
            yield _refused(
                shard_name,
                reasons.CORRUPT_SHARD,
                f"the tar shard breaks after {members} member(s): {type(error).__name__}: {error}",
            )
            return
        for key in order:
            yield from _tar_sample(shard_name, key, pending.pop(key), options)
        if trailing:
            yield _refused(
                shard_name,
                reasons.CORRUPT_SHARD,
                f"{trailing} byte(s) after member {members} are not tar headers; the rest of the shard is unreadable",
            )


def _trailing_garbage(shard: Path, offset: int) -> int:
    """Non-zero bytes after where tarfile stopped reading (it stops silently at a bad header)."""
    if not shard.is_file():
        return 0
    size = shard.stat().st_size
    with open(shard, "rb") as handle:
        handle.seek(offset)
        while chunk := handle.read(1 << 16):
            if chunk.strip(b"\0"):
                return size - offset
    return 0


def _tar_sample(
    shard_name: str, key: str, files: dict[str, tuple[bytes, str]], options: IngestOptions
) -> Iterator[Record]:
    caption, refusal, note = "", None, ""
    for extension, (payload, too_big) in files.items():
        if extension not in CAPTION_EXTENSIONS or caption:
            continue
        try:
            if too_big:
                raise Invalid(reasons.BAD_CAPTION, f"{key}{extension} is {too_big}")
            caption = _caption_from(f"{key}{extension}", payload, options.max_caption_bytes)
        except NotText as invalid:
            note = dropped(f"caption {key}{extension}", invalid)
        except Invalid as invalid:
            refusal = (invalid.reason, f"caption {key}{extension}: {invalid.detail}")
            break
    for extension, (payload, _) in sorted(files.items()):
        if extension not in CAPTION_EXTENSIONS:
            if refusal is not None:
                yield Record(f"{shard_name}/{key}{extension}", payload, "", *refusal)
            else:
                yield Record(f"{shard_name}/{key}{extension}", payload, caption, caption_note=note)


# -- tables: parquet, saved datasets, stage outputs -----------------------------------------------


def _pick(names: list[str], candidates: tuple[str, ...]) -> str | None:
    lowered = {n.lower(): n for n in names}
    return next((lowered[c] for c in candidates if c in lowered), None)


def _cell_record(key: str, image, caption, root: Path, options: IngestOptions) -> Record:
    """A record from one table row's image and caption cells; bad cells become its refusal."""
    try:
        data = image_cell(image, root if options.allow_path_cells else None)
    except Invalid as invalid:
        return _refused(key, invalid.reason, invalid.detail)
    if len(data) > options.max_image_bytes:
        return _refused(
            key,
            reasons.TOO_LARGE,
            f"image cell is {len(data)} bytes, over the limit of {options.max_image_bytes} "
            "(max_image_bytes)",
        )
    try:
        text = caption_cell(caption, options.max_caption_bytes)
    except NotText as invalid:
        return Record(key, data, "", caption_note=dropped("caption cell", invalid))
    except Invalid as invalid:
        return Record(key, data, "", invalid.reason, invalid.detail)
    return Record(key, data, text)


def _batch_rows(parquet) -> int:
    """Rows per record batch so that a batch holds about BATCH_BYTES, whatever the image size."""
    meta = parquet.metadata
    stored = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    per_row = stored / max(1, meta.num_rows)
    return int(min(256, max(1, BATCH_BYTES // max(1.0, per_row))))


def _parquet(root: Path, rel: str, options: IngestOptions) -> Iterator[Record]:
    import pyarrow.parquet as pq

    file, name = _shard_file(root, rel)
    name = shown(name)
    folder = root if root.is_dir() else root.parent  # what path cells must stay inside
    rows = 0
    try:
        parquet = pq.ParquetFile(file)
        columns = parquet.schema_arrow.names
        image_column = _pick(columns, IMAGE_COLUMNS)
        if image_column is None:
            raise ValueError(
                f"no image column; expected one of {', '.join(IMAGE_COLUMNS)} (found {', '.join(columns)})"
            )
        caption_column, key_column = _pick(columns, CAPTION_COLUMNS), _pick(columns, KEY_COLUMNS)
        wanted = [c for c in (image_column, caption_column, key_column) if c]
        batches = parquet.iter_batches(
            batch_size=_batch_rows(parquet), columns=list(dict.fromkeys(wanted))
        )
        for batch in batches:
            images = batch.column(image_column)
            keys = batch.column(key_column).to_pylist() if key_column else None
            captions = batch.column(caption_column).to_pylist() if caption_column else None
            for i in range(batch.num_rows):  # one image's bytes become Python at a time
                key = keys[i] if keys else None
                caption = captions[i] if captions else None
                label = shown(str(key)) if key is not None else str(rows)
                yield _cell_record(f"{name}:{label}", images[i].as_py(), caption, folder, options)
                rows += 1
            del images, keys, captions
    except Exception as error:  # pyarrow raises many types for a broken file
        yield _refused(
            name,
            reasons.CORRUPT_SHARD,
            f"the parquet file cannot be read after {rows} row(s): {type(error).__name__}: {error}",
        )


def _load_table(path: Path, kind: str):
    import datasets

    if kind == "store":
        from curate.runtime.store import load_samples

        return load_samples(path)
    from curate.runtime.store import load_saved

    loaded = load_saved(path)
    if isinstance(loaded, datasets.DatasetDict):
        return datasets.concatenate_datasets([loaded[split] for split in sorted(loaded)])
    return loaded


def _table(root: Path, shard: Shard, options: IngestOptions) -> Iterator[Record]:
    import datasets

    folder = root / shard.path if shard.path else root
    label = shown(shard.path) if shard.path else ""
    if shard.rows is None:  # planning could not open it
        yield _refused(
            label or shown(root.name),
            reasons.CORRUPT_SHARD,
            f"cannot open the saved dataset: {shard.files[0]}",
        )
        return
    dataset = _load_table(folder, shard.kind)
    columns = dataset.column_names
    image_column = _pick(columns, IMAGE_COLUMNS)
    if image_column is None:
        yield _refused(
            label or shown(root.name),
            reasons.CORRUPT_SHARD,
            f"no image column; expected one of {', '.join(IMAGE_COLUMNS)} (found {', '.join(columns)})",
        )
        return
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    caption_column = _pick(columns, CAPTION_COLUMNS)
    key_column = "source" if "source" in columns else _pick(columns, KEY_COLUMNS)
    start, stop = shard.rows
    for row, item in enumerate(dataset.select(range(start, stop)), start):
        key = (
            shown(str(item[key_column]))
            if key_column and item[key_column] is not None
            else str(row)
        )
        key = f"{label}:{key}" if label else key
        caption = item[caption_column] if caption_column else None
        yield _cell_record(key, item[image_column], caption, folder, options)
