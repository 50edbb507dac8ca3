"""The on-disk layout of a pre-encoded set, shared by its writer (precompute) and reader (encoded).

    OUT/shards/NNNNN.vae.safetensors      latents_{h}x{w} [n, C, h, w], one tensor per latent bucket
    OUT/shards/NNNNN.clip_l.safetensors   clip_l [m, 77, d], clip_l_pooled [m, p]   (m captions)
    OUT/shards/NNNNN.clip_g.safetensors   clip_g, clip_g_pooled
    OUT/shards/NNNNN.t5.safetensors       t5 [m, L, d], t5_mask [m, L] (bool)
    OUT/shards/empty.{encoder}.safetensors  the empty prompt, [1, ...]
    OUT/samples/                          the index (INDEX_FEATURES): id -> shard and rows

Each field is one stacked tensor per shard, so the safetensors header (a few hundred bytes per
file) is negligible next to the tensors, and a row is a contiguous byte range of the file.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import datasets
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from curate.runtime.store_writer import share_like_umask

STAGE = "precompute"
SHARDS = "shards"
EMPTY = "empty"
ITEMSIZE = {"F16": 2, "BF16": 2, "F32": 4, "BOOL": 1, "U8": 1, "I32": 4, "I64": 8}

_INT_COLUMNS = (
    "shard",
    "bucket_h",
    "bucket_w",
    "latent_row",
    "text_row",
    "text_row_synthetic",
    "width",
    "height",
    "resized_w",
    "resized_h",
    "crop_left",
    "crop_top",
)
INDEX_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "caption": datasets.Value("string"),
        "caption_synthetic": datasets.Value("string"),  # null when the sample has none
        **{name: datasets.Value("int32") for name in _INT_COLUMNS},  # text_row_synthetic -1: none
    }
)


def shard_file(shard: int | str, encoder: str) -> str:
    """File name of one encoder's tensors for shard NNNNN (or for the empty prompt, EMPTY)."""
    return (
        f"{shard:05d}.{encoder}.safetensors"
        if isinstance(shard, int)
        else f"{shard}.{encoder}.safetensors"
    )


def latent_key(h: int, w: int) -> str:
    """Tensor name of the latents of one latent bucket (h x w latent pixels)."""
    return f"latents_{h}x{w}"


def save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file under a temporary name, then rename: complete or absent."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    share_like_umask(tmp)
    os.replace(tmp, path)


def tensor_bytes(path: Path) -> int:
    """Raw bytes of every tensor in a safetensors file (read from its header, nothing loaded)."""
    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            piece = f.get_slice(key)
            total += int(torch.Size(piece.get_shape()).numel()) * ITEMSIZE[piece.get_dtype()]
    return total


def storage_bytes(shards: Path, kept: int) -> dict[str, Any]:
    """Bytes on disk vs raw tensor bytes, in total, per sample and per encoder."""
    per_encoder: dict[str, dict[str, int]] = {}
    for path in sorted(shards.glob("*.safetensors")):
        entry = per_encoder.setdefault(
            path.name.split(".")[1], {"file_bytes": 0, "tensor_bytes": 0}
        )
        entry["file_bytes"] += path.stat().st_size
        entry["tensor_bytes"] += tensor_bytes(path)
    files = sum(e["file_bytes"] for e in per_encoder.values())
    tensors = sum(e["tensor_bytes"] for e in per_encoder.values())
    denom = max(kept, 1)
    return {
        "file_bytes": files,
        "tensor_bytes": tensors,
        "per_sample": round(files / denom, 1),
        "tensor_per_sample": round(tensors / denom, 1),
        "overhead": round(files / tensors - 1, 5) if tensors else 0.0,
        "per_encoder_per_sample": {
            k: round(v["file_bytes"] / denom, 1) for k, v in per_encoder.items()
        },
    }


def caption_and_latent_bytes(
    dims: dict[str, Any], latent_hw: tuple[int, int], t5_length: int, itemsize: int = 2
) -> dict[str, int]:
    """Raw bytes of one image's latents and of one caption's encodings, from encoder dims.

    The same fields precompute stores (the T5 mask as 1 byte per token); compare with SD3
    Table 7, which lists VAE (fp32), CLIP-L, CLIP-G and T5 (16-bit) per sample at 256^2.
    """
    h, w = latent_hw
    return {
        "vae": dims["latent_channels"] * h * w * itemsize,
        "clip_l": (dims["clip_tokens"] * dims["clip_l"] + dims["clip_l_pooled"]) * itemsize,
        "clip_g": (dims["clip_tokens"] * dims["clip_g"] + dims["clip_g_pooled"]) * itemsize,
        "t5": t5_length * dims["t5"] * itemsize + t5_length,
    }
