"""`t2i precompute IN OUT --model DIR`: pre-encode a captioned set once (SD3 section 5.3.1, Table 7).

Runner: `run_precompute(input, output, config=PrecomputeConfig) -> Path` (the output directory).

IN is a curated or captioned store (columns `id`, `image`, `caption`, optionally
`caption_synthetic`, null when absent). Every kept image is center-cropped (or bucketed) and
VAE-encoded; its original caption, its synthetic caption when present, and the empty prompt
(once per set) go through CLIP-L, CLIP-G and T5 (model/encoders.py says what each stores).

Work runs one encoder at a time over all shards (VAE, then CLIP-L, CLIP-G, T5: T5-XXL alone
is 19 GB), each with its own progress bar, and lands as one safetensors file per shard and
encoder in a work directory beside OUT, so a killed run resumes at the first missing
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

import json
import os
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import datasets
import torch
from PIL import Image
from tqdm.auto import tqdm

from curate import reasons
from curate.cells import image_cell
from curate.decode import open_image
from curate.store import (
    Rejection,
    StageWriter,
    StoreError,
    WorkLog,
    fingerprint,
    is_done,
    load_samples,
    params_hash,
)
from model.buckets import center_crop_resize, make_buckets, nearest_bucket
from model.build import parse_dtype
from model.config import PrecomputeConfig
from model.encoders import (
    FIELDS,
    LATENT_MODE,
    TEXT_ENCODERS,
    Encoder,
    encoder_dims,
    to_pixels,
)
from model.shards import (
    EMPTY,
    INDEX_FEATURES,
    SHARDS,
    STAGE,
    latent_key,
    save_atomic,
    shard_file,
    storage_bytes,
)


def run_precompute(
    input: str | os.PathLike, output: str | os.PathLike, config: PrecomputeConfig
) -> Path:
    """Pre-encode IN into OUT (see the module docstring); skipped when OUT is already done."""
    input, output = Path(input), Path(output)
    params = config.model_dump()
    input_fp = f"{fingerprint(input)}+model:{fingerprint(config.model)}"
    if is_done(output, STAGE, params, input_fp):
        return output
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
    work = WorkLog(output, params_hash({**params, "input": input_fp}))
    run = _Run(config, dims, table, buckets, work.path)
    run.encode_images()
    for name in TEXT_ENCODERS:
        run.encode_captions(name)
    with StageWriter(output, STAGE, params, input_fp) as writer:
        run.assemble(writer)
    work.clear()
    return output


def _open_input(input: Path) -> datasets.Dataset:
    try:
        table = load_samples(input)
    except StoreError as error:
        raise StoreError(f"{error}; `t2i precompute` reads a curated or captioned store") from None
    missing = {"id", "image", "caption"} - set(table.column_names)
    if missing:
        raise ValueError(
            f"{input} has no column(s) {sorted(missing)}; precompute needs id, image and caption"
        )
    return table.cast_column("image", datasets.Image(decode=False))


def _caption(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _reason(what: str, error: Exception) -> str:
    """A rejection detail that is the same in every run (no object addresses)."""
    return f"{what}: {type(error).__name__}: " + re.sub(r" at 0x[0-9a-f]+", "", str(error))


def _open_image(cell: dict[str, Any]) -> Image.Image:
    """The cell's image, header read under the pixel cap (a path cell is refused, never read)."""
    data = image_cell(cell)
    if not data:
        raise ValueError("no image bytes")
    return open_image(data)


class _Run:
    """One precompute run's work: per-shard parts in `parts`, one encoder at a time."""

    def __init__(self, config: PrecomputeConfig, dims: dict[str, Any], table: datasets.Dataset,
                 buckets: list[tuple[int, int]], parts: Path) -> None:  # fmt: skip
        self.config, self.dims, self.table = config, dims, table
        self.buckets, self.parts = buckets, parts
        # encoder -> {"load": s, "encode": s, "items": images or captions encoded in this run}
        self.timings: dict[str, dict[str, float]] = {}
        self.num_shards = (table.num_rows + config.shard_size - 1) // config.shard_size
        self.store_dtype = parse_dtype(config.dtype)
        self.encoder_kwargs = {"device": config.device, "dtype": parse_dtype(config.compute_dtype),
                               "t5_length": config.t5_length}  # fmt: skip

    def _part(self, shard: int | str, encoder: str) -> Path:
        return self.parts / shard_file(shard, encoder)

    def _meta_path(self, shard: int) -> Path:
        return self.parts / f"{shard:05d}.json"

    def _meta(self, shard: int) -> dict[str, Any]:
        return json.loads(self._meta_path(shard).read_text())

    # -- images ---------------------------------------------------------------------------------

    def encode_images(self) -> None:
        todo = [s for s in range(self.num_shards) if not self._part(s, "vae").is_file()]
        if not todo:
            return
        start = time.monotonic()
        encoder = Encoder(self.config.model, "vae", **self.encoder_kwargs)
        loaded, size = time.monotonic(), self.config.shard_size
        rows = {s: min(size, self.table.num_rows - s * size) for s in range(self.num_shards)}
        try:
            with tqdm(total=self.table.num_rows, desc="vae", unit="image") as bar:
                bar.update(sum(n for s, n in rows.items() if s not in todo))
                for shard in todo:
                    self._encode_image_shard(encoder, shard)
                    bar.update(rows[shard])
        finally:
            encoder.release()
            self._timed("vae", start, loaded, sum(rows[s] for s in todo))

    def _timed(self, name: str, start: float, loaded: float, items: int) -> None:
        self.timings[name] = {"load": round(loaded - start, 3), "encode": round(time.monotonic() - loaded, 3),
                              "items": items}  # fmt: skip

    def _encode_image_shard(self, encoder: Encoder, shard: int) -> None:
        size = self.config.shard_size
        start, stop = shard * size, min((shard + 1) * size, self.table.num_rows)
        rows = self.table.select(range(start, stop))
        f = self.dims["vae_scale_factor"]
        planned, failed = [], {}
        for pos, row in enumerate(rows):
            record = {"id": row["id"], "caption": _caption(row["caption"]) or "",
                      "caption_synthetic": _caption(row.get("caption_synthetic"))}  # fmt: skip
            try:
                image = _open_image(row["image"])
                record.update(width=image.width, height=image.height)
                planned.append(
                    (pos, record, nearest_bucket(image.width, image.height, self.buckets))
                )
            except Exception as error:  # any unreadable header: rejected with the reason
                failed[pos] = (record["id"], _reason("could not open image", error))
        latents: dict[int, torch.Tensor] = {}
        by_bucket: dict[tuple[int, int], list] = defaultdict(list)
        for item in planned:
            by_bucket[item[2]].append(item)
        for bucket, items in by_bucket.items():
            for b in range(0, len(items), self.config.batch_size):
                self._encode_image_batch(
                    encoder, rows, items[b : b + self.config.batch_size], bucket, latents, failed
                )
        kept: list[dict[str, Any]] = []
        tensors: dict[str, list[torch.Tensor]] = defaultdict(list)
        for pos, record, (h, w) in planned:
            if pos not in latents:
                continue
            key = latent_key(h // f, w // f)
            record.update(
                bucket_h=h // f,
                bucket_w=w // f,
                latent_row=len(tensors[key]),
                **record.pop("_crop"),
            )
            tensors[key].append(latents[pos])
            kept.append(record)
        meta = {
            "kept": kept,
            "rejected": [{"id": i, "detail": d} for _, (i, d) in sorted(failed.items())],
        }
        tmp = self._meta_path(shard).with_suffix(".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self._meta_path(shard))
        save_atomic({k: torch.stack(v) for k, v in tensors.items()}, self._part(shard, "vae"))

    def _encode_image_batch(self, encoder, rows, items, bucket, latents, failed) -> None:
        """Encode one same-bucket batch into `latents` {pos: tensor}; failures go to `failed`."""
        ids = {pos: record["id"] for pos, record, _ in items}
        pixels: dict[int, torch.Tensor] = {}
        for pos, record, _ in items:
            try:
                image = _open_image(rows[pos]["image"])
                image.load()
                crop, record["_crop"] = center_crop_resize(image.convert("RGB"), bucket)
                pixels[pos] = to_pixels(crop)
            except Exception as error:  # truncated or corrupt pixel data
                failed[pos] = (ids[pos], _reason("could not decode image", error))
        if not pixels:
            return
        try:
            out = dict(
                zip(pixels, encoder(torch.stack(list(pixels.values())))["latents"], strict=True)
            )
        except Exception as batch_error:  # isolate the failing image, one at a time
            out, errors = {}, {}
            for pos, p in pixels.items():
                try:
                    out[pos] = encoder(p[None])["latents"][0]
                except Exception as error:
                    errors[pos] = error
            if len(errors) == len(pixels):
                raise batch_error  # every image fails: the device or model, not the data
            for pos, error in errors.items():
                failed[pos] = (ids[pos], _reason("VAE encode failed", error))
        for pos, z in out.items():
            stored = z.to("cpu", self.store_dtype)
            if torch.isfinite(stored).all():
                latents[pos] = stored
            else:
                failed[pos] = (
                    ids[pos],
                    f"non-finite latents in {self.config.dtype} (try --dtype bf16)",
                )

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
        start = time.monotonic()
        encoder = Encoder(self.config.model, name, **self.encoder_kwargs)
        loaded = time.monotonic()
        try:
            if not self._part(EMPTY, name).is_file():
                self._save_text(encoder, name, [""], self._part(EMPTY, name))
            with tqdm(total=sum(counts.values()), desc=name, unit="caption") as bar:
                bar.update(sum(n for s, n in counts.items() if s not in todo))
                for shard in todo:
                    self._save_text(encoder, name, self._captions(shard), self._part(shard, name))
                    bar.update(counts[shard])
        finally:
            encoder.release()
            self._timed(name, start, loaded, sum(n for s, n in counts.items() if s in todo))

    def _save_text(self, encoder: Encoder, name: str, captions: list[str], path: Path) -> None:
        parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        for b in range(0, len(captions), self.config.batch_size):
            for key, value in encoder(captions[b : b + self.config.batch_size]).items():
                parts[key].append(
                    value.cpu() if value.dtype == torch.bool else value.to("cpu", self.store_dtype)
                )
        tensors = {key: torch.cat(values) for key, values in parts.items()}
        for key, value in tensors.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(
                    f"{name} produced values that overflow {self.config.dtype} ({key}); "
                    "store in bf16 (--dtype bf16) or run the encoder in fp32 (--compute-dtype fp32)"
                )
        save_atomic(tensors, path)

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
            input=self.table.num_rows, kept=kept, rejected=len(rejected),
            with_synthetic=sum(r["text_row_synthetic"] >= 0 for r in index),
        )  # fmt: skip
        writer.extra["info"] = self.info()
        writer.extra["bytes"] = storage_bytes(shards, kept)
        writer.extra["timings_s"] = self.timings

    def info(self) -> dict[str, Any]:
        c = self.config
        return {
            "model": str(Path(c.model).resolve()), "resolution": c.resolution, "buckets": c.buckets,
            "pixel_buckets": [list(b) for b in self.buckets], "t5_length": c.t5_length, "dtype": c.dtype,
            "latent_mode": LATENT_MODE, "num_shards": self.num_shards, "shard_size": c.shard_size,
            "fields": {k: list(v) for k, v in FIELDS.items()}, **self.dims,
        }  # fmt: skip
