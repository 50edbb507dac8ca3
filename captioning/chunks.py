"""What a caption worker does with its chunk of rows: read and decode each image, ask the backend, clean the answer."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from captioning.backends import make_backend
from captioning.cleaning import clean_caption, make_budget
from captioning.config import CaptionConfig
from captioning.prompts import render
from captioning.protocol import Answer, Backend, Request
from curate.runtime import reasons
from curate.runtime.cells import image_cell
from curate.runtime.decode import Invalid, decode_image, open_image, plain_format
from curate.runtime.store import (
    load_rows,
)

CHUNK_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("caption_synthetic", pa.string()),
        ("captioner", pa.string()),
        ("error", pa.string()),
        ("truncated", pa.bool_()),
        ("raw", pa.string()),
    ]
)


class ChunkWorker:
    """A worker's state: captions the rows of a chunk that still need it; the backend loads on first need."""

    def __init__(self, config: CaptionConfig, template: str, captioner: str) -> None:
        self.config, self.template, self.captioner = config, template, captioner
        self.budget = make_budget(config.max_caption_tokens, config.budget_tokenizer)
        self.backend: Backend | None = None

    def chunk(
        self, rows: list[dict[str, Any]], previous: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """A result per row (same order) and how many were resumed, captioned, passed through."""
        counts = {"resumed": 0, "captioned": 0, "passthrough": 0}
        done = {r["id"]: r for r in previous if r["error"] is None}
        results: list[dict[str, Any] | None] = []
        pending: list[int] = []
        for row in rows:
            if row["id"] in done:
                results.append(done[row["id"]])
                counts["resumed"] += 1
            elif row.get("captioner") == self.captioner and row.get("caption_synthetic"):
                results.append(
                    _result(row["id"], caption=row["caption_synthetic"], captioner=self.captioner)
                )
                counts["passthrough"] += 1
            else:
                pending.append(len(results))
                results.append(None)
        for group in _pixel_groups(rows, pending, self.config.chunk_pixels):
            requests: list[tuple[int, Request]] = []
            for index in group:
                try:
                    requests.append((index, self._request(rows[index])))
                except Invalid as invalid:  # recorded as the row's failure, with its reason
                    results[index] = _result(
                        rows[index]["id"],
                        error=f"undecodable image: {invalid.reason}: {invalid.detail}",
                    )
                except Exception as error:  # recorded as the row's failure
                    results[index] = _result(
                        rows[index]["id"],
                        error=f"undecodable image: {type(error).__name__}: {error}",
                    )
            if not requests:
                continue
            if self.backend is None:
                self.backend = make_backend(self.config)
            answers = self.backend.caption([r for _, r in requests], lambda n: None)
            for (index, request), answer in zip(requests, answers, strict=True):
                results[index] = self._finish(request.key, answer)
            counts["captioned"] += len(requests)
        return results, counts  # type: ignore[return-value]

    def _request(self, row: dict[str, Any]) -> Request:
        """The row's image, decoded under the pixel cap; a path cell is never read."""
        data = image_cell(row["image"])
        if not data:
            raise Invalid(reasons.ZERO_BYTE, "the row has no image bytes")
        image = decode_image(data)
        return Request(
            key=row["id"],
            image=image,
            prompt=render(self.template, row.get("caption")),
            source_bytes=data,
            source_format=plain_format(data),
        )

    def _finish(self, key: str, answer: Answer) -> dict[str, Any]:
        if answer.error is not None or answer.text is None:
            return _result(key, error=answer.error or "no answer")
        cleaned = clean_caption(answer.text)
        if not cleaned:
            return _result(
                key,
                error=f"empty caption after cleaning (raw answer {answer.text[:200]!r})",
                raw=answer.text,
            )
        caption, truncated = self.budget.fit(cleaned)
        return _result(
            key, caption=caption, captioner=self.captioner, truncated=truncated, raw=answer.text
        )

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()


def build_chunk_worker(spec: tuple[CaptionConfig, str, str]) -> ChunkWorker:
    return ChunkWorker(*spec)


@dataclass(frozen=True)
class ChunkTask:
    """A chunk as a worker receives it: a row range of the input store, which the worker reads
    itself (no image travels from the driver), and the range's earlier results."""

    store: str  # the input store, as an absolute path every worker can open
    start: int
    stop: int
    columns: tuple[str, ...]
    previous: list[dict[str, Any]]


def caption_chunk(
    worker: ChunkWorker, task: ChunkTask
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Caption's per-shard function: a row range -> (a result per row, counts)."""
    rows = load_rows(task.store, task.start, task.stop, task.columns)
    return worker.chunk(rows, task.previous)


def _declared_pixels(row: dict[str, Any]) -> int:
    """Pixels the row's image header declares (nothing decoded); 0 when it will fail to decode."""
    try:
        image = open_image(image_cell(row["image"]))
    except Exception:  # fails again, with its reason, when the row is decoded
        return 0
    return image.width * image.height


def _pixel_groups(
    rows: list[dict[str, Any]], indices: list[int], limit: int
) -> Iterator[list[int]]:
    """INDICES in order, cut so that no group decodes more than LIMIT pixels (a single image may)."""
    group: list[int] = []
    pixels = 0
    for index in indices:
        size = _declared_pixels(rows[index])
        if group and pixels + size > limit:
            yield group
            group, pixels = [], 0
        group.append(index)
        pixels += size
    if group:
        yield group


def _result(
    key: str,
    caption: str | None = None,
    captioner: str | None = None,
    error: str | None = None,
    truncated: bool = False,
    raw: str | None = None,
) -> dict[str, Any]:
    return {
        "id": key,
        "caption_synthetic": caption,
        "captioner": captioner,
        "error": error,
        "truncated": truncated,
        "raw": raw,
    }
