"""Pre-encode preference pairs once: VAE latents of both images and the caption's text encodings.

The DPO loop then never runs an encoder. A pair is encoded exactly as the pre-encoding stage
encodes a training sample (centre crop to the training resolution, VAE mean latent with the
VAE's shift and scaling factors, CLIP-L/CLIP-G penultimate states + pooled, T5 last states).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from model.conditioning import TextEncoding


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
        text = TextEncoding(**{k: v[index] for k, v in vars(self.text).items()})
        return EncodedPairs(
            [self.ids[i] for i in index.tolist()],
            self.latents_w[index],
            self.latents_l[index],
            text,
        )


def native_resolution(pipe: StableDiffusion3Pipeline) -> int:
    return pipe.transformer.config.sample_size * pipe.vae_scale_factor


def image_tensor(data: bytes, resolution: int) -> torch.Tensor:
    """[3, R, R] in [-1, 1]: EXIF-orient, RGB, resize the short side to R, centre crop."""
    with Image.open(io.BytesIO(data)) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        image = ImageOps.fit(image, (resolution, resolution), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


@torch.no_grad()
def encode_images(pipe: StableDiffusion3Pipeline, images: torch.Tensor) -> torch.Tensor:
    """VAE mean latents, shifted and scaled as the SD3 transformer sees them."""
    vae = pipe.vae
    moments = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean
    shift = vae.config.shift_factor or 0.0
    return ((moments - shift) * vae.config.scaling_factor).float().cpu()


@torch.no_grad()
def encode_captions(
    pipe: StableDiffusion3Pipeline, captions: list[str], max_sequence_length: int
) -> TextEncoding:
    device = pipe.text_encoder.device
    clip_l, clip_l_pooled = pipe._get_clip_prompt_embeds(
        captions, device=device, clip_model_index=0
    )
    clip_g, clip_g_pooled = pipe._get_clip_prompt_embeds(
        captions, device=device, clip_model_index=1
    )
    t5 = pipe._get_t5_prompt_embeds(
        captions, max_sequence_length=max_sequence_length, device=device
    )
    mask = pipe.tokenizer_3(
        captions,
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        return_tensors="pt",
    ).attention_mask
    return TextEncoding(clip_l, clip_l_pooled, clip_g, clip_g_pooled, t5, mask).to(
        "cpu", torch.float32
    )


def encode_pairs(
    pipe: StableDiffusion3Pipeline,
    rows,
    resolution: int,
    max_sequence_length: int,
    batch: int = 8,
) -> EncodedPairs:
    """Encode a preference table (id, caption, image_w, image_l) in batches."""
    ids, lat_w, lat_l, texts = [], [], [], []
    for start in tqdm(
        range(0, len(rows), batch), desc="encoding pairs", unit="batch", disable=len(rows) <= batch
    ):
        chunk = rows[start : start + batch]
        ids += chunk["id"]
        lat_w.append(
            encode_images(
                pipe, torch.stack([image_tensor(b, resolution) for b in chunk["image_w"]])
            )
        )
        lat_l.append(
            encode_images(
                pipe, torch.stack([image_tensor(b, resolution) for b in chunk["image_l"]])
            )
        )
        texts.append(encode_captions(pipe, list(chunk["caption"]), max_sequence_length))
    if not ids:
        raise ValueError(
            "the preference table has no pairs left to train on (see its rejected/ table)"
        )
    text = TextEncoding(**{k: torch.cat([getattr(t, k) for t in texts]) for k in vars(texts[0])})
    return EncodedPairs(ids, torch.cat(lat_w), torch.cat(lat_l), text)
