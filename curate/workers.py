"""Score one chunk of records: decode, validate, NSFW, aesthetic, pHash, embedding.

`score_chunk(scorers, items)` turns a chunk into its work-log table. Each worker builds its
`Scorers` once (one intra-op thread) and reuses them for every shard it is given
(curate/runtime/executor.py); curate/shards.py reads a shard and scores it chunk by chunk. Chunks are
independent, so a chunk's table is a pure function of its records and the configuration: a
killed run resumes from the chunks it already finished, and a shard lost with its worker reruns
elsewhere to the same tables.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFilter

from curate.config import CurateConfig
from curate.runtime import reasons
from curate.runtime.decode import Invalid, check
from curate.runtime.options import resolve_device

THUMB = 160  # px, longest side of the thumbnails kept for the report's contact sheets

ROW_SCHEMA_FIELDS = [
    ("id", pa.string()),
    ("source", pa.string()),
    ("caption", pa.string()),
    ("caption_note", pa.string()),  # why a caption that was not text was dropped ("" = none)
    ("status", pa.string()),  # "candidate" (passed every per-image filter) or "rejected"
    ("reason", pa.string()),
    ("score", pa.float64()),
    ("threshold", pa.float64()),
    ("detail", pa.string()),
    ("image", pa.binary()),
    ("thumb", pa.binary()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("nsfw_score", pa.float64()),
    ("aesthetic_score", pa.float64()),
    ("phash", pa.uint64()),
    ("nbytes", pa.int64()),
    ("exact_check", pa.bool_()),  # takes part in the exact-duplicate check (read, not refused)
]


@dataclass
class Resolved:
    """The configuration with per-scorer defaults filled in."""

    config: CurateConfig
    aesthetic_kind: str  # "laion_v2" | "brisque_quality" | "none"
    aesthetic_threshold: float | None
    similarity_threshold: float


def resolve(config: CurateConfig) -> Resolved:
    from curate.aesthetic import DEFAULT_THRESHOLDS

    scorer = config.aesthetic_scorer
    if scorer == "auto":
        scorer = "laion_v2" if config.clip_model and config.aesthetic_model else "brisque"
    kind = {"laion_v2": "laion_v2", "brisque": "brisque_quality", "none": "none"}[scorer]
    threshold = (
        config.aesthetic_threshold
        if config.aesthetic_threshold is not None
        else DEFAULT_THRESHOLDS.get(kind)
    )
    similarity = config.similarity_threshold
    if similarity is None:
        similarity = {"sscd": 0.5, "efficientnet_lite0": 0.8}.get(config.embedder, 0.95)
    return Resolved(config, kind, threshold, similarity)


class Scorers:
    def __init__(self, resolved: Resolved) -> None:
        import torch

        torch.set_num_threads(1)
        # --device auto is resolved here, in the worker, which may sit on another machine
        device = resolve_device(resolved.config.device)
        resolved = replace(resolved, config=resolved.config.model_copy(update={"device": device}))
        config = resolved.config
        self.resolved = resolved
        clip = None
        needs_clip = (
            resolved.aesthetic_kind == "laion_v2"
            or config.nsfw_detector == "laion_clip"
            or config.embedder == "clip"
        )
        if needs_clip:
            from curate.clip import ClipImageEmbedder

            clip = ClipImageEmbedder(config.clip_model, config.device)
        self.clip = clip
        self.nsfw = self._nsfw(config, clip)
        self.aesthetic = self._aesthetic(resolved, clip)
        from curate.embed import build_embedder

        self.embedder = (
            clip
            if config.embedder == "clip"
            else build_embedder(
                config.embedder, config.embedder_model, config.clip_model, config.device
            )
        )

    @staticmethod
    def _nsfw(config: CurateConfig, clip):
        from curate import nsfw

        if config.nsfw_detector == "opennsfw":
            return nsfw.OpenNSFW()
        if config.nsfw_detector == "hf":
            return nsfw.HFImageClassifierNSFW(config.nsfw_model, config.device)
        if config.nsfw_detector == "laion_clip":
            return nsfw.LaionClipNSFW(
                config.clip_model, config.nsfw_model, config.device, clip=clip
            )
        return None

    @staticmethod
    def _aesthetic(resolved: Resolved, clip):
        from curate import aesthetic

        if resolved.aesthetic_kind == "laion_v2":
            config = resolved.config
            return aesthetic.LaionAestheticV2(
                config.clip_model, config.aesthetic_model, config.device, clip=clip
            )
        if resolved.aesthetic_kind == "brisque_quality":
            return aesthetic.BrisqueQuality()
        return None

    def batched(
        self, model, images: list[Image.Image], clip_embeddings: np.ndarray | None
    ) -> np.ndarray:
        size = self.resolved.config.batch_size
        takes_clip = clip_embeddings is not None and getattr(model, "clip", None) is self.clip
        parts = []
        for start in range(0, len(images), size):
            batch = images[start : start + size]
            if takes_clip:
                parts.append(model(batch, clip_embeddings[start : start + size]))
            else:
                parts.append(model(batch))
        return np.concatenate(parts) if parts else np.zeros(0)


def build_scorers(resolved: Resolved) -> Scorers:
    """A worker's state: every model the configuration asks for, loaded once."""
    return Scorers(resolved)


def _thumbnail(image: Image.Image, blur: bool) -> bytes:
    thumb = image.copy()
    thumb.thumbnail((THUMB, THUMB), Image.Resampling.BILINEAR)
    if blur:  # never put explicit content in a report unblurred
        thumb = thumb.filter(ImageFilter.GaussianBlur(radius=8))
    buffer = io.BytesIO()
    thumb.save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def _phash(image: Image.Image) -> int:
    import imagehash

    return int(str(imagehash.phash(image)), 16)


def score_chunk(scorers: Scorers, items: list[dict[str, Any]]) -> pa.Table:
    """The work-log table of one chunk: a row per item (same order), embeddings of the candidates."""
    return chunk_table(*process_chunk(scorers, items))


def process_chunk(
    scorers: Scorers, items: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Rows for every item (one per record, same order) and the embeddings of the candidates."""
    resolved, config = scorers.resolved, scorers.resolved.config
    rows: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    positions: list[int] = []
    for item in items:
        row = {name: None for name, _ in ROW_SCHEMA_FIELDS}
        row.update(
            id=item["id"],
            source=item["key"],
            caption=item["caption"],
            caption_note=item.get("caption_note", ""),
            status="rejected",
            detail=f"source={item['key']}",
            exact_check=item.get("exact_check", False),
        )
        rows.append(row)
        if item["refused"]:
            row.update(
                reason=item["refused"], detail=f"source={item['key']} {item['detail']}".strip()
            )
            continue
        try:
            decoded = check(item["data"], config.min_side, config.max_aspect, config.max_pixels)
        except Invalid as invalid:
            row.update(
                reason=invalid.reason,
                score=invalid.score,
                threshold=invalid.threshold,
                detail=f"source={item['key']} {invalid.detail}".strip(),
            )
            continue
        row.update(
            image=decoded.stored,
            width=decoded.image.width,
            height=decoded.image.height,
            nbytes=len(item["data"]),
        )
        images.append(decoded.image)
        positions.append(len(rows) - 1)

    clip_embeddings = (
        scorers.batched(scorers.clip, images, None) if scorers.clip is not None and images else None
    )
    nsfw = (
        scorers.batched(scorers.nsfw, images, clip_embeddings) if scorers.nsfw is not None else None
    )
    alive = []
    for k, position in enumerate(positions):
        row = rows[position]
        row["nsfw_score"] = float(nsfw[k]) if nsfw is not None else None
        if nsfw is not None and nsfw[k] >= config.nsfw_threshold:
            row.update(
                reason=reasons.NSFW,
                score=float(nsfw[k]),
                threshold=config.nsfw_threshold,
                image=None,
                thumb=_thumbnail(images[k], blur=True),
            )
        else:
            alive.append(k)
    if scorers.aesthetic is not None:
        quality = scorers.batched(
            scorers.aesthetic,
            [images[k] for k in alive],
            clip_embeddings[alive] if clip_embeddings is not None else None,
        )
    else:
        quality = [None] * len(alive)
    candidates = []
    for q, k in zip(quality, alive, strict=True):
        row = rows[positions[k]]
        row["aesthetic_score"] = float(q) if q is not None else None
        row["thumb"] = _thumbnail(images[k], blur=False)
        if (
            q is not None
            and resolved.aesthetic_threshold is not None
            and not q >= resolved.aesthetic_threshold
        ):
            row.update(
                reason=reasons.LOW_AESTHETIC,
                score=float(q),
                threshold=resolved.aesthetic_threshold,
                image=None,
            )
        else:
            row.update(status="candidate", detail="", phash=_phash(images[k]))
            candidates.append(k)
    if candidates:
        if config.embedder == "clip" and clip_embeddings is not None:
            embeddings = clip_embeddings[candidates]
        else:
            embeddings = scorers.batched(scorers.embedder, [images[k] for k in candidates], None)
    else:
        embeddings = np.zeros((0, 0), np.float32)
    return rows, np.asarray(embeddings, dtype=np.float32)


def chunk_table(rows: list[dict[str, Any]], embeddings: np.ndarray) -> pa.Table:
    """One WorkLog chunk: the rows plus a fixed-size-list embedding column (null for rejected rows)."""
    table = pa.Table.from_pylist(rows, schema=pa.schema(ROW_SCHEMA_FIELDS))
    dim = embeddings.shape[1] if embeddings.ndim == 2 and embeddings.shape[0] else 0
    candidate = np.array([r["status"] == "candidate" for r in rows], dtype=bool)
    if dim:
        full = np.zeros((len(rows), dim), np.float32)
        full[candidate] = embeddings
        values = pa.array(full.reshape(-1), type=pa.float32())
        column = pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(~candidate))
    else:
        column = pa.nulls(len(rows), type=pa.list_(pa.float32()))
    return table.append_column("embedding", column)
