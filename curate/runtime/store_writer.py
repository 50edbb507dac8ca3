"""Writing a stage output: the assembling writer renamed into place at commit, and the work log.

`StageWriter` assembles OUT in a hidden sibling directory and renames it into place only after
the manifest is written, so a killed stage never leaves something that looks finished. Work that
should survive a kill (chunks of scored or captioned rows) goes to a `WorkLog`, keyed by the
stage, its parameters and its input, and is reused by the next run with the same key. Written
files follow the process umask (`share_like_umask`).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from curate.runtime.store import (
    REJECTED,
    REJECTED_FEATURES,
    SAMPLES,
    Manifest,
    Rejection,
    library_versions,
)


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
