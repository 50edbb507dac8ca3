"""Batches of a pre-encoded set, as a pure function of (seed, micro-batch index).

A resumed run must see exactly the batches the uninterrupted run would have seen, so there is no
data-loader state at all: the order of epoch e is a permutation seeded by (seed, e), samples are
grouped by latent size (bucket) so a batch stacks, and the caption variant of each sample is the
captioning stage's hash-based choice for (seed, step, id). Works with any reader that follows
`model.encoded.EncodedDataset`'s contract (ids, bucket(i), has_synthetic(i), sample(i, variant)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from captioning.mixing import caption_variant
from curate.seeds import seed_int, seed_unit
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
        return Batch(self.ids, self.latents.to(device), self.text.to(device), self.variants)


def split_indices(
    ids: list[str], val_fraction: float, val_max: int, seed: int = 0
) -> tuple[list[int], list[int]]:
    """(train, validation) indices; membership hangs on each id's hash, not on the set's order."""
    if not ids:
        raise ValueError("the encoded set is empty: nothing to train on")
    n_val = min(val_max, math.ceil(val_fraction * len(ids))) if val_fraction > 0 else 0
    n_val = min(n_val, len(ids) - 1)  # always keep one sample to train on
    ranked = sorted(range(len(ids)), key=lambda i: seed_unit("val", seed, ids[i]))
    val = sorted(ranked[:n_val])
    train = sorted(ranked[n_val:])
    return train, val


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
    """Stack samples; each one's caption variant is the mixing policy's choice for this step."""
    items = []
    for i in indices:
        sample_id = reader.ids[i]
        variant = caption_variant(
            sample_id, step, seed, p_synthetic, has_synthetic=reader.has_synthetic(i)
        )
        items.append(reader.sample(i, variant=variant))
    return Batch(
        ids=[item["id"] for item in items],
        latents=torch.stack([item["latents"] for item in items]).float(),
        text=TextEncoding.stack([item["text"] for item in items]).to(torch.float32),
        variants=[item["variant"] for item in items],
    )
