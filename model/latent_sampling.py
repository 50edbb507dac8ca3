"""Sampling from pre-encoded captions: no text encoders loaded (T5-XXL alone is ~10 GB).

Used for the trainer's sample grids and for measuring what a trained model learned.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from model import rectified_flow as rf
from model.conditioning import TextEncoding
from model.objective import predict_velocity


@torch.no_grad()
def sample_latents(
    transformer: torch.nn.Module,
    text: TextEncoding,
    negative: TextEncoding,
    seeds: list[int],
    shape: tuple[int, int, int],
    steps: int = 28,
    shift: float = 3.0,
    guidance: float = 7.0,
) -> torch.Tensor:
    """Euler-integrate the learned flow from seeded noise for each batched caption, with
    classifier-free guidance against the `negative` (empty-prompt) encoding."""
    param = next(transformer.parameters())
    device, dtype = param.device, param.dtype
    noise = torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )
    noise = noise.to(device, dtype)
    batch = len(seeds)
    text = text.to(device, dtype)
    uncond = TextEncoding.stack([negative] * batch).to(device, dtype)

    def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guidance == 1.0:
            return predict_velocity(transformer, z, t, text)
        both = TextEncoding.stack([uncond, text])  # [2, B, ...] -> flatten below
        both = TextEncoding(**{k: v.flatten(0, 1) for k, v in vars(both).items()})
        v_uncond, v_cond = predict_velocity(
            transformer, torch.cat([z, z]), torch.cat([t, t]), both
        ).chunk(2)
        return v_uncond + guidance * (v_cond - v_uncond)

    return rf.euler_sample(velocity, noise, steps=steps, shift=shift).float()


@torch.no_grad()
def decode_latents(vae: torch.nn.Module, latents: torch.Tensor) -> list[Image.Image]:
    """Undo the VAE's shift and scaling factors, decode, and convert to PIL images."""
    config = vae.config
    param = next(vae.parameters())
    latents = latents.to(param.device, param.dtype) / config.scaling_factor + (
        config.shift_factor or 0.0
    )
    pixels = vae.decode(latents, return_dict=False)[0]
    pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]


def save_grid(images: list[Image.Image], path: Path, columns: int | None = None) -> Path:
    if not images:
        raise ValueError("no images to put in a grid")
    columns = columns or len(images)
    rows = -(-len(images) // columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h))
    for k, image in enumerate(images):
        grid.paste(image, ((k % columns) * w, (k // columns) * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
