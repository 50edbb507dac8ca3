"""A local CLIP image tower: L2-normalised image embeddings from a folder, never from a hub.

Shared by the LAION aesthetic predictor v2, LAION's CLIP NSFW head and the `clip` dedup
embedder. The folder may hold a full `CLIPModel` or a `CLIPVisionModelWithProjection`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

# A 2-layer, 32 px CLIP image tower with 16-d embeddings: the offline stand-in tests use.
TINY_CLIP_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=16,
)


def init_clip_vision(folder: str | Path, **config) -> Path:
    """Save a random-weight (seed 0) CLIPVisionModelWithProjection built from CONFIG (fields of
    CLIPVisionConfig) and its image processor to FOLDER: a local CLIP for tests and benchmarks."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(folder)
    torch.manual_seed(0)
    vision = CLIPVisionConfig(**config)
    CLIPVisionModelWithProjection(vision).save_pretrained(folder)
    side = vision.image_size
    CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    ).save_pretrained(folder)
    return folder


def require_folder(path: str | None, option: str, what: str) -> Path:
    if not path:
        raise ValueError(f"{what} needs a local folder or file: pass --{option.replace('_', '-')}")
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{what}: {folder} does not exist (--{option.replace('_', '-')})")
    return folder


def image_processor(folder: Path, fallback_size: int):
    """The folder's own image processor, or CLIP's standard preprocessing at the model's size."""
    from transformers import AutoImageProcessor, CLIPImageProcessor

    if (folder / "preprocessor_config.json").is_file():
        return AutoImageProcessor.from_pretrained(str(folder))
    return CLIPImageProcessor(
        size={"shortest_edge": fallback_size},
        crop_size={"height": fallback_size, "width": fallback_size},
    )


class ClipImageEmbedder:
    """CLIP image embeddings (projection output), L2-normalised: [B, projection_dim]."""

    def __init__(self, folder: str | None, device: str = "cpu") -> None:
        from transformers import CLIPVisionModelWithProjection

        path = require_folder(folder, "clip_model", "a CLIP image embedder")
        self.model = CLIPVisionModelWithProjection.from_pretrained(str(path)).to(device).eval()
        self.processor = image_processor(path, self.model.config.image_size)
        self.device = device
        self.dim = int(self.model.config.projection_dim)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        embeds = self.model(pixel_values=pixels).image_embeds.float()
        return torch.nn.functional.normalize(embeds, dim=-1).cpu().numpy()
