"""Preference pairs on disk in the pre-encoding shard format, and a streaming reader over them.

`encode_pairs` turns a preference table into a `t2i precompute` output (the layout of
model/shards.py, written by model/precompute.py itself): each pair contributes two samples,
`<pair id>.w` (the winner) and `<pair id>.l` (the loser), both with the pair's caption, so the
latents are exactly what `t2i train` would see for those images. The stage is precompute's, so
it streams the table shard by shard and a killed encode continues at the first missing
(shard, encoder) file. The cost of reusing the format is that each caption is encoded twice.

`EncodedPairSet` reads pairs back through model.encoded.EncodedDataset (memory-mapped
safetensors): selecting a batch copies only that batch's rows, so memory is flat in the number
of pairs. `EncodedPairs` is one batch (or a small in-memory set, as dpo/proof.py builds).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import datasets
import numpy as np
import torch

from curate.runtime.store import Manifest, fingerprint, is_done, load_samples
from curate.runtime.store_writer import StageWriter
from model.conditioning import TextEncoding
from model.encoders import encoder_dims, read_config

WINNER, LOSER = ".w", ".l"
IMAGES_STAGE = "pair-images"
IMAGE_FEATURES = datasets.Features(
    {"id": datasets.Value("string"), "image": datasets.Image(), "caption": datasets.Value("string")}
)


@dataclass
class EncodedPairs:
    ids: list[str]
    latents_w: torch.Tensor  # [N, C, h, w]
    latents_l: torch.Tensor  # [N, C, h, w]
    text: TextEncoding  # batch dim N

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, index: torch.Tensor | list[int]) -> EncodedPairs:
        index = torch.as_tensor(index, dtype=torch.long)
        text = TextEncoding(
            **{f.name: getattr(self.text, f.name)[index] for f in fields(TextEncoding)}
        )
        return EncodedPairs(
            [self.ids[i] for i in index.tolist()],
            self.latents_w[index],
            self.latents_l[index],
            text,
        )

    subset = select  # in memory, a subset is a selection


class EncodedPairSet:
    """The pairs of an `encode_pairs` output, read on demand (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        from model.encoded import EncodedDataset

        self.directory = Path(directory)
        self.data = EncodedDataset(self.directory)
        position = {sample: i for i, sample in enumerate(self.data.ids)}
        pairs = [
            (i, position[sample[: -len(WINNER)] + LOSER])
            for i, sample in enumerate(self.data.ids)
            if sample.endswith(WINNER) and sample[: -len(WINNER)] + LOSER in position
        ]
        # [N, 2]: each pair's winner and loser sample index (a pair missing a side is skipped:
        # precompute rejected that image, and its reason is in the encoded set's rejected/)
        self._rows = np.array(pairs, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def ids(self) -> list[str]:
        return [self.data.ids[w][: -len(WINNER)] for w in self._rows[:, 0].tolist()]

    def subset(self, index: list[int]) -> EncodedPairSet:
        view = EncodedPairSet.__new__(EncodedPairSet)
        view.directory, view.data, view._rows = self.directory, self.data, self._rows[index]
        return view

    def select(self, index: torch.Tensor | list[int]) -> EncodedPairs:
        """Load the chosen pairs (fp32 latents, fp32 text with a bool mask) as one batch."""
        rows = self._rows[torch.as_tensor(index, dtype=torch.long).numpy()]
        winners = [self.data.sample(int(w)) for w in rows[:, 0]]
        losers = [self.data.sample(int(loser))["latents"] for loser in rows[:, 1]]
        text = TextEncoding.stack([s["text"] for s in winners])
        text = TextEncoding(**{f.name: _float(getattr(text, f.name)) for f in fields(TextEncoding)})
        return EncodedPairs(
            [s["id"][: -len(WINNER)] for s in winners],
            torch.stack([s["latents"] for s in winners]).float(),
            torch.stack(losers).float(),
            text,
        )


def _float(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


def native_resolution(model_dir: str | os.PathLike) -> int:
    """The transformer's sample size in pixels (latent side x VAE downsampling)."""
    return (
        read_config(model_dir, "transformer")["sample_size"]
        * encoder_dims(model_dir)["vae_scale_factor"]
    )


def pair_images(table_dir: Path, output: Path) -> Path:
    """The preference table as an image table precompute reads: rows `<id>.w` and `<id>.l`."""
    fp = fingerprint(table_dir)
    if is_done(output, IMAGES_STAGE, {}, fp):
        return output
    table = load_samples(table_dir)

    def rows():
        for pair in table:
            for suffix, column in ((WINNER, "image_w"), (LOSER, "image_l")):
                image = {"bytes": pair[column], "path": None}
                yield {"id": pair["id"] + suffix, "image": image, "caption": pair["caption"]}

    with StageWriter(output, IMAGES_STAGE, {}, fp) as writer:
        writer.write_samples(rows(), IMAGE_FEATURES)
        writer.counts["images"] = 2 * table.num_rows
    return output


def encode_pairs(
    model_dir: str | os.PathLike,
    table_dir: str | os.PathLike,
    output: str | os.PathLike,
    resolution: int,
    t5_length: int,
    device: str = "cpu",
    compute_dtype: str = "fp32",
    shard_size: int = 256,
    variant: str | None = None,
) -> EncodedPairSet:
    """Encode a preference table (id, caption, image_w, image_l) once into OUTPUT; resumable."""
    from model.config import PrecomputeConfig
    from model.precompute import run_precompute

    output = Path(output)
    config = PrecomputeConfig(
        model=str(model_dir),
        resolution=resolution,
        t5_length=t5_length,
        device=device,
        compute_dtype=compute_dtype,
        shard_size=shard_size,
        variant=variant,
    )
    key = {"table": fingerprint(table_dir), "model": fingerprint(model_dir), **config.model_dump()}
    record = output.parent / f"{output.name}.source.json"
    manifest = Manifest.read(output) if output.is_dir() else None
    if manifest is None or not record.is_file() or json.loads(record.read_text()) != key:
        if load_samples(table_dir).num_rows == 0:
            raise ValueError(
                "the preference table has no pairs left to train on (see its rejected/ table)"
            )
        images = pair_images(Path(table_dir), output.parent / f"{output.name}-images")
        run_precompute(images, output, config)
        record.write_text(json.dumps(key))
        shutil.rmtree(images)  # the encoded set is what DPO reads; the copy of the bytes can go
    pairs = EncodedPairSet(output)
    if len(pairs) == 0:
        raise ValueError(f"no pair of {table_dir} could be encoded (see {output}/rejected)")
    return pairs
