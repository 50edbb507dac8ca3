"""Curate's unit of work: one shard of the ingest plan, read, chunked and scored by a worker.

The driver plans the input (`curate.ingest.plan`: names of files, tars, row ranges; no image is
read) and sends each worker a `ShardTask`: the input root, the shard and the work log. The worker
streams the shard's records, gives each its id (sha256 of its bytes), cuts them into chunks of
at most `chunk_size` images and `chunk_pixels` declared pixels, scores each chunk and writes its
table into the work log under a name that sorts in input order (shard, then chunk). It returns
only the chunk names and row counts, so neither image bytes nor scores travel between driver
and workers, and a worker holds one chunk of images at a time, whatever the shard's size.

A chunk's table is a pure function of its records and the configuration and is written
atomically, so a shard rerun (a killed run, a lost worker) reuses its finished chunks, rewrites
the rest to the same bytes, and ends with the same tables. The driver records a shard as done
only when its task returned (`Ledger`); exact byte copies across shards are settled on the
driver afterwards (curate/stage.py), copies inside one shard already here, so they are never scored.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image

from curate import ingest
from curate.config import CurateConfig
from curate.records import IngestOptions, Record, Shard
from curate.runtime import reasons
from curate.runtime.store import sample_id
from curate.runtime.store_writer import WorkLog

LEDGER = "shards.jsonl"  # in the work log's folder: one line per finished shard


@dataclass(frozen=True)
class ShardTask:
    """What a worker is sent for one shard: where to read it and where to write its chunks."""

    root: str  # the input, as an absolute path every worker can open
    index: int  # the shard's place in the plan: its chunks are named after it
    shard: Shard
    work: WorkLog


@dataclass(frozen=True)
class ChunkDone:
    name: str
    rows: int
    finished: float | None  # time.time() when its table was written; None when reused


def chunk_name(shard: int, chunk: int) -> str:
    """Work-log names sort in input order: by shard, then by chunk inside it."""
    return f"chunk-{shard:08d}-{chunk:06d}"


def ingest_options(config: CurateConfig) -> IngestOptions:
    return IngestOptions(
        config.max_caption_bytes, config.allow_path_cells, max_image_bytes=config.max_image_bytes
    )


def files_per_shard(config: CurateConfig) -> int:
    """Loose files per shard: about one chunk of images with their caption sidecars."""
    return 2 * config.chunk_size


def declared_pixels(data: bytes, max_pixels: int) -> int:
    """Pixels the image header declares (no decode); 0 for what will be rejected before decoding."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = image.width * image.height
    except Exception:  # not an image: rejected by validation, never decoded
        return 0
    return pixels if pixels <= max_pixels else 0


def _item(record: Record, seen: dict[str, str]) -> dict[str, Any]:
    """A record as a chunk item with its id; a repeat of earlier bytes in this shard is refused."""
    item = {
        "key": record.key,
        "data": record.data,
        "caption": record.caption,
        "refused": record.refused,
        "detail": record.detail,
        "caption_note": record.caption_note,
        "id": sample_id(record.data),
        "exact_check": not record.refused and len(record.data) > 0,
    }
    if item["exact_check"]:
        original = seen.setdefault(item["id"], record.key)
        if original != record.key:
            item.update(
                refused=reasons.EXACT_DUPLICATE,
                detail=f"dup_of={item['id']} original={original}",
            )
    return item


def chunks(records: Iterable[Record], config: CurateConfig) -> Iterator[list[dict[str, Any]]]:
    """Chunks in input order, each closed at `chunk_size` images or `chunk_pixels` declared pixels."""
    seen: dict[str, str] = {}
    chunk: list[dict[str, Any]] = []
    pixels = 0
    for record in records:
        item = _item(record, seen)
        size = 0 if item["refused"] else declared_pixels(record.data, config.max_pixels)
        if chunk and pixels + size > config.chunk_pixels:
            yield chunk
            chunk, pixels = [], 0
        chunk.append(item)
        pixels += size
        if len(chunk) == config.chunk_size:
            yield chunk
            chunk, pixels = [], 0
    if chunk:
        yield chunk


def score_shard(scorers: Any, task: ShardTask) -> list[ChunkDone]:
    """Curate's per-shard function: read, chunk and score one shard into the work log."""
    from curate.workers import score_chunk

    config = scorers.resolved.config
    records = ingest.read_shard(task.root, task.shard, ingest_options(config))
    done = []
    for index, chunk in enumerate(chunks(records, config)):
        name = chunk_name(task.index, index)
        if task.work.has(name):  # finished by an earlier attempt at this shard
            done.append(ChunkDone(name, len(chunk), None))
            continue
        task.work.write(name, score_chunk(scorers, chunk))
        done.append(ChunkDone(name, len(chunk), time.time()))
    return done


class Ledger:
    """The shards whose task returned, kept in the work log (appended by the driver alone).

    A line is written after the shard's chunks are on disk, so a listed shard is complete; a
    line cut short by a kill is ignored and its shard simply runs again.
    """

    def __init__(self, work: WorkLog) -> None:
        self.path = work.path / LEDGER
        self.done: dict[int, list[tuple[str, int]]] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                self._load(line, work)

    def _load(self, line: str, work: WorkLog) -> None:
        try:
            entry = json.loads(line)
            chunks = [(str(name), int(rows)) for name, rows in entry["chunks"]]
            index = int(entry["shard"])
        except (ValueError, KeyError, TypeError):
            return
        if all(work.has(name) for name, _ in chunks):
            self.done[index] = chunks

    def add(self, index: int, chunks: list[ChunkDone]) -> None:
        self.done[index] = [(c.name, c.rows) for c in chunks]
        line = json.dumps({"shard": index, "chunks": self.done[index]})
        with open(self.path, "a") as handle:
            handle.write(line + "\n")

    def rows(self, index: int | None = None) -> int:
        """Records in shard INDEX, or in every finished shard."""
        shards = self.done.values() if index is None else [self.done[index]]
        return sum(rows for chunks in shards for _, rows in chunks)
