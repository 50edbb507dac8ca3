"""Small conditional sets for the trainer's tests and benchmarks, made by the real chain:
images + captions -> a captioned store (curate.runtime.store) -> `t2i precompute` -> EncodedDataset.

The shapes set: a red/green/blue/yellow circle or square at a random place and size on a dark
background, captioned "a {colour} {shape}", with a synthetic caption for two in three images.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageDraw

from curate.runtime.store_writer import StageWriter
from model.config import PrecomputeConfig
from model.precompute import run_precompute

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 60, 230),
    "yellow": (230, 220, 30),
}
SHAPES = ("circle", "square")
STORE_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "caption": datasets.Value("string"),
        "caption_synthetic": datasets.Value("string"),
    }
)


def shape_image(
    colour: str, shape: str, size: int, rng: np.random.Generator, solid: bool = False
) -> Image.Image:
    """A coloured circle or square on a dark background; `solid`: the whole image in the colour
    with pixel noise (the easiest conditional task)."""
    if solid:
        pixels = np.asarray(COLOURS[colour], dtype=np.float32) + rng.normal(0, 25, (size, size, 3))
        return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    image = Image.new("RGB", (size, size), (20, 20, 20))
    draw = ImageDraw.Draw(image)
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
    (draw.ellipse if shape == "circle" else draw.rectangle)(
        [cx - r, cy - r, cx + r, cy + r], fill=COLOURS[colour]
    )
    return image


def write_store(
    out: Path, images: list[Image.Image], captions: list[str], synthetic: list[str | None]
) -> Path:
    """A captioned store (the captioning stage's output format) holding these images as PNG."""
    rows = []
    for image, caption, synth in zip(images, captions, synthetic, strict=True):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        rows.append(
            {
                "id": hashlib.sha256(data).hexdigest(),
                "image": {"bytes": data, "path": None},
                "caption": caption,
                "caption_synthetic": synth,
            }
        )
    with StageWriter(out, "caption", {"synthetic_shapes": len(rows)}, "synthetic") as writer:
        writer.write_samples(rows, STORE_FEATURES)
    return Path(out)


def shapes_encoded(
    model_dir: str,
    out: Path,
    n: int,
    size: int = 32,
    seed: int = 0,
    colours: tuple[str, ...] = tuple(COLOURS),
    solid: bool = False,
    t5_length: int = 32,
) -> tuple[Path, dict[str, int]]:
    """Pre-encode n shapes with `t2i precompute`; returns the encoded dir and each id's colour index."""
    rng = np.random.default_rng(seed)
    images, captions, synthetic, labels = [], [], [], []
    for k in range(n):
        colour, shape = colours[k % len(colours)], SHAPES[(k // len(colours)) % len(SHAPES)]
        images.append(shape_image(colour, shape, size, rng, solid))
        captions.append(f"a {colour} {shape}")
        synthetic.append(
            f"a photo of a {shape} in {colour} on a dark background" if k % 3 else None
        )
        labels.append(colours.index(colour))
    store = write_store(Path(out) / "store", images, captions, synthetic)
    config = PrecomputeConfig(
        model=model_dir, resolution=size, t5_length=t5_length, shard_size=max(64, n)
    )
    encoded = run_precompute(store, Path(out) / "encoded", config)
    ids = [hashlib.sha256(_png(im)).hexdigest() for im in images]
    return encoded, dict(zip(ids, labels, strict=True))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
