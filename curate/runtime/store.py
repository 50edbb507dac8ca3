"""The on-disk format of a stage output (docs/stage-contract.md).

A stage reads one directory and writes another:

    OUT/
      manifest.json   stage, parameters, input fingerprint, counts, versions, wall time
      samples/        the sample table: a `datasets` dataset keyed by `id` (sha256 of image bytes)
      rejected/       one row per rejected id: id, stage, reason, score, threshold, detail
      ...             stage extras (report.md, contact sheets, shards)

Output is assembled in a hidden sibling directory and renamed into place only after the
manifest is written, so a killed stage never leaves something that looks finished. Work that
should survive a kill (chunks of scored or captioned rows) goes to a `WorkLog`, keyed by the
stage, its parameters and its input, and is reused by the next run with the same key.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import platform
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from curate.runtime.redact import strip_credentials

MANIFEST = "manifest.json"
SAMPLES = "samples"
REJECTED = "rejected"

VERSIONED_PACKAGES = (
    "t2i-pipeline", "torch", "diffusers", "transformers", "peft", "accelerate", "datasets",
    "faiss-cpu", "prefect", "numpy", "pillow",
)  # fmt: skip

REJECTED_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "stage": datasets.Value("string"),
        "reason": datasets.Value("string"),
        "score": datasets.Value("float64"),
        "threshold": datasets.Value("float64"),
        "detail": datasets.Value("string"),
    }
)


class StoreError(RuntimeError):
    """A directory is not a finished stage output, or cannot become one."""


def sample_id(image_bytes: bytes) -> str:
    """The key of every row in every stage: sha256 of the original image bytes."""
    return hashlib.sha256(image_bytes).hexdigest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def params_hash(parameters: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(parameters).encode()).hexdigest()[:16]


@dataclass
class Rejection:
    id: str
    stage: str
    reason: str
    score: float | None = None
    threshold: float | None = None
    detail: str = ""


@dataclass
class Manifest:
    stage: str
    parameters: dict[str, Any]
    input_fingerprint: str
    counts: dict[str, int] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    wall_time_s: float = 0.0
    created: str = ""
    host: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def matches(self, stage: str, parameters: dict[str, Any], input_fingerprint: str) -> bool:
        return (
            self.stage == stage
            and canonical_json(strip_credentials(self.parameters))
            == canonical_json(strip_credentials(parameters))
            and self.input_fingerprint == input_fingerprint
        )

    @classmethod
    def read(cls, directory: str | os.PathLike) -> Manifest | None:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def write(self, directory: str | os.PathLike) -> None:
        recorded = strip_credentials(asdict(self))  # never write down user:password@ of a URL
        _write_text_atomic(Path(directory) / MANIFEST, json.dumps(recorded, indent=2, default=str))


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def fingerprint(path: str | os.PathLike) -> str:
    """Identify an input cheaply and deterministically.

    A finished stage output is identified by its manifest (which already pins its own input
    and parameters) plus the dataset state; anything else (a raw image folder, tar shards,
    parquet files) by the relative path, size and modification time of every file.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"input {root} does not exist")
    digest = hashlib.sha256()
    manifest = root / MANIFEST if root.is_dir() else None
    if manifest is not None and manifest.is_file():
        digest.update(b"store\0" + manifest.read_bytes())
        for state in sorted(root.glob("*/state.json")):
            digest.update(state.read_bytes())
        return digest.hexdigest()[:32]
    # lstat: a link is fingerprinted as itself, never followed outside the input
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if not p.is_dir())
    for file in files:
        stat = file.lstat()
        rel = file.name if file == root else file.relative_to(root).as_posix()
        line = f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
        digest.update(line.encode("utf-8", "surrogateescape"))  # non-UTF-8 names stay distinct
    return digest.hexdigest()[:32]


def is_done(
    output: str | os.PathLike, stage: str, parameters: dict[str, Any], input_fingerprint: str
) -> bool:
    """True when OUTPUT is a finished output of this stage for these parameters and input."""
    manifest = Manifest.read(output)
    return manifest is not None and manifest.matches(stage, parameters, input_fingerprint)


def require_store(directory: str | os.PathLike) -> Manifest:
    manifest = Manifest.read(directory)
    if manifest is None:
        raise StoreError(
            f"{directory} is not a finished stage output (no {MANIFEST}); "
            "run the previous stage first, or point at its output directory"
        )
    return manifest


def load_samples(directory: str | os.PathLike) -> datasets.Dataset:
    """The sample table of a finished stage output, memory-mapped."""
    require_store(directory)
    return datasets.load_from_disk(str(Path(directory) / SAMPLES))


def load_rows(
    directory: str | os.PathLike, start: int, stop: int, columns: Iterable[str]
) -> list[dict[str, Any]]:
    """Rows [START, STOP) of a finished stage output's sample table, as stored (an image cell is
    `{"bytes", "path"}`, never decoded); only the COLUMNS the table has. What a shard's worker
    reads, so that rows never travel from the driver."""
    rows = load_samples(directory).with_format("arrow")[start:stop]
    return rows.select([c for c in columns if c in rows.column_names]).to_pylist()


def load_rejected(directory: str | os.PathLike) -> datasets.Dataset:
    require_store(directory)
    path = Path(directory) / REJECTED
    if not path.exists():
        return datasets.Dataset.from_list([], features=REJECTED_FEATURES)
    return datasets.load_from_disk(str(path))


def process_umask() -> int:
    """This process's umask, read from /proc where it exists (no window in which it changes)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def share_like_umask(path: str | os.PathLike) -> None:
    """Give PATH (a file, or a folder and all it holds) the permissions a plain open() or mkdir()
    would have given it under this process's umask.

    Some writers create owner-only files whatever the umask (safetensors' save_file writes
    0600), so a model or LoRA would be unreadable to a server running as another user. Bits are
    only added, never taken away, and only those the umask allows."""
    root = Path(path)
    mask = process_umask()
    entries = [root, *root.rglob("*")] if root.is_dir() else [root]
    for entry in entries:
        info = entry.lstat()
        if stat.S_ISDIR(info.st_mode):
            allowed = 0o777 & ~mask
        elif stat.S_ISREG(info.st_mode):
            allowed = 0o666 & ~mask
        else:  # links keep their target's mode; sockets and pipes are not ours to share
            continue
        mode = stat.S_IMODE(info.st_mode)
        if mode | allowed != mode:
            os.chmod(entry, mode | allowed)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cleanup_stale(output: Path) -> None:
    """Remove temporary siblings left by killed runs of a stage writing OUTPUT."""
    for stale in output.parent.glob(f".{output.name}.tmp-*"):
        pid = stale.name.rsplit("-", 2)[-2] if stale.name.count("-") >= 2 else ""
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
        shutil.rmtree(stale, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StageWriter:
    """Assemble a stage output in a temporary sibling, then rename it into place.

    with StageWriter(out, "curate", params, fingerprint(inp)) as w:
        w.write_samples(rows, features)      # rows: dicts, streamed
        w.write_rejected(rejections)
        (w.path / "report.md").write_text(...)
        w.counts.update(kept=..., rejected=...)
    # on clean exit: manifest written, directory renamed to `out`
    # on exception: temporary directory removed, `out` untouched
    """

    tables = True  # False: a stage whose output is files, not a sample table (sample)

    def __init__(
        self,
        output: str | os.PathLike,
        stage: str,
        parameters: dict[str, Any],
        input_fingerprint: str,
    ) -> None:
        self.output = Path(output).resolve()
        self.stage = stage
        self.parameters = parameters
        self.input_fingerprint = input_fingerprint
        self.counts: dict[str, int] = {}
        self.extra: dict[str, Any] = {}
        self.path = (
            self.output.parent / f".{self.output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        self._start = time.monotonic()

    def __enter__(self) -> StageWriter:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        _cleanup_stale(self.output)
        self.path.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        try:
            self.commit()
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise

    def write_samples(
        self,
        rows: Iterable[dict[str, Any]],
        features: datasets.Features | None = None,
        max_shard_size: str = "500MB",
    ) -> int:
        """Stream rows into the sample table; memory stays flat in the number of rows."""
        return self._write_table(SAMPLES, rows, features, max_shard_size)

    def write_rejected(self, rejections: Iterable[Rejection | dict[str, Any]]) -> int:
        rows = (asdict(r) if isinstance(r, Rejection) else r for r in rejections)
        return self._write_table(REJECTED, rows, REJECTED_FEATURES, "500MB")

    def _write_table(self, name, rows, features, max_shard_size) -> int:
        rows = iter(rows)
        first = next(rows, None)
        if first is None:
            empty = {column: [] for column in (features or {"id": None})}
            dataset = datasets.Dataset.from_dict(empty, features=features)
            dataset.save_to_disk(str(self.path / name), num_shards=1)
            del dataset
        elif features is None:
            dataset = datasets.Dataset.from_list([first, *rows])
            dataset.save_to_disk(str(self.path / name), max_shard_size=max_shard_size)
            del dataset
        else:
            _stream_table(
                self.path / name, itertools.chain([first], rows), features, max_shard_size
            )
        return self._count(name)

    def _count(self, name: str) -> int:
        return datasets.load_from_disk(str(self.path / name)).num_rows

    def ensure_tables(self) -> None:
        """Empty sample and rejected tables where the stage wrote none."""
        if not (self.path / SAMPLES).exists():
            self.write_samples([], datasets.Features({"id": datasets.Value("string")}))
        if not (self.path / REJECTED).exists():
            self.write_rejected([])

    def commit(self) -> Path:
        if self.tables:
            self.ensure_tables()
        manifest = Manifest(
            stage=self.stage,
            parameters=self.parameters,
            input_fingerprint=self.input_fingerprint,
            counts=self.counts,
            versions=library_versions(),
            wall_time_s=round(time.monotonic() - self._start, 3),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            host=socket.gethostname(),
            extra=self.extra,
        )
        manifest.write(self.path)
        share_like_umask(self.path)
        retired = None
        if self.output.exists():
            retired = (
                self.output.parent
                / f".{self.output.name}.tmp-{os.getpid()}-old{uuid.uuid4().hex[:8]}"
            )
            os.replace(self.output, retired)
        os.replace(self.path, self.output)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
        return self.output


def _stream_table(
    directory: Path,
    rows: Iterator[dict[str, Any]],
    features: datasets.Features,
    max_shard_size: str,
) -> None:
    """Write rows into `Dataset.save_to_disk`'s layout (arrow shards, state.json, dataset_info.json)
    as they come, a small batch at a time. Nothing is written twice or read back, so neither the
    heap nor mapped file pages grow with the table (a cache-then-save_to_disk copy maps it all)."""
    from datasets.arrow_writer import ArrowWriter
    from datasets.utils.py_utils import convert_file_size_to_int

    limit = convert_file_size_to_int(max_shard_size)
    directory.mkdir(parents=True)
    parts: list[Path] = []
    writer = None
    for row in rows:
        if writer is None:
            parts.append(directory / f".part-{len(parts):05d}.arrow")
            writer = ArrowWriter(features=features, path=str(parts[-1]), writer_batch_size=64)
        writer.write(features.encode_example(row))
        if parts[-1].stat().st_size >= limit:
            writer.finalize()
            writer.close()
            writer = None
    if writer is not None:
        writer.finalize()
        writer.close()
    names = [f"data-{i:05d}-of-{len(parts):05d}.arrow" for i in range(len(parts))]
    for part, final in zip(parts, names, strict=True):
        os.replace(part, directory / final)
    state = {
        "_data_files": [{"filename": n} for n in names],
        "_fingerprint": uuid.uuid4().hex[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (directory / "state.json").write_text(json.dumps(state, indent=2))
    datasets.DatasetInfo(features=features).write_to_directory(str(directory))


class WorkLog:
    """Chunks of finished work that survive a killed run.

    Each chunk is a parquet file written atomically, so a chunk is either complete or absent.
    The log lives beside the output, keyed by `key` (stage, parameters, input); a run with a
    different key never sees another key's chunks. `clear()` after the output is committed.
    """

    def __init__(self, output: str | os.PathLike, key: str) -> None:
        output = Path(output).resolve()
        self.root = output.parent / f".{output.name}.work"
        self.path = self.root / key
        self.path.mkdir(parents=True, exist_ok=True)

    def has(self, name: str) -> bool:
        return (self.path / f"{name}.parquet").is_file()

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.path.glob("*.parquet"))

    def write(self, name: str, table: pa.Table | list[dict[str, Any]]) -> None:
        if not isinstance(table, pa.Table):
            table = pa.Table.from_pylist(table)
        tmp = self.path / f".{name}.{uuid.uuid4().hex}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.path / f"{name}.parquet")

    def read(self, name: str, columns: list[str] | None = None) -> pa.Table:
        """Chunk NAME, or only its COLUMNS (the others are not read from disk)."""
        return pq.read_table(self.path / f"{name}.parquet", columns=columns)

    def rows(self) -> Iterator[dict[str, Any]]:
        for name in self.names():
            yield from self.read(name).to_pylist()

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
