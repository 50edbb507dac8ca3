"""Pre-encode preference pairs once with the pre-encoding stage's encoders (model/encoders.py).

Both images of a pair get VAE latents (centre crop to the training resolution, posterior mean,
the VAE's shift and scaling) and the caption gets CLIP-L, CLIP-G and T5 encodings, exactly as
`t2i precompute` encodes a training sample; the DPO loop then never runs an encoder.
Pairs are held in memory: fine for the thousands of pairs DPO uses, not for all of Pick-a-Pic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch
from PIL import Image
from tqdm.auto import tqdm

from curate.decode import decode_image
from model.conditioning import TextEncoding
from model.encoders import encode_images, encode_texts, encoder_dims, read_config


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


def native_resolution(model_dir: str | os.PathLike) -> int:
    """The transformer's sample size in pixels (latent side x VAE downsampling)."""
    return (
        read_config(model_dir, "transformer")["sample_size"]
        * encoder_dims(model_dir)["vae_scale_factor"]
    )


def decode(data: bytes) -> Image.Image:
    """Upright RGB under the pixel cap (curate.decode, the one decoder of every stage)."""
    return decode_image(data)


def encode_pairs(
    model_dir: str | os.PathLike,
    rows,
    resolution: int,
    t5_length: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    chunk: int = 1024,
) -> EncodedPairs:
    """Encode a preference table (id, caption, image_w, image_l), CHUNK pairs per encoder load."""
    if len(rows) == 0:
        raise ValueError(
            "the preference table has no pairs left to train on (see its rejected/ table)"
        )
    ids, lat_w, lat_l, texts = [], [], [], []
    for start in tqdm(
        range(0, len(rows), chunk), desc="encoding pairs", unit="chunk", disable=len(rows) <= chunk
    ):
        part = rows[start : start + chunk]
        images = [decode(b) for b in part["image_w"]] + [decode(b) for b in part["image_l"]]
        latents = encode_images(
            model_dir, images, resolution, device=device, dtype=dtype, progress=False
        )
        ids += part["id"]
        lat_w.append(latents[: len(part["id"])])
        lat_l.append(latents[len(part["id"]) :])
        texts.append(
            encode_texts(
                model_dir,
                list(part["caption"]),
                t5_length,
                device=device,
                dtype=dtype,
                progress=False,
            )
        )
    text = TextEncoding(
        **{f.name: torch.cat([getattr(t, f.name) for t in texts]) for f in fields(TextEncoding)}
    )
    return EncodedPairs(ids, torch.cat(lat_w), torch.cat(lat_l), text)
