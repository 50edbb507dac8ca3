"""The curation report: report.md, contact sheets (kept; rejected by reason) and score histograms.

Thumbnails come from the work chunks (160 px, NSFW ones blurred), so the report never decodes
the full images again. Contact sheets hold at most `contact_sheet_max` images each, taken in id
order so that they are the same on every run.
"""

from __future__ import annotations

import heapq
import io
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from curate.runtime.markdown import escape

CELL = 170


def contact_sheet(thumbs: list[tuple[bytes, str]], path: Path, columns: int = 8) -> None:
    """A grid of thumbnails, each with a short label under it."""
    rows = max(1, math.ceil(len(thumbs) / columns))
    sheet = Image.new("RGB", (columns * CELL, rows * (CELL + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (data, label) in enumerate(thumbs):
        x, y = (index % columns) * CELL, (index // columns) * (CELL + 14)
        thumb = Image.open(io.BytesIO(data)).convert("RGB")
        sheet.paste(thumb, (x + (CELL - thumb.width) // 2, y + (CELL - thumb.height) // 2))
        draw.text((x + 4, y + CELL), label[:26], fill="black")
    sheet.save(path, "PNG")


def histogram(values: np.ndarray, threshold: float | None, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.2), dpi=100)
    finite = values[np.isfinite(values)]
    if len(finite):
        axis.hist(finite, bins=min(50, max(5, len(finite) // 2)), color="#4c72b0")
    if threshold is not None:
        axis.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold {threshold:g}")
        axis.legend()
    axis.set_title(title)
    axis.set_ylabel("images")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


class _FirstById:
    """The LIMIT thumbnails with the smallest ids seen so far (memory bounded, same on every run)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.heap, self.count = limit, [], 0

    def add(self, sample_id: str, thumb: bytes | None, label: str) -> None:
        self.count += 1
        if thumb is None or self.limit == 0:
            return
        entry = (_Reversed(sample_id), thumb, label)
        if len(self.heap) < self.limit:
            heapq.heappush(self.heap, entry)
        elif sample_id < self.heap[0][0].value:
            heapq.heapreplace(self.heap, entry)

    def items(self) -> list[tuple[str, bytes, str]]:
        return sorted((r.value, t, label) for r, t, label in self.heap)

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0


class _Reversed:
    """Orders strings backwards, so that heapq's min-heap keeps the largest id on top."""

    def __init__(self, value: str) -> None:
        self.value = value

    def __lt__(self, other: _Reversed) -> bool:
        return self.value > other.value


def _label(row: dict[str, Any]) -> str:
    source = (row["source"] or "").rsplit("/", 1)[-1]
    return source


def write_report(
    out: Path, work, removed: dict, resolved, counts: dict[str, int], extra: dict[str, Any]
) -> None:
    config = resolved.config
    limit = config.contact_sheet_max
    kept = _FirstById(limit)
    by_reason: dict[str, _FirstById] = {}
    reason_counts: Counter = Counter()
    nsfw, quality = [], []
    listing: list[str] = []
    dropped: list[str] = []  # kept images whose caption was not text
    for name in work.names():
        for row in (
            work.read(name)
            .select(
                [
                    "id",
                    "status",
                    "reason",
                    "score",
                    "thumb",
                    "source",
                    "nsfw_score",
                    "aesthetic_score",
                    "caption_note",
                ]
            )
            .to_pylist()
        ):
            if row["nsfw_score"] is not None:
                nsfw.append(row["nsfw_score"])
            if row["aesthetic_score"] is not None:
                quality.append(row["aesthetic_score"])
            reason = (
                row["reason"]
                if row["status"] == "rejected"
                else ("near_duplicate" if row["id"] in removed else None)
            )
            if reason is None:
                kept.add(row["id"], row["thumb"], _label(row))
                if row["caption_note"] and len(dropped) < 200:
                    dropped.append(
                        f"| {escape(row['source'], 200)} | {escape(row['caption_note'], 300)} |"
                    )
                continue
            reason_counts[reason] += 1
            if row["thumb"] is not None:
                by_reason.setdefault(reason, _FirstById(limit)).add(
                    row["id"], row["thumb"], _label(row)
                )
            if len(listing) < 200:
                score = f"{row['score']:.4g}" if row["score"] is not None else ""
                extra_detail = (
                    f" dup\\_of {escape(removed[row['id']][0][:12])}"
                    if row["id"] in removed
                    else ""
                )
                listing.append(
                    f"| {escape(row['source'], 200)} | {escape(reason)} | {score} |{extra_detail} |"
                )
    sheets = []
    if limit and kept:
        contact_sheet([(t, label) for _, t, label in kept.items()], out / "contact_kept.png")
        sheets.append(("kept", "contact_kept.png", len(kept)))
    for reason, items in sorted(by_reason.items()):
        if limit:
            contact_sheet(
                [(t, label) for _, t, label in items.items()],
                out / f"contact_rejected_{reason}.png",
            )
            sheets.append((f"rejected: {reason}", f"contact_rejected_{reason}.png", len(items)))
    histogram(
        np.array(nsfw, dtype=float),
        config.nsfw_threshold if config.nsfw_detector != "none" else None,
        f"NSFW score ({config.nsfw_detector})",
        out / "hist_nsfw.png",
    )
    histogram(
        np.array(quality, dtype=float),
        resolved.aesthetic_threshold,
        f"{resolved.aesthetic_kind} score",
        out / "hist_aesthetic.png",
    )

    lines = [
        "# Curation report",
        "",
        f"{counts.get('input', 0)} inputs: {counts.get('kept', 0)} kept, {counts.get('rejected', 0)} rejected.",
        "",
        "| reason | rejected |",
        "| --- | --- |",
        *[f"| {escape(reason)} | {count} |" for reason, count in sorted(reason_counts.items())],
        "",
        "## Settings",
        "",
        f"- NSFW: `{config.nsfw_detector}`, reject at >= {config.nsfw_threshold}",
        f"- Aesthetic: `{resolved.aesthetic_kind}`"
        + (
            f", reject below {resolved.aesthetic_threshold}"
            if resolved.aesthetic_threshold is not None
            else ""
        )
        + (
            " (100 - BRISQUE: a technical-quality score, not an aesthetic one)"
            if resolved.aesthetic_kind == "brisque_quality"
            else ""
        ),
        f"- Near-duplicates: `{config.embedder}` embeddings, cosine >= {resolved.similarity_threshold}, "
        f"{extra.get('clusters', 0)} k-means clusters, top-{config.cluster_assign} assignment; pHash distance <= {config.phash_distance}",
        f"- Pairs found: {extra.get('phash_pairs', 0)} by pHash, {extra.get('embedding_pairs', 0)} by embedding; dedup took {extra.get('dedup_s', 0)} s",
        f"- Scoring: {extra.get('images_per_s')} images/s with {config.workers} workers",
        "",
        "## Figures",
        "",
        "![NSFW scores](hist_nsfw.png)",
        "![aesthetic scores](hist_aesthetic.png)",
        "",
        *[f"- {title} ({count}): ![{title}]({file})" for title, file, count in sheets],
        "",
        "## Rejections" + (" (first 200)" if sum(reason_counts.values()) > 200 else ""),
        "",
        "| source | reason | score | |",
        "| --- | --- | --- | --- |",
        *listing,
        "",
    ]
    if dropped:
        lines += [
            f"## Captions dropped, images kept ({counts.get('captions_dropped', len(dropped))})",
            "",
            "These captions were not text (not UTF-8, or binary); the images are kept with an "
            "empty caption (`caption_note` says why). `t2i caption` gives them a synthetic one.",
            "",
            "| source | note |",
            "| --- | --- |",
            *dropped,
            "",
        ]
    (out / "report.md").write_text("\n".join(lines))
