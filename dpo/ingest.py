"""Preference-pair ingest: Pick-a-Pic v2, a generic (caption, image_w, image_l) layout, or a folder.

Every layout becomes one preference table of `id, caption, image_w, image_l, source` (image bytes
as given; `id` = sha256 of winner bytes, a NUL, then loser bytes). Ties, identical images,
undecodable images and empty captions are rejected with a reason, never dropped silently.

Pick-a-Pic v2 (yuvalkirstain/pickapic_v2): `label_0` = 1 means `jpg_0` won, 0 that `jpg_1` won,
0.5 a tie (about 12% of pairs; Diffusion-DPO drops them).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq

from curate import reasons
from curate.cells import image_cell
from curate.decode import Invalid, decode_image
from curate.store import Manifest, Rejection, StageWriter, fingerprint, is_done, load_samples
from dpo.config import IngestPrefsConfig

STAGE = "prefs"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PREF_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "caption": datasets.Value("string"),
        "image_w": datasets.Value("binary"),
        "image_l": datasets.Value("binary"),
        "source": datasets.Value("string"),
    }
)


def pair_id(winner: bytes, loser: bytes) -> str:
    return hashlib.sha256(winner + b"\0" + loser).hexdigest()


def _bytes(value: Any) -> bytes | None:
    """Image bytes from a raw bytes cell or a `datasets` Image cell ({'bytes', 'path'}).

    Raises `Invalid` for a cell that is not bytes, and for a path cell (never read).
    """
    return image_cell(value) or None


def _decodes(data: bytes | None) -> str:
    """'' when the bytes are a complete image, else why not."""
    if not data:
        return "no image bytes"
    try:
        decode_image(data)  # under the pixel cap
    except Invalid as invalid:
        return f"{invalid.reason}: {invalid.detail}"
    return ""


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a parquet file, a folder of parquet files or a saved `datasets` dataset."""
    if path.is_dir() and (
        (path / "dataset_info.json").is_file() or (path / "state.json").is_file()
    ):
        yield from datasets.load_from_disk(str(path))
        return
    if path.is_dir() and (path / "samples").is_dir() and Manifest.read(path):
        yield from load_samples(path)
        return
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"{path} holds no parquet file or saved dataset; pass Pick-a-Pic v2 parquet, a generic "
            "(caption, image_w, image_l) parquet, or a folder of pair sub-folders with --layout folder"
        )
    for file in files:
        for batch in pq.ParquetFile(file).iter_batches(batch_size=64):
            yield from batch.to_pylist()


def _folder_rows(path: Path) -> Iterator[dict[str, Any]]:
    """One sub-folder per pair: caption.txt, winner.<ext>, loser.<ext>."""
    for pair in sorted(p for p in path.iterdir() if p.is_dir()):
        found = {}
        for role in ("winner", "loser"):
            files = [
                f for f in pair.iterdir() if f.stem == role and f.suffix.lower() in IMAGE_SUFFIXES
            ]
            found[role] = files[0].read_bytes() if files else None
        caption_file = pair / "caption.txt"
        caption = caption_file.read_text().strip() if caption_file.is_file() else ""
        yield {
            "caption": caption,
            "image_w": found["winner"],
            "image_l": found["loser"],
            "_name": pair.name,
        }


def detect_layout(path: Path) -> str:
    if path.is_dir() and any(p.is_dir() and (p / "caption.txt").is_file() for p in path.iterdir()):
        return "folder"
    first = next(_rows(path), None)
    if first is None:
        raise ValueError(f"{path} holds no preference rows")
    if {"jpg_0", "jpg_1", "label_0"} <= first.keys():
        return "pickapic"
    if {"image_w", "image_l"} <= first.keys():
        return "generic"
    raise ValueError(
        f"cannot tell the layout of {path}: its columns {sorted(first)} are neither Pick-a-Pic v2 "
        "(caption, jpg_0, jpg_1, label_0) nor generic (caption, image_w, image_l); pass --layout"
    )


def _oriented(
    row: dict[str, Any], layout: str, tie_tolerance: float
) -> tuple[bytes | None, bytes | None, str]:
    """(winner bytes, loser bytes, tie detail or '')."""
    if layout != "pickapic":
        return _bytes(row.get("image_w")), _bytes(row.get("image_l")), ""
    label = float(row["label_0"])
    if abs(label - 0.5) <= tie_tolerance:
        return _bytes(row["jpg_0"]), _bytes(row["jpg_1"]), f"label_0 = {label}"
    first, second = _bytes(row["jpg_0"]), _bytes(row["jpg_1"])
    return (first, second, "") if label > 0.5 else (second, first, "")


def classify(rows: Iterator[dict[str, Any]], layout: str, tie_tolerance: float = 0.0):
    """Yield ('keep', row) or ('reject', Rejection) for each input row."""
    for index, row in enumerate(rows):
        name = row.get("_name") or row.get("ranking_id") or f"row {index}"
        try:
            winner, loser, tie = _oriented(row, layout, tie_tolerance)
        except Invalid as invalid:  # a cell that is not bytes, or names a file: never read
            rid = f"{layout}-row-{index}"
            yield (
                "reject",
                Rejection(rid, STAGE, invalid.reason, detail=f"{name}: {invalid.detail}"),
            )
            continue
        rid = pair_id(winner or b"", loser or b"") if (winner or loser) else f"{layout}-row-{index}"
        caption = (row.get("caption") or "").strip()
        if tie:
            yield (
                "reject",
                Rejection(rid, STAGE, reasons.TIE, float(row["label_0"]), 0.5, f"{name}: {tie}"),
            )
            continue
        broken = [
            (role, why)
            for role, data in (("winner", winner), ("loser", loser))
            if (why := _decodes(data))
        ]
        if broken:
            detail = "; ".join(f"{role}: {why}" for role, why in broken)
            yield "reject", Rejection(rid, STAGE, reasons.UNDECODABLE, detail=f"{name}: {detail}")
        elif winner == loser:
            yield (
                "reject",
                Rejection(
                    rid,
                    STAGE,
                    reasons.IDENTICAL_PAIR,
                    detail=f"{name}: both images are the same bytes",
                ),
            )
        elif not caption:
            yield (
                "reject",
                Rejection(rid, STAGE, reasons.NO_CAPTION, detail=f"{name}: empty caption"),
            )
        else:
            yield (
                "keep",
                {
                    "id": rid,
                    "caption": caption,
                    "image_w": winner,
                    "image_l": loser,
                    "source": str(name),
                },
            )


def ingest_prefs(
    source: str | os.PathLike, output: str | os.PathLike, config: IngestPrefsConfig
) -> Path:
    """Read preferences in any supported layout into a preference table at OUTPUT."""
    source, output = Path(source), Path(output)
    if not source.exists():
        raise FileNotFoundError(f"preference input {source} does not exist")
    layout = detect_layout(source) if config.layout == "auto" else config.layout
    params = {**config.model_dump(), "layout": layout}
    fp = fingerprint(source)
    if is_done(output, STAGE, params, fp):
        return output
    rows = _folder_rows(source) if layout == "folder" else _rows(source)
    kept, rejected, seen = [], [], set()
    for verdict, item in classify(rows, layout, config.tie_tolerance):
        if verdict == "reject":
            rejected.append(item)
        elif item["id"] in seen:
            rejected.append(
                Rejection(
                    item["id"],
                    STAGE,
                    reasons.EXACT_DUPLICATE,
                    detail=f"{item['source']}: repeated pair",
                )
            )
        else:
            seen.add(item["id"])
            kept.append(item)
    with StageWriter(output, STAGE, params, fp) as writer:
        writer.write_samples(kept, PREF_FEATURES)
        writer.write_rejected(rejected)
        writer.counts.update(
            {"in": len(kept) + len(rejected), "kept": len(kept), "rejected": len(rejected)}
        )
        by_reason: dict[str, int] = {}
        for rejection in rejected:
            by_reason[rejection.reason] = by_reason.get(rejection.reason, 0) + 1
        writer.extra["rejected_by_reason"] = by_reason
        writer.extra["layout"] = layout
    return output


def run_ingest_prefs(source: str, output: str, config: IngestPrefsConfig) -> Path:
    """`t2i prefs`: see dpo/commands.py."""
    return ingest_prefs(source, output, config)
