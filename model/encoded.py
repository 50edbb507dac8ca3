"""Random access to a pre-encoded set (`t2i precompute` output), for training and DPO.

    ds = EncodedDataset(encoded_dir)
    len(ds); ds.ids -> list[str]; ds.has_synthetic(i) -> bool
    ds.sample(i, variant="original" | "synthetic")
        -> {"id": str, "latents": Tensor[C, h, w], "text": TextEncoding, "variant": str}
    ds[i] == ds.sample(i, "original")
    ds.empty_text() -> TextEncoding       # the empty prompt, encoded once per set
    ds.bucket(i) -> (h, w)                # latent size, for batching within a bucket
    ds.bucket_indices() -> {(h, w): [i, ...]}
    ds.info -> manifest extra.info: model dir, resolution, t5_length, text dims, latent
               channels, vae scaling_factor / shift_factor, latent_mode, dtype, buckets
    collate(list_of_samples) -> {"ids", "latents" [B, C, h, w], "text": TextEncoding [B, ...], "variants"}

Tensors come back in the stored 16-bit dtype (t5_mask as bool); latents are already shifted
and scaled (model/encoders.py), and `joint_condition(sample["text"])` gives exactly what
`StableDiffusion3Pipeline.encode_prompt` computes for that caption. Shards are opened with
safetensors' `safe_open` (memory-mapped): reading a sample copies only its rows, never a
whole shard. Handles are opened lazily per process, so the dataset works in DataLoader workers.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from curate.runtime.store import StoreError, load_samples, require_store
from model.conditioning import TextEncoding
from model.shards import EMPTY, SHARDS, STAGE, latent_key, shard_file

VARIANTS = ("original", "synthetic")
_COLUMNS = ("shard", "bucket_h", "bucket_w", "latent_row", "text_row", "text_row_synthetic")


class EncodedDataset(torch.utils.data.Dataset):
    """A pre-encoded set, read at random without loading whole shards (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, max_open_files: int = 64) -> None:
        self.directory = Path(directory)
        manifest = require_store(self.directory)
        if manifest.stage != STAGE:
            raise StoreError(
                f"{directory} is a {manifest.stage!r} output, not a pre-encoded set; "
                "run `t2i precompute IN OUT --model MODEL_DIR` and pass OUT"
            )
        self.info: dict[str, Any] = manifest.extra["info"]
        table = load_samples(self.directory).data
        self.ids: list[str] = table.column("id").to_pylist()
        self._cols = {name: table.column(name).to_numpy() for name in _COLUMNS}
        self._max_open = max_open_files
        self._handles: OrderedDict[str, Any] = OrderedDict()
        self._empty: TextEncoding | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.sample(index, "original")

    def has_synthetic(self, index: int) -> bool:
        return bool(self._cols["text_row_synthetic"][index] >= 0)

    def bucket(self, index: int) -> tuple[int, int]:
        return int(self._cols["bucket_h"][index]), int(self._cols["bucket_w"][index])

    def bucket_indices(self) -> dict[tuple[int, int], list[int]]:
        groups: dict[tuple[int, int], list[int]] = {}
        for i in range(len(self)):
            groups.setdefault(self.bucket(i), []).append(i)
        return groups

    def sample(self, index: int, variant: str = "original") -> dict[str, Any]:
        if variant not in VARIANTS:
            raise ValueError(f"unknown caption variant {variant!r}; use 'original' or 'synthetic'")
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} encoded samples")
        index = index % len(self)
        row = int(self._cols["text_row" if variant == "original" else "text_row_synthetic"][index])
        if row < 0:
            raise KeyError(
                f"sample {self.ids[index]} has no synthetic caption; check has_synthetic(i) first "
                "(captioning.mixing.caption_variant does when given has_synthetic)"
            )
        shard = int(self._cols["shard"][index])
        h, w = self.bucket(index)
        latents = self._row(
            shard_file(shard, "vae"), latent_key(h, w), int(self._cols["latent_row"][index])
        )
        return {
            "id": self.ids[index],
            "latents": latents,
            "text": self._text(shard, row),
            "variant": variant,
        }

    def empty_text(self) -> TextEncoding:
        if self._empty is None:
            self._empty = self._text(EMPTY, 0)
        return self._empty

    def _text(self, shard: int | str, row: int) -> TextEncoding:
        fields = {}
        for encoder, names in (
            ("clip_l", ("clip_l", "clip_l_pooled")),
            ("clip_g", ("clip_g", "clip_g_pooled")),
            ("t5", ("t5", "t5_mask")),
        ):
            for name in names:
                fields[name] = self._row(shard_file(shard, encoder), name, row)
        return TextEncoding(**fields)

    def _row(self, file: str, tensor: str, row: int) -> torch.Tensor:
        # get_slice gives a view into the mapped file; clone copies just this row's pages, so a
        # returned tensor never pins (or ships to another process) a whole shard.
        return self._handle(file).get_slice(tensor)[row : row + 1][0].clone()

    def _handle(self, file: str) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            path = self.directory / SHARDS / file
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} is missing; {self.directory} is incomplete, rerun `t2i precompute`"
                )
            handle = self._handles[file] = safe_open(str(path), framework="pt")
            if len(self._handles) > self._max_open:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(file)
        return handle

    def __getstate__(self) -> dict[str, Any]:  # open handles stay in the process that opened them
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()
        return state


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples of one latent bucket into a batch."""
    shapes = {tuple(s["latents"].shape) for s in samples}
    if len(shapes) > 1:
        raise ValueError(
            f"latents of different sizes {sorted(shapes)} in one batch; batch within ds.bucket(i)"
        )
    return {
        "ids": [s["id"] for s in samples],
        "latents": torch.stack([s["latents"] for s in samples]),
        "text": TextEncoding.stack([s["text"] for s in samples]),
        "variants": [s["variant"] for s in samples],
    }
