"""`t2i precompute IN OUT --model DIR`: pre-encode a captioned set once (SD3 section 5.3.1, Table 7).

Runner: `run_precompute(input, output, config=PrecomputeConfig) -> Path` (the output directory).

IN is a curated or captioned store (columns `id`, `image`, `caption`, optionally
`caption_synthetic`, null when absent). Every kept image is center-cropped (or bucketed) and
VAE-encoded; its original caption, its synthetic caption when present, and the empty prompt
(once per set) go through CLIP-L, CLIP-G and T5 (model/encoders.py says what each stores).

Work runs one encoder at a time over all shards (VAE, then CLIP-L, CLIP-G, T5: T5-XXL alone
is 19 GB), each with its own progress bar, and lands as one safetensors file per shard and
encoder in a work directory beside OUT. A worker is sent a shard's row range and reads the rows
from IN itself (no image passes through the driver); the captions for the text encoders are
short strings and are sent. A killed run resumes at the first missing
(shard, encoder) and ends with the same bytes as an uninterrupted run. Output:

    OUT/manifest.json           parameters, counts, extra.info (dims, factors, dtype, buckets),
                                extra.bytes (per sample on disk vs raw tensor bytes)
    OUT/samples/                the index: id, captions, shard, latent bucket and row,
                                text rows (original, synthetic or -1), original size and crop
    OUT/rejected/               images that failed to decode or encode (reason encode_failed)
    OUT/shards/                 per shard and encoder one safetensors file of stacked 16-bit
                                tensors, plus the empty prompt once (layout: model/shards.py)

A caption's rows in a shard: its originals first, then the synthetic captions, in input order.
`extra.timings_s` holds each encoder's load and encode seconds and items encoded in this run. Read the set back with
`model.encoded.EncodedDataset`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
from tqdm.auto import tqdm

from curate.runtime import reasons
from curate.runtime.executor import EXECUTION_FIELDS, Executor, Setup, executor_for
from curate.runtime.stage_runtime import StageRun
from curate.runtime.store import Rejection, StoreError, load_samples, params_hash
from curate.runtime.store_writer import StageWriter
from model.buckets import make_buckets
from model.config import PrecomputeConfig
from model.encoders import (
    FIELDS,
    LATENT_MODE,
    TEXT_ENCODERS,
    encoder_dims,
)
from model.folders import parse_dtype
from model.precompute_shards import (
    ImageJob,
    RowRange,
    TextJob,
    build_encoder,
    encode_image_shard,
    encode_text_shard,
)
from model.shards import (
    EMPTY,
    INDEX_FEATURES,
    SHARDS,
    STAGE,
    save_atomic,
    shard_file,
    storage_bytes,
)


def run_precompute(
    input: str | os.PathLike, output: str | os.PathLike, config: PrecomputeConfig
) -> Path:
    """Pre-encode IN into OUT (see the module docstring); skipped when OUT is already done."""
    input, output = Path(input), Path(output)
    reads = {"input": input, "model": config.model}
    with StageRun(output, STAGE, config, reads, volatile=EXECUTION_FIELDS) as run:
        if run.finished:
            return run.skip()
        dims = encoder_dims(config.model)
        table = _open_input(input)
        step = dims["vae_scale_factor"] * dims["patch_size"]
        if config.buckets:
            buckets = make_buckets(config.resolution, step, config.bucket_max_ratio)
        elif config.resolution % step:
            raise ValueError(
                f"--resolution {config.resolution} is not a multiple of {step} (VAE factor x patch size)"
            )
        else:
            buckets = [(config.resolution, config.resolution)]
        work = run.work_log()
        # Map each encoder over the shards in turn (one encoder in a worker's memory at a time).
        with executor_for(config, STAGE) as executor:
            store = str(input.resolve())  # every worker reads its shards' rows from it
            encoding = _Run(config, dims, table, store, buckets, work.path, executor)
            encoding.encode_images()
            for name in TEXT_ENCODERS:
                encoding.encode_captions(name)
        with run.writer() as writer:
            encoding.assemble(writer)
        work.clear()
    return output


def _open_input(input: Path) -> datasets.Dataset:
    try:
        table = load_samples(input)
    except StoreError as error:
        raise StoreError(f"{error}; `t2i precompute` reads a curated or captioned store") from None
    if table.num_rows == 0:
        raise ValueError(
            f"{input} holds no samples to encode; see its report (every input may have been rejected)"
        )
    missing = {"id", "image", "caption"} - set(table.column_names)
    if missing:
        raise ValueError(
            f"{input} has no column(s) {sorted(missing)}; precompute needs id, image and caption"
        )
    return table.cast_column("image", datasets.Image(decode=False))


class _Run:
    """One precompute run's work: per-shard parts in `parts`, one encoder at a time."""

    def __init__(
        self,
        config: PrecomputeConfig,
        dims: dict[str, Any],
        table: datasets.Dataset,
        store: str,
        buckets: list[tuple[int, int]],
        parts: Path,
        executor: Executor,
    ) -> None:
        self.config, self.dims, self.table, self.store = config, dims, table, store
        self.buckets, self.parts, self.executor = buckets, parts, executor
        self.where = executor.describe()
        # encoder -> {"load": s, "encode": s, "items": images or captions encoded in this run}
        self.timings: dict[str, dict[str, float]] = {}
        self.num_shards = (table.num_rows + config.shard_size - 1) // config.shard_size
        self.store_dtype = parse_dtype(config.dtype)
        self.encoder_kwargs = {
            "device": config.device,
            "dtype": parse_dtype(config.compute_dtype),
            "t5_length": config.t5_length,
            "variant": config.variant,
        }

    def _part(self, shard: int | str, encoder: str) -> Path:
        return self.parts / shard_file(shard, encoder)

    def _meta_path(self, shard: int) -> Path:
        return self.parts / f"{shard:05d}.json"

    def _meta(self, shard: int) -> dict[str, Any]:
        return json.loads(self._meta_path(shard).read_text())

    # -- images ---------------------------------------------------------------------------------

    def _shard_range(self, shard: int) -> RowRange:
        size = self.config.shard_size
        return RowRange(self.store, shard * size, min((shard + 1) * size, self.table.num_rows))

    def _setup(self, name: str) -> Setup:
        spec = (self.config.model, name, self.encoder_kwargs)
        return Setup(build_encoder, spec, params_hash({"encoder": spec}))

    def encode_images(self) -> None:
        todo = [s for s in range(self.num_shards) if not self._part(s, "vae").is_file()]
        if not todo:
            return
        job = ImageJob(
            self.buckets,
            self.dims["vae_scale_factor"],
            self.config.batch_size,
            self.store_dtype,
            self.config.dtype,
        )
        size = self.config.shard_size
        rows = {s: min(size, self.table.num_rows - s * size) for s in range(self.num_shards)}
        shards = ((f"{s:05d}", (job, self._shard_range(s))) for s in todo)
        with tqdm(total=self.table.num_rows, desc="vae", unit="image") as bar:
            bar.update(sum(n for s, n in rows.items() if s not in todo))
            with self._timed("vae", sum(rows[s] for s in todo)) as loads:
                for result in self.executor.map(self._setup("vae"), encode_image_shard, shards):
                    meta, tensors = result.value
                    shard = int(result.name)
                    tmp = self._meta_path(shard).with_suffix(".tmp")
                    tmp.write_text(json.dumps(meta))
                    os.replace(tmp, self._meta_path(shard))
                    save_atomic(tensors, self._part(shard, "vae"))
                    loads.append(result.load_s)
                    bar.update(rows[shard])

    @contextlib.contextmanager
    def _timed(self, name: str, items: int) -> Iterator[list[float]]:
        """Record NAME's load seconds (the slowest worker's) and encode seconds (the rest of the wall)."""
        start, loads = time.monotonic(), []
        try:
            yield loads
        finally:
            load = max(loads, default=0.0)
            self.timings[name] = {
                "load": round(load, 3),
                "encode": round(time.monotonic() - start - load, 3),
                "items": items,
            }

    # -- captions -------------------------------------------------------------------------------

    def _captions(self, shard: int) -> list[str]:
        kept = self._meta(shard)["kept"]
        return [r["caption"] for r in kept] + [
            r["caption_synthetic"] for r in kept if r["caption_synthetic"]
        ]

    def encode_captions(self, name: str) -> None:
        todo = [s for s in range(self.num_shards) if not self._part(s, name).is_file()]
        if not todo and self._part(EMPTY, name).is_file():
            return
        counts = {s: len(self._captions(s)) for s in range(self.num_shards)}
        job = TextJob(name, self.config.batch_size, self.store_dtype, self.config.dtype)
        shards = [(str(EMPTY), (job, [""]))] if not self._part(EMPTY, name).is_file() else []
        shards += [(f"{s:05d}", (job, self._captions(s))) for s in todo]
        with tqdm(total=sum(counts.values()), desc=name, unit="caption") as bar:
            bar.update(sum(n for s, n in counts.items() if s not in todo))
            with self._timed(name, sum(n for s, n in counts.items() if s in todo)) as loads:
                for result in self.executor.map(self._setup(name), encode_text_shard, shards):
                    shard = EMPTY if result.name == str(EMPTY) else int(result.name)
                    save_atomic(result.value, self._part(shard, name))
                    loads.append(result.load_s)
                    bar.update(counts.get(shard, 0))

    # -- output ---------------------------------------------------------------------------------

    def assemble(self, writer: StageWriter) -> None:
        shards = writer.path / SHARDS
        shards.mkdir()
        files = [shard_file(s, e) for s in range(self.num_shards) for e in ("vae", *TEXT_ENCODERS)]
        files += [shard_file(EMPTY, e) for e in TEXT_ENCODERS]
        for name in files:  # hard links: the work directory stays valid until the commit
            try:
                os.link(self.parts / name, shards / name)
            except OSError:
                (shards / name).write_bytes((self.parts / name).read_bytes())
        index, rejected = [], []
        for shard in range(self.num_shards):
            meta = self._meta(shard)
            synthetic_row = len(meta["kept"])  # text rows: originals first, then synthetics
            for i, record in enumerate(meta["kept"]):
                has_synthetic = record["caption_synthetic"] is not None
                rows = {
                    "shard": shard,
                    "text_row": i,
                    "text_row_synthetic": synthetic_row if has_synthetic else -1,
                }
                index.append({**record, **rows})
                synthetic_row += has_synthetic
            rejected += [
                Rejection(r["id"], STAGE, reasons.ENCODE_FAILED, detail=r["detail"])
                for r in meta["rejected"]
            ]
        writer.write_samples(index, INDEX_FEATURES)
        writer.write_rejected(rejected)
        kept = len(index)
        writer.counts.update(
            input=self.table.num_rows,
            kept=kept,
            rejected=len(rejected),
            with_synthetic=sum(r["text_row_synthetic"] >= 0 for r in index),
        )
        writer.extra["info"] = self.info()
        writer.extra["bytes"] = storage_bytes(shards, kept)
        writer.extra["timings_s"] = self.timings
        writer.extra["executor"] = self.where

    def info(self) -> dict[str, Any]:
        c = self.config
        return {
            "model": str(Path(c.model).resolve()),
            "resolution": c.resolution,
            "buckets": c.buckets,
            "pixel_buckets": [list(b) for b in self.buckets],
            "t5_length": c.t5_length,
            "dtype": c.dtype,
            "latent_mode": LATENT_MODE,
            "num_shards": self.num_shards,
            "shard_size": c.shard_size,
            "fields": {k: list(v) for k, v in FIELDS.items()},
            **self.dims,
        }


# ---- the per-shard functions (run on a worker, whose state is one encoder) ----------------------
