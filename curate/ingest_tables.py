"""Parquet files, saved `datasets` datasets and stage outputs as records, read in bounded record batches."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from curate.records import (
    BATCH_BYTES,
    CAPTION_COLUMNS,
    IMAGE_COLUMNS,
    KEY_COLUMNS,
    IngestOptions,
    Record,
    Shard,
    dropped,
    refused,
    shard_file,
    shown,
)
from curate.runtime import reasons
from curate.runtime.cells import NotText, caption_cell, image_cell
from curate.runtime.decode import Invalid


def _pick(names: list[str], candidates: tuple[str, ...]) -> str | None:
    lowered = {n.lower(): n for n in names}
    return next((lowered[c] for c in candidates if c in lowered), None)


def _cell_record(key: str, image, caption, root: Path, options: IngestOptions) -> Record:
    """A record from one table row's image and caption cells; bad cells become its refusal."""
    try:
        data = image_cell(image, root if options.allow_path_cells else None)
    except Invalid as invalid:
        return refused(key, invalid.reason, invalid.detail)
    if len(data) > options.max_image_bytes:
        return refused(
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


def parquet(root: Path, rel: str, options: IngestOptions) -> Iterator[Record]:
    import pyarrow.parquet as pq

    file, name = shard_file(root, rel)
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
        yield refused(
            name,
            reasons.CORRUPT_SHARD,
            f"the parquet file cannot be read after {rows} row(s): {type(error).__name__}: {error}",
        )


def load_table(path: Path, kind: str):
    import datasets

    if kind == "store":
        from curate.runtime.store import load_samples

        return load_samples(path)
    from curate.runtime.store import load_saved

    loaded = load_saved(path)
    if isinstance(loaded, datasets.DatasetDict):
        return datasets.concatenate_datasets([loaded[split] for split in sorted(loaded)])
    return loaded


def table(root: Path, shard: Shard, options: IngestOptions) -> Iterator[Record]:
    import datasets

    folder = root / shard.path if shard.path else root
    label = shown(shard.path) if shard.path else ""
    if shard.rows is None:  # planning could not open it
        yield refused(
            label or shown(root.name),
            reasons.CORRUPT_SHARD,
            f"cannot open the saved dataset: {shard.files[0]}",
        )
        return
    dataset = load_table(folder, shard.kind)
    columns = dataset.column_names
    image_column = _pick(columns, IMAGE_COLUMNS)
    if image_column is None:
        yield refused(
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
