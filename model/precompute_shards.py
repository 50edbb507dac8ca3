"""What a precompute worker does with its shard: read its row range's images and encode them with the VAE, or encode a set of captions with the three text encoders."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from curate.runtime.cells import image_cell
from curate.runtime.decode import open_image
from curate.runtime.store import load_rows
from model.buckets import center_crop_resize, nearest_bucket
from model.encoders import (
    Encoder,
    to_pixels,
)
from model.shards import (
    latent_key,
)

INPUT_COLUMNS = ("id", "image", "caption", "caption_synthetic")  # what a shard's worker reads


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


@dataclass(frozen=True)
class ImageJob:
    buckets: list[tuple[int, int]]
    vae_scale_factor: int
    batch_size: int
    store_dtype: torch.dtype
    dtype_name: str


@dataclass(frozen=True)
class RowRange:
    """A shard as a worker receives it: rows [start, stop) of the input store, read by the worker."""

    store: str  # an absolute path every worker can open
    start: int
    stop: int

    def rows(self) -> list[dict[str, Any]]:
        rows = load_rows(self.store, self.start, self.stop, INPUT_COLUMNS)
        return [{"caption_synthetic": None, **row} for row in rows]


@dataclass(frozen=True)
class TextJob:
    name: str
    batch_size: int
    store_dtype: torch.dtype
    dtype_name: str


def build_encoder(spec: tuple[str, str, dict[str, Any]]) -> Encoder:
    model, name, kwargs = spec
    return Encoder(model, name, **kwargs)


def encode_image_shard(
    encoder: Encoder, payload: tuple[ImageJob, RowRange]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One shard's latents by bucket and its index records (kept and rejected)."""
    job, shard = payload
    rows = shard.rows()
    f = job.vae_scale_factor
    planned, failed = [], {}
    for pos, row in enumerate(rows):
        record = {
            "id": row["id"],
            "caption": _caption(row["caption"]) or "",
            "caption_synthetic": _caption(row.get("caption_synthetic")),
        }
        try:
            image = _open_image(row["image"])
            record.update(width=image.width, height=image.height)
            planned.append((pos, record, nearest_bucket(image.width, image.height, job.buckets)))
        except Exception as error:  # any unreadable header: rejected with the reason
            failed[pos] = (record["id"], _reason("could not open image", error))
    latents: dict[int, torch.Tensor] = {}
    by_bucket: dict[tuple[int, int], list] = defaultdict(list)
    for item in planned:
        by_bucket[item[2]].append(item)
    for bucket, items in by_bucket.items():
        for b in range(0, len(items), job.batch_size):
            _encode_image_batch(
                encoder, job, rows, items[b : b + job.batch_size], bucket, latents, failed
            )
    kept: list[dict[str, Any]] = []
    tensors: dict[str, list[torch.Tensor]] = defaultdict(list)
    for pos, record, (h, w) in planned:
        if pos not in latents:
            continue
        key = latent_key(h // f, w // f)
        record.update(
            bucket_h=h // f, bucket_w=w // f, latent_row=len(tensors[key]), **record.pop("_crop")
        )
        tensors[key].append(latents[pos])
        kept.append(record)
    meta = {
        "kept": kept,
        "rejected": [{"id": i, "detail": d} for _, (i, d) in sorted(failed.items())],
    }
    return meta, {k: torch.stack(v) for k, v in tensors.items()}


def _encode_image_batch(encoder, job: ImageJob, rows, items, bucket, latents, failed) -> None:
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
        out = dict(zip(pixels, encoder(torch.stack(list(pixels.values())))["latents"], strict=True))
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
        stored = z.to("cpu", job.store_dtype)
        if torch.isfinite(stored).all():
            latents[pos] = stored
        else:
            failed[pos] = (ids[pos], f"non-finite latents in {job.dtype_name} (try --dtype bf16)")


def encode_text_shard(
    encoder: Encoder, payload: tuple[TextJob, list[str]]
) -> dict[str, torch.Tensor]:
    """One shard's captions through one text encoder, stacked in 16-bit."""
    job, captions = payload
    parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    for b in range(0, len(captions), job.batch_size):
        for key, value in encoder(captions[b : b + job.batch_size]).items():
            parts[key].append(
                value.cpu() if value.dtype == torch.bool else value.to("cpu", job.store_dtype)
            )
    tensors = {key: torch.cat(values) for key, values in parts.items()}
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(
                f"{job.name} produced values that overflow {job.dtype_name} ({key}); "
                "store in bf16 (--dtype bf16) or run the encoder in fp32 (--compute-dtype fp32)"
            )
    return tensors
