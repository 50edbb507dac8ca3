"""Read raw image-text collections as a stream of records, in a deterministic order.

Layouts: an image folder with sidecar captions (`x.jpg` + `x.txt` or `x.json`), webdataset tar
shards, parquet files with image bytes, a saved `datasets` dataset, or a finished stage output.
Nothing is extracted to disk: tar members are read in memory, and members whose names are
absolute or climb out with `..` are refused (recorded as `unsafe_path`), never opened.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from curate import reasons
from curate.store import MANIFEST, SAMPLES

CAPTION_EXTENSIONS = (".txt", ".json", ".caption")
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img", "bytes")
CAPTION_COLUMNS = ("caption", "text", "txt", "prompt")
KEY_COLUMNS = ("key", "__key__", "source", "name", "id")
LAYOUTS = ("folder", "webdataset", "parquet", "datasets", "store")


@dataclass
class Record:
    key: str  # input-relative source: a path, "shard.tar/member" or "file.parquet:key"
    data: bytes
    caption: str
    refused: str = ""  # a rejection reason decided at ingest time (e.g. unsafe_path)
    detail: str = ""


def detect_layout(root: Path) -> str:
    if root.is_file():
        if root.suffix == ".tar":
            return "webdataset"
        if root.suffix == ".parquet":
            return "parquet"
        raise ValueError(
            f"input file {root} is neither a .tar shard nor a .parquet file; pass a folder of them"
        )
    if (root / MANIFEST).is_file() and (root / SAMPLES).is_dir():
        return "store"
    if (root / "dataset_info.json").is_file() or (root / "state.json").is_file():
        return "datasets"
    if any(root.rglob("*.tar")):
        return "webdataset"
    if any(root.rglob("*.parquet")):
        return "parquet"
    return "folder"


def read_records(root: str | Path) -> Iterator[Record]:
    """Every sample of the input at ROOT, in a stable order (sorted files, stored row order)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"input {root} does not exist")
    layout = detect_layout(root)
    reader = {
        "folder": _folder,
        "webdataset": _webdataset,
        "parquet": _parquet,
        "datasets": _datasets,
        "store": _store,
    }[layout]
    yield from reader(root)


def _caption_from(name: str, payload: bytes) -> str:
    text = payload.decode("utf-8", errors="replace")
    if name.endswith(".json"):
        try:
            meta = json.loads(text)
        except json.JSONDecodeError:
            return ""
        if isinstance(meta, dict):
            for column in CAPTION_COLUMNS:
                if isinstance(meta.get(column), str):
                    return meta[column].strip()
        return ""
    return text.strip()


def _folder(root: Path) -> Iterator[Record]:
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    stems: dict[Path, list[Path]] = {}
    for path in files:
        stems.setdefault(path.with_suffix(""), []).append(path)
    for path in files:
        if path.suffix.lower() in CAPTION_EXTENSIONS:
            continue  # a sidecar (read with its image) or collection metadata such as DEMO_TRUTH.json
        caption = ""
        for sibling in stems[path.with_suffix("")]:
            if sibling.suffix.lower() in CAPTION_EXTENSIONS:
                caption = caption or _caption_from(sibling.name, sibling.read_bytes())
        yield Record(path.relative_to(root).as_posix(), path.read_bytes(), caption)


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


def _webdataset(root: Path) -> Iterator[Record]:
    shards = [root] if root.is_file() else sorted(root.rglob("*.tar"))
    base = root.parent if root.is_file() else root
    for shard in shards:
        shard_name = shard.relative_to(base).as_posix()
        with tarfile.open(shard, "r") as tar:
            pending: dict[str, dict[str, bytes]] = {}
            order: list[str] = []
            for member in tar:
                if member.isdir():
                    continue
                source = f"{shard_name}/{member.name}"
                if _unsafe(member.name) or not member.isfile():
                    kind = (
                        "absolute or parent-relative path"
                        if _unsafe(member.name)
                        else f"{'link' if member.issym() or member.islnk() else 'special'} member"
                    )
                    payload = (
                        tar.extractfile(member).read()
                        if member.isfile()
                        else (member.linkname or member.name).encode()
                    )
                    yield Record(
                        source, payload, "", reasons.UNSAFE_PATH, f"refused {kind}: {member.name!r}"
                    )
                    continue
                key, extension = _sample_key(member.name)
                if key not in pending:
                    order.append(key)
                    pending[key] = {}
                pending[key][extension] = tar.extractfile(member).read()
                # webdataset shards keep a sample's files together: flush finished keys early
                while len(order) > 1:
                    yield from _tar_sample(shard_name, order[0], pending.pop(order.pop(0)))
            for key in order:
                yield from _tar_sample(shard_name, key, pending.pop(key))


def _tar_sample(shard_name: str, key: str, files: dict[str, bytes]) -> Iterator[Record]:
    caption = ""
    for extension, payload in files.items():
        if extension in CAPTION_EXTENSIONS:
            caption = caption or _caption_from(extension, payload)
    for extension, payload in sorted(files.items()):
        if extension not in CAPTION_EXTENSIONS:
            yield Record(f"{shard_name}/{key}{extension}", payload, caption)


def _pick(names: list[str], candidates: tuple[str, ...]) -> str | None:
    lowered = {n.lower(): n for n in names}
    return next((lowered[c] for c in candidates if c in lowered), None)


def _image_bytes(value) -> bytes:
    if value is None:
        return b""
    if isinstance(value, dict):  # datasets.Image storage: {"bytes": ..., "path": ...}
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            return Path(value["path"]).read_bytes()
        return b""
    return bytes(value)


def _parquet(root: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    files = [root] if root.is_file() else sorted(root.rglob("*.parquet"))
    base = root.parent if root.is_file() else root
    for file in files:
        name = file.relative_to(base).as_posix()
        parquet = pq.ParquetFile(file)
        columns = parquet.schema_arrow.names
        image_column = _pick(columns, IMAGE_COLUMNS)
        if image_column is None:
            raise ValueError(
                f"{file} has no image column; expected one of {', '.join(IMAGE_COLUMNS)} (found {', '.join(columns)})"
            )
        caption_column, key_column = _pick(columns, CAPTION_COLUMNS), _pick(columns, KEY_COLUMNS)
        row = 0
        for batch in parquet.iter_batches(batch_size=256):
            table = batch.to_pydict()
            for i, value in enumerate(table[image_column]):
                key = table[key_column][i] if key_column else None
                caption = table[caption_column][i] if caption_column else ""
                yield Record(
                    f"{name}:{key if key is not None else row}", _image_bytes(value), caption or ""
                )
                row += 1


def _dataset_rows(dataset, label: str) -> Iterator[Record]:
    import datasets

    columns = dataset.column_names
    image_column = _pick(columns, IMAGE_COLUMNS)
    if image_column is None:
        raise ValueError(
            f"{label} has no image column; expected one of {', '.join(IMAGE_COLUMNS)} (found {', '.join(columns)})"
        )
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    caption_column = _pick(columns, CAPTION_COLUMNS)
    key_column = "source" if "source" in columns else _pick(columns, KEY_COLUMNS)
    for row, item in enumerate(dataset):
        key = item[key_column] if key_column else row
        yield Record(
            f"{key}",
            _image_bytes(item[image_column]),
            (item[caption_column] if caption_column else "") or "",
        )


def _datasets(root: Path) -> Iterator[Record]:
    import datasets

    loaded = datasets.load_from_disk(str(root))
    if isinstance(loaded, datasets.DatasetDict):
        for split in sorted(loaded):
            yield from _dataset_rows(loaded[split], f"{root} split {split}")
    else:
        yield from _dataset_rows(loaded, str(root))


def _store(root: Path) -> Iterator[Record]:
    from curate.store import load_samples

    yield from _dataset_rows(load_samples(root), str(root))
