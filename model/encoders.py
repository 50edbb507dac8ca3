"""SD3's frozen encoders, loaded from a local diffusers folder one at a time (paper section 5.3.1).

Each encoder maps a batch to named tensors, exactly as `StableDiffusion3Pipeline` computes them:

    "vae"     images [B, 3, H, W] in [-1, 1] -> latents [B, C, H/f, W/f]
              = (latent_dist.mean - shift_factor) * scaling_factor
    "clip_l"  captions -> clip_l [B, 77, d] (hidden_states[-2]), clip_l_pooled [B, p] (text_embeds)
    "clip_g"  captions -> clip_g, clip_g_pooled (same, with text_encoder_2)
    "t5"      captions -> t5 [B, L, d] (last hidden state, run WITHOUT an attention mask as the
              pipeline does), t5_mask [B, L] (the tokenizer's mask, stored for reference); for a
              T5-less folder (text_encoder_3 null) zeros [B, L, joint_attention_dim] and an
              all-False mask, what the pipeline feeds without T5 (and what SD3's encoder drop trains)

Latents use the posterior mean, not a sample: pre-encoded latents are reused every epoch, so a
frozen noise draw would be baked into the data, and the mean makes encoding deterministic (a
resumed run reproduces an uninterrupted one bit for bit). Factors come from the VAE config;
`shift_factor` None (SD1/SDXL-style VAEs) means 0.

Public helpers for other stages (DPO encodes preference pairs with them):

    encode_texts(model_dir, captions, t5_length=77) -> TextEncoding (batched, float32)
    encode_images(model_dir, images, resolution=256) -> latents [N, C, h, w] (float32)

Components load through model.build.load_component (`variant="fp16"` picks *.fp16.safetensors).

Both load one encoder, run it over everything in batches, release it, then load the next.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from curate.runtime.options import resolve_device
from model.buckets import center_crop_resize
from model.conditioning import TextEncoding
from model.folders import MissingModelFile, has_t5, load_component, model_index, t5_width

TEXT_ENCODERS = ("clip_l", "clip_g", "t5")
ENCODERS = ("vae", *TEXT_ENCODERS)
# Which pipeline components each encoder name uses.
COMPONENTS = {
    "clip_l": ("text_encoder", "tokenizer"),
    "clip_g": ("text_encoder_2", "tokenizer_2"),
    "t5": ("text_encoder_3", "tokenizer_3"),
    "vae": ("vae", None),
}
# Tensor fields each encoder produces (TextEncoding field names for the text encoders).
FIELDS = {
    "vae": ("latents",),
    "clip_l": ("clip_l", "clip_l_pooled"),
    "clip_g": ("clip_g", "clip_g_pooled"),
    "t5": ("t5", "t5_mask"),
}
LATENT_MODE = "mean"  # latent_dist.mean, see the module docstring


def read_config(model_dir: str | os.PathLike, component: str) -> dict[str, Any]:
    """A component's config.json (no weights loaded)."""
    path = Path(model_dir) / component / "config.json"
    if not path.is_file():
        raise MissingModelFile(
            f"{path} is missing; {model_dir} is not a complete SD3 diffusers folder"
        )
    return json.loads(path.read_text())


def encoder_dims(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Every width and factor pre-encoding needs, read from the component configs."""
    model_index(model_dir)
    clip_l, clip_g = (
        read_config(model_dir, "text_encoder"),
        read_config(model_dir, "text_encoder_2"),
    )
    vae = read_config(model_dir, "vae")
    transformer = Path(model_dir) / "transformer" / "config.json"
    patch = json.loads(transformer.read_text()).get("patch_size", 2) if transformer.is_file() else 2
    return {
        "clip_l": clip_l["hidden_size"],
        "clip_l_pooled": clip_l["projection_dim"],
        "clip_g": clip_g["hidden_size"],
        "clip_g_pooled": clip_g["projection_dim"],
        "clip_tokens": clip_l.get("max_position_embeddings", 77),
        "t5": t5_width(model_dir),
        "t5_encoder": "present" if has_t5(model_dir) else "absent (zeros, as the pipeline feeds)",
        "latent_channels": vae["latent_channels"],
        "vae_scale_factor": 2 ** (len(vae["block_out_channels"]) - 1),
        "patch_size": patch,
        "scaling_factor": vae.get("scaling_factor", 1.0),
        "shift_factor": vae.get("shift_factor"),
    }


class Encoder:
    """One loaded encoder: `encoder(batch) -> {field: tensor}` (see the module docstring)."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        name: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        t5_length: int = 77,
        variant: str | None = None,
    ) -> None:
        if name not in ENCODERS:
            raise ValueError(f"unknown encoder {name!r}; use one of {', '.join(ENCODERS)}")
        self.name, self.device, self.dtype, self.t5_length = (
            name,
            torch.device(resolve_device(str(device))),
            dtype,
            t5_length,
        )
        module_name, tokenizer_name = COMPONENTS[name]
        self.module, self.tokenizer = None, None
        if name == "t5" and not has_t5(model_dir):
            # T5-less folder: zeros [B, t5_length, width], as StableDiffusion3Pipeline feeds
            self.zeros_width = t5_width(model_dir)
            return
        self.module = load_component(model_dir, module_name, variant, dtype)
        self.module.to(self.device).eval().requires_grad_(False)
        if tokenizer_name is not None:
            self.tokenizer = load_component(model_dir, tokenizer_name)
        if name == "vae":
            del self.module.decoder  # encoding needs only the encoder half
            config = self.module.config
            self.scaling_factor = config.scaling_factor
            self.shift_factor = (
                config.shift_factor if getattr(config, "shift_factor", None) is not None else 0.0
            )

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor | Sequence[str]) -> dict[str, torch.Tensor]:
        if self.name == "vae":
            return {"latents": self._encode_images(batch)}
        if self.name == "t5":
            return self._encode_t5(list(batch))
        return self._encode_clip(list(batch))

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        z = self.module.encode(pixels.to(self.device, self.dtype)).latent_dist.mean
        return (z - self.shift_factor) * self.scaling_factor

    def _encode_clip(self, captions: list[str]) -> dict[str, torch.Tensor]:
        # StableDiffusion3Pipeline._get_clip_prompt_embeds: pad to 77, no attention mask.
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        out = self.module(ids.to(self.device), output_hidden_states=True)
        return {self.name: out.hidden_states[-2], f"{self.name}_pooled": out.text_embeds}

    def _encode_t5(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self.module is None:  # no T5: zeros, and a mask of no tokens
            shape = (len(captions), self.t5_length)
            zeros = torch.zeros(*shape, self.zeros_width, device=self.device, dtype=self.dtype)
            return {"t5": zeros, "t5_mask": torch.zeros(shape, dtype=torch.bool)}
        # StableDiffusion3Pipeline._get_t5_prompt_embeds: pad to max_sequence_length, no mask.
        tokens = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.t5_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        hidden = self.module(tokens.input_ids.to(self.device))[0]
        return {"t5": hidden, "t5_mask": tokens.attention_mask.to(torch.bool)}

    def release(self) -> None:
        device = self.device
        del self.module, self.tokenizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


@contextmanager
def loaded(model_dir: str | os.PathLike, name: str, **kwargs: Any) -> Iterator[Encoder]:
    """Load one encoder for the duration of a block, then free its memory."""
    encoder = Encoder(model_dir, name, **kwargs)
    try:
        yield encoder
    finally:
        encoder.release()


def to_pixels(image: Image.Image) -> torch.Tensor:
    """[3, H, W] float32 in [-1, 1], the VAE's input range."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def pixels_from_images(images: Sequence[Image.Image], size: tuple[int, int]) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1]: each image resized to cover (H, W) and center-cropped."""
    return torch.stack([to_pixels(center_crop_resize(im.convert("RGB"), size)[0]) for im in images])


def encode_images(
    model_dir: str | os.PathLike,
    images: Sequence[Image.Image],
    resolution: int = 256,
    size: tuple[int, int] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
    progress: bool = True,
    variant: str | None = None,
) -> torch.Tensor:
    """VAE latents [N, C, H/f, W/f] (after shift and scaling) of PIL images.

    Each image is center-cropped to a square `resolution` (or to `size` = (H, W) pixels), the
    same preprocessing `t2i precompute` applies without buckets.
    """
    size = size or (resolution, resolution)
    out = []
    with loaded(model_dir, "vae", device=device, dtype=dtype, variant=variant) as vae:
        for start in tqdm(range(0, len(images), batch_size), desc="vae", disable=not progress):
            batch = pixels_from_images(images[start : start + batch_size], size)
            out.append(vae(batch)["latents"].float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def encode_texts(
    model_dir: str | os.PathLike,
    captions: Sequence[str],
    t5_length: int = 77,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 32,
    progress: bool = True,
    variant: str | None = None,
) -> TextEncoding:
    """CLIP-L, CLIP-G and T5 encodings of captions, batched [N, ...], as the SD3 pipeline computes them."""
    if not captions:
        raise ValueError('encode_texts needs at least one caption (use "" for the empty prompt)')
    fields: dict[str, list[torch.Tensor]] = {}
    for name in TEXT_ENCODERS:
        kwargs = {"device": device, "dtype": dtype, "t5_length": t5_length, "variant": variant}
        with loaded(model_dir, name, **kwargs) as encoder:
            for start in tqdm(range(0, len(captions), batch_size), desc=name, disable=not progress):
                for key, value in encoder(captions[start : start + batch_size]).items():
                    fields.setdefault(key, []).append(
                        value.cpu() if key == "t5_mask" else value.float().cpu()
                    )
    return TextEncoding(**{key: torch.cat(values) for key, values in fields.items()})
