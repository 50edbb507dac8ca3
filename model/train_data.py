"""Batches of a pre-encoded set, as a pure function of (seed, micro-batch index).

A resumed run must see exactly the batches the uninterrupted run would have seen, so there is no
data-loader state at all: the order of epoch e is a permutation seeded by (seed, e), samples are
grouped by latent size (bucket) so a batch stacks, and the caption variant of each sample is the
captioning stage's hash-based choice for (seed, step, id). Works with any reader that follows
`model.encoded.EncodedDataset`'s contract (ids, bucket(i), has_synthetic(i), sample(i, variant)).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from captioning.mixing import caption_variant
from curate.runtime.seeds import seed_int
from model.conditioning import TextEncoding


class EncodedReader(Protocol):
    ids: list[str]

    def __len__(self) -> int: ...
    def bucket(self, i: int) -> tuple[int, int]: ...
    def has_synthetic(self, i: int) -> bool: ...
    def sample(self, i: int, variant: str = "original") -> dict[str, Any]: ...
    def empty_text(self) -> TextEncoding: ...


@dataclass
class Batch:
    ids: list[str]
    latents: torch.Tensor  # [B, C, h, w] float32
    text: TextEncoding  # batched, float32
    variants: list[str]

    def to(self, device: str | torch.device) -> Batch:
        """On a GPU: through pinned host memory, copied asynchronously."""
        if torch.device(device).type != "cuda":
            return Batch(self.ids, self.latents.to(device), self.text.to(device), self.variants)
        text = TextEncoding(**{k: v.pin_memory() for k, v in vars(self.text).items()})
        return Batch(
            self.ids,
            self.latents.pin_memory().to(device, non_blocking=True),
            text.to(device, non_blocking=True),
            self.variants,
        )


class BatchPlan:
    """Which sample indices form micro-batch j, for every j, deterministically."""

    def __init__(
        self, buckets: list[tuple[int, int]], indices: list[int], batch_size: int, seed: int = 0
    ):
        if not indices:
            raise ValueError("no training samples left after the validation split")
        self.batch_size = batch_size
        self.seed = seed
        self.groups: dict[tuple[int, int], list[int]] = {}
        for i in indices:
            self.groups.setdefault(tuple(buckets[i]), []).append(i)
        # Partial batches are kept, so every epoch has the same number of batches.
        self.batches_per_epoch = sum(math.ceil(len(g) / batch_size) for g in self.groups.values())
        self._epoch: int | None = None
        self._batches: list[list[int]] = []

    @classmethod
    def for_reader(
        cls, reader: EncodedReader, indices: list[int], batch_size: int, seed: int = 0
    ) -> BatchPlan:
        buckets = [(0, 0)] * len(reader)
        for i in indices:
            buckets[i] = tuple(reader.bucket(i))
        return cls(buckets, indices, batch_size, seed)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(seed_int(self.seed, "epoch", epoch))
            batches = []
            for key in sorted(self.groups):
                group = self.groups[key]
                order = [group[k] for k in torch.randperm(len(group), generator=generator).tolist()]
                batches += [
                    order[k : k + self.batch_size] for k in range(0, len(order), self.batch_size)
                ]
            self._batches = [
                batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()
            ]
            self._epoch = epoch
        return self._batches

    def micro_batch(self, j: int) -> list[int]:
        epoch, position = divmod(j, self.batches_per_epoch)
        return self.epoch_batches(epoch)[position]


def load_batch(
    reader: EncodedReader,
    indices: list[int],
    step: int,
    seed: int = 0,
    p_synthetic: float = 0.5,
) -> Batch:
    """Stack samples; each one's caption variant is the mixing policy's choice for this step.

    A `model.encoded.EncodedDataset` is read through `MappedShards` (one gather per stored tensor
    and shard); any other reader sample by sample. Both give the same batch."""
    variants = [
        caption_variant(
            reader.ids[i], step, seed, p_synthetic, has_synthetic=reader.has_synthetic(i)
        )
        for i in indices
    ]
    mapped = MappedShards.of(reader)
    if mapped is not None:
        return mapped.batch(indices, variants)
    items = [reader.sample(i, variant=v) for i, v in zip(indices, variants, strict=True)]
    return Batch(
        ids=[item["id"] for item in items],
        latents=torch.stack([item["latents"] for item in items]).float(),
        text=TextEncoding.stack([item["text"] for item in items]).to(torch.float32),
        variants=[item["variant"] for item in items],
    )


_SAFETENSORS_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I32": torch.int32,
    "I64": torch.int64,
}
_TEXT_FIELDS = {
    "clip_l": ("clip_l", "clip_l_pooled"),
    "clip_g": ("clip_g", "clip_g_pooled"),
    "t5": ("t5", "t5_mask"),
}


def mapped_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a read-only view of one private memory map of it:
    pages are read when a row is indexed, never the whole file at once."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    size = path.stat().st_size
    whole = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = (8 + header_len + offset for offset in entry["data_offsets"])
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        raw = whole[begin:end]
        if begin % dtype.itemsize:  # unaligned for this dtype: copy this one tensor
            raw = raw.clone()
        tensors[name] = raw.view(dtype).view(entry["shape"])
    return tensors


class MappedShards:
    """Batches of an `EncodedDataset` gathered straight from its memory-mapped shard files: the
    rows of a batch are looked up as arrays and each stored tensor is indexed once per shard, so
    no per-sample tensor is created. Used by `load_batch`; the same numbers as `reader.sample`."""

    def __init__(self, reader: Any) -> None:
        self.directory = Path(reader.directory) / "shards"
        self.ids = reader.ids
        self.columns = reader._cols
        self._files: dict[str, dict[str, torch.Tensor]] = {}

    @classmethod
    def of(cls, reader: Any) -> MappedShards | None:
        """The reader's MappedShards (made once), or None for a reader that is not an EncodedDataset."""
        from model.encoded import EncodedDataset

        if type(reader) is not EncodedDataset:
            return None
        mapped = reader.__dict__.get("_mapped_shards")
        if mapped is None:
            mapped = reader.__dict__["_mapped_shards"] = cls(reader)
        return mapped

    def _file(self, shard: int, encoder: str) -> dict[str, torch.Tensor]:
        name = f"{shard:05d}.{encoder}.safetensors"
        if name not in self._files:
            path = self.directory / name
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} is missing; the encoded set is incomplete, rerun `t2i precompute`"
                )
            self._files[name] = mapped_safetensors(path)
        return self._files[name]

    def _gather(
        self, shards: np.ndarray, rows: np.ndarray, encoder: str, name: str
    ) -> torch.Tensor:
        parts, order = [], []
        for shard in np.unique(shards):
            where = np.nonzero(shards == shard)[0]
            source = self._file(int(shard), encoder)[name]
            parts.append(source.index_select(0, torch.from_numpy(rows[where].astype(np.int64))))
            order.append(where)
        gathered = torch.cat(parts) if len(parts) > 1 else parts[0]
        if len(parts) > 1:  # back to the batch's own order
            gathered = gathered[torch.from_numpy(np.argsort(np.concatenate(order)))]
        return gathered

    def batch(self, indices: list[int], variants: list[str]) -> Batch:
        index = np.asarray(indices, dtype=np.int64)
        cols = self.columns
        shards = cols["shard"][index]
        heights, widths = cols["bucket_h"][index], cols["bucket_w"][index]
        if len(set(zip(heights.tolist(), widths.tolist()))) > 1:
            raise ValueError(
                "latents of different sizes in one batch; batch within reader.bucket(i)"
            )
        synthetic = np.asarray([v == "synthetic" for v in variants])
        text_rows = np.where(synthetic, cols["text_row_synthetic"][index], cols["text_row"][index])
        if (text_rows < 0).any():
            raise KeyError("a sample without a synthetic caption was given the synthetic variant")
        latents = self._gather(
            shards, cols["latent_row"][index], "vae", f"latents_{heights[0]}x{widths[0]}"
        )
        text = {
            name: self._gather(shards, text_rows, encoder, name)
            for encoder, names in _TEXT_FIELDS.items()
            for name in names
        }
        return Batch(
            ids=[self.ids[i] for i in indices],
            latents=latents.float(),
            text=TextEncoding(**text).to(torch.float32),
            variants=list(variants),
        )
