"""Preference-pair ingest: Pick-a-Pic v2, a generic (caption, image_w, image_l) layout, or a folder.

Every layout becomes one preference table of `id, caption, image_w, image_l, source` (image bytes
as given; `id` = sha256 of winner bytes, a NUL, then loser bytes). Ties, identical images,
undecodable images and empty captions are rejected with a reason, never dropped silently.

Pick-a-Pic v2 (yuvalkirstain/pickapic_v2, 19 columns): `label_0` = 1 means `jpg_0` won, 0 that
`jpg_1` won, 0.5 a tie (about 12% of pairs; Diffusion-DPO drops them). Rows with `has_label`
false, `are_different` false, or `label_0 + label_1 != 1` are rejected too. The hub download
keeps each split in its own files (data/train-00000-of-NNNNN.parquet, validation-..., test-...,
validation_unique-..., test_unique-...); `--split` picks one, and a folder holding several
splits is refused without it rather than mixed.

Ingest streams: parquet is read one row group at a time (only the columns a layout uses) and
kept pairs are written as they are read, so memory does not grow with the number of pairs
(benchmarks/bench_prefs_ingest.py).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq

from curate.ingest import read_inside
from curate.runtime import reasons
from curate.runtime.cells import caption_text, image_cell
from curate.runtime.decode import Invalid, decode_image
from curate.runtime.output_guard import check_output
from curate.runtime.stage_runtime import StageRun
from curate.runtime.store import Manifest, Rejection, load_samples, load_saved
from dpo.config import IngestPrefsConfig

STAGE = "prefs"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_LIMIT = 16_384  # bytes of a pair folder's caption.txt (curate's max_caption_bytes default)
PREF_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "caption": datasets.Value("string"),
        "image_w": datasets.Value("binary"),
        "image_l": datasets.Value("binary"),
        "source": datasets.Value("string"),
    }
)
# The columns each table layout reads (Pick-a-Pic's other 11 are metadata ingest does not need).
PICKAPIC_COLUMNS = (
    "caption",
    "jpg_0",
    "jpg_1",
    "label_0",
    "label_1",
    "has_label",
    "are_different",
    "ranking_id",
)
GENERIC_COLUMNS = ("caption", "image_w", "image_l")
# A hub shard name: SPLIT-00000-of-00012[-anything].parquet
_SHARD_NAME = re.compile(r"^(?P<split>[A-Za-z0-9_]+?)-\d{5}-of-\d{5}")
LABEL_SUM_TOLERANCE = 1e-6
BATCH_ROWS = 32  # rows converted to Python at a time, within one parquet row group


def pair_id(winner: bytes, loser: bytes) -> str:
    return hashlib.sha256(winner + b"\0" + loser).hexdigest()


def _bytes(value: Any) -> bytes | None:
    """Image bytes from a raw bytes cell or a `datasets` Image cell ({'bytes', 'path'}).

    Raises `Invalid` for a cell that is not bytes, and for a path cell (never read), and
    re-raises the refusal a pair folder's file carries (a link out of the folder, say).
    """
    if isinstance(value, Invalid):
        raise value
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


def split_of(file: Path) -> str | None:
    """The split a hub-style parquet shard belongs to (train, validation, ...), None if unnamed."""
    match = _SHARD_NAME.match(file.name)
    return match["split"] if match else None


def parquet_files(path: Path, split: str | None) -> list[Path]:
    """The parquet files of PATH to read: all of them, or one split's; never several splits."""
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    by_split: dict[str | None, list[Path]] = {}
    for file in files:
        by_split.setdefault(split_of(file), []).append(file)
    named = sorted(s for s in by_split if s is not None)
    if split is not None:
        if split not in by_split:
            found = (
                ", ".join(named) if named else "none (its files are not named SPLIT-00000-of-NNNNN)"
            )
            raise ValueError(f"{path} holds no {split} split; its splits: {found}")
        return by_split[split]
    if len(by_split) > 1:
        raise ValueError(
            f"{path} holds several splits ({', '.join(named + ['unnamed'] * (None in by_split))}); "
            f"read one with `t2i prefs --split {'|'.join(named)}`"
        )
    return files


def _saved_split(path: Path, split: str | None) -> datasets.Dataset:
    """One split of a saved DatasetDict (dataset_dict.json lists them)."""
    splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
    if split is None and len(splits) > 1:
        raise ValueError(
            f"{path} holds several splits ({', '.join(splits)}); read one with `t2i prefs --split {'|'.join(splits)}`"
        )
    chosen = split or splits[0]
    if chosen not in splits:
        raise ValueError(f"{path} holds no {chosen} split; its splits: {', '.join(splits)}")
    return load_saved(path / chosen)


def open_table(path: Path, split: str | None = None) -> tuple[list[str], Callable[..., Iterator]]:
    """(column names, rows(columns)) of a parquet file or folder, a saved dataset or a stage output.

    `rows(columns)` yields dicts of just those columns, reading parquet one record batch at a time.
    """
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        table = _saved_split(path, split)
    elif path.is_dir() and (
        (path / "dataset_info.json").is_file() or (path / "state.json").is_file()
    ):
        table = load_saved(path)
    elif path.is_dir() and (path / "samples").is_dir() and Manifest.read(path):
        table = load_samples(path)
    else:
        table = None
    if table is not None:
        if split is not None and not (path / "dataset_dict.json").is_file():
            raise ValueError(f"{path} is a single table with no splits; drop --split")

        def table_rows(columns):
            wanted = [c for c in columns if c in table.column_names]
            view = table.select_columns(wanted)
            # Image columns come back undecoded ({'bytes', 'path'}): our capped decoder and the
            # cell reader judge them, never `datasets`' own PIL decode (a bomb would abort).
            for column, feature in view.features.items():
                if isinstance(feature, datasets.Image) and feature.decode:
                    view = view.cast_column(column, datasets.Image(decode=False))
            yield from view

        return list(table.column_names), table_rows
    files = parquet_files(path, split)
    if not files:
        raise FileNotFoundError(
            f"{path} holds no parquet file or saved dataset; pass Pick-a-Pic v2 parquet, a generic "
            "(caption, image_w, image_l) parquet, or a folder of pair sub-folders with --layout folder"
        )
    names = list(pq.ParquetFile(files[0]).schema_arrow.names)

    def parquet_rows(columns):
        for file in files:
            handle = pq.ParquetFile(file)
            wanted = [c for c in columns if c in handle.schema_arrow.names]
            # One row group at a time: ParquetFile.iter_batches keeps what it has read alive
            # (RSS grew with the file in benchmarks/bench_prefs_ingest.py); read_row_group does not.
            for group in range(handle.num_row_groups):
                table = handle.read_row_group(group, columns=wanted, use_threads=False)
                for batch in table.to_batches(max_chunksize=BATCH_ROWS):
                    yield from batch.to_pylist()
                del table

    return names, parquet_rows


def _inside(root: Path, file: Path, limit: int | None = None) -> bytes | Invalid:
    """FILE's bytes when it (links resolved) lies inside ROOT, else the refusal, unread."""
    try:
        return read_inside(root, file.relative_to(root).as_posix(), limit)
    except Invalid as invalid:
        return invalid


def _folder_rows(path: Path) -> Iterator[dict[str, Any]]:
    """One sub-folder per pair: caption.txt, winner.<ext>, loser.<ext>."""
    for pair in sorted(p for p in path.iterdir() if p.is_dir()):
        found: dict[str, Any] = {}
        for role in ("winner", "loser"):
            files = [
                f for f in pair.iterdir() if f.stem == role and f.suffix.lower() in IMAGE_SUFFIXES
            ]
            found[role] = _inside(path, files[0]) if files else None
        caption_file = pair / "caption.txt"
        caption = ""
        if caption_file.is_file():
            text = _inside(path, caption_file, CAPTION_LIMIT)
            if isinstance(text, Invalid):  # the pair is refused with the caption's reason
                found["winner"] = Invalid(text.reason, f"caption.txt: {text.detail}")
            else:
                try:
                    caption = caption_text(text, "caption.txt", CAPTION_LIMIT)
                except Invalid as invalid:
                    found["winner"] = invalid
        yield {
            "caption": caption,
            "image_w": found["winner"],
            "image_l": found["loser"],
            "_name": pair.name,
        }


def is_pair_folder(path: Path) -> bool:
    return path.is_dir() and any(
        p.is_dir() and (p / "caption.txt").is_file() for p in path.iterdir()
    )


def layout_of(columns: list[str]) -> str | None:
    if {"jpg_0", "jpg_1", "label_0"} <= set(columns):
        return "pickapic"
    if {"image_w", "image_l"} <= set(columns):
        return "generic"
    return None


def detect_layout(path: Path, split: str | None = None) -> str:
    if is_pair_folder(path):
        return "folder"
    columns, _ = open_table(path, split)
    layout = layout_of(columns)
    if layout is None:
        raise ValueError(
            f"cannot tell the layout of {path}: its columns {sorted(columns)} are neither Pick-a-Pic v2 "
            "(caption, jpg_0, jpg_1, label_0) nor generic (caption, image_w, image_l); pass --layout"
        )
    return layout


def _label_problem(row: dict[str, Any]) -> tuple[str, str] | None:
    """(reason, detail) when a Pick-a-Pic row's metadata says it is no usable preference."""
    if row.get("has_label") is False:
        return reasons.UNLABELED, "has_label is false (no vote recorded)"
    if row.get("are_different") is False:
        return reasons.NOT_DIFFERENT, "are_different is false (the two images are the same)"
    label_0, label_1 = row.get("label_0"), row.get("label_1", "absent")
    if label_0 is None or label_1 is None:
        return reasons.BAD_LABELS, f"label_0 = {label_0}, label_1 = {label_1}"
    if label_1 != "absent" and abs(float(label_0) + float(label_1) - 1.0) > LABEL_SUM_TOLERANCE:
        return reasons.BAD_LABELS, f"label_0 + label_1 = {float(label_0) + float(label_1)}, not 1"
    return None


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


def _reject(
    rid: str, reason: str, detail: str, score: float | None = None, threshold: float | None = None
) -> tuple[str, Rejection]:
    return "reject", Rejection(rid, STAGE, reason, score, threshold, detail)


def classify(rows: Iterator[dict[str, Any]], layout: str, tie_tolerance: float = 0.0):
    """Yield ('keep', row) or ('reject', Rejection) for each input row."""
    for index, row in enumerate(rows):
        name = row.get("_name") or row.get("ranking_id") or f"row {index}"
        problem = _label_problem(row) if layout == "pickapic" else None
        if problem is not None:
            try:
                first, second = _bytes(row.get("jpg_0")), _bytes(row.get("jpg_1"))
            except Invalid:  # the label decides; the cells' own problem is not read further
                first = second = None
            rid = (
                pair_id(first or b"", second or b"")
                if (first or second)
                else f"{layout}-row-{index}"
            )
            yield _reject(rid, problem[0], f"{name}: {problem[1]}")
            continue
        try:
            winner, loser, tie = _oriented(row, layout, tie_tolerance)
        except Invalid as invalid:  # a cell that is not bytes, or names a file: never read
            yield _reject(f"{layout}-row-{index}", invalid.reason, f"{name}: {invalid.detail}")
            continue
        rid = pair_id(winner or b"", loser or b"") if (winner or loser) else f"{layout}-row-{index}"
        caption = (row.get("caption") or "").strip()
        broken = [
            (role, why)
            for role, data in (("winner", winner), ("loser", loser))
            if (why := _decodes(data))
        ]
        if tie:
            yield _reject(rid, reasons.TIE, f"{name}: {tie}", float(row["label_0"]), 0.5)
        elif broken:
            yield _reject(
                rid, reasons.UNDECODABLE, f"{name}: " + "; ".join(f"{r}: {w}" for r, w in broken)
            )
        elif winner == loser:
            yield _reject(rid, reasons.IDENTICAL_PAIR, f"{name}: both images are the same bytes")
        elif not caption:
            yield _reject(rid, reasons.NO_CAPTION, f"{name}: empty caption")
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


def run_prefs(
    source: str | os.PathLike, output: str | os.PathLike, config: IngestPrefsConfig
) -> Path:
    """Read preferences in any supported layout into a preference table at OUTPUT, streaming."""
    source, output = Path(source), Path(output)
    if not source.exists():
        raise FileNotFoundError(f"preference input {source} does not exist")
    check_output(output, STAGE, {"input": source})  # before the layout is even looked at
    if config.layout == "folder" or (config.layout == "auto" and is_pair_folder(source)):
        if config.split is not None:
            raise ValueError(f"{source} is a folder of pairs, which has no splits; drop --split")
        layout, rows = "folder", _folder_rows(source)
    else:
        columns, read = open_table(source, config.split)
        layout = config.layout if config.layout != "auto" else detect_layout(source, config.split)
        rows = read(PICKAPIC_COLUMNS if layout == "pickapic" else GENERIC_COLUMNS)
    params = {**config.model_dump(mode="json"), "layout": layout}
    with StageRun(output, STAGE, config, {"input": source}, parameters=params) as run:
        if run.finished:
            return run.skip()
        rejected: list[Rejection] = []  # small records; the images only pass through
        counts = {"input": 0, "kept": 0}

        def kept_pairs() -> Iterator[dict[str, Any]]:
            seen: set[str] = set()
            for verdict, item in classify(rows, layout, config.tie_tolerance):
                counts["input"] += 1
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
                    counts["kept"] += 1
                    yield item
                    if config.max_pairs is not None and counts["kept"] >= config.max_pairs:
                        return

        with run.writer() as writer:
            writer.write_samples(kept_pairs(), PREF_FEATURES)
            writer.write_rejected(rejected)
            writer.counts.update(counts)
            by_reason: dict[str, int] = {}
            for rejection in rejected:
                by_reason[rejection.reason] = by_reason.get(rejection.reason, 0) + 1
            writer.extra["rejected_by_reason"] = by_reason
            writer.extra["layout"] = layout
            if config.split is not None:
                writer.extra["split"] = config.split
    return output
