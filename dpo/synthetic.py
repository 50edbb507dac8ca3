"""Synthetic preference pairs with a measurable attribute (`t2i make-prefs`).

From each source image, one random crop is edited two ways: the winner gets the attribute and
the loser its opposite ('warm': a red tint vs a blue tint; 'bright': brightened vs darkened).
`attribute_score` measures the attribute on any image, so a test can check that the winners
have it and, after DPO, whether samples have more of it.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

from curate.decode import normalise, to_rgb
from curate.stage_runtime import StageRun
from curate.store import Manifest, load_samples
from dpo.config import MakePrefsConfig
from dpo.ingest import IMAGE_SUFFIXES

STAGE = "make-prefs"


def attribute_score(image: Image.Image, attribute: str) -> float:
    """'warm': mean red minus mean blue; 'bright': mean luminance; both in [-1, 1] / [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if attribute == "warm":
        return float(array[..., 0].mean() - array[..., 2].mean())
    if attribute == "bright":
        return float((array @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).mean())
    raise ValueError(f"unknown attribute {attribute!r}; choose warm or bright")


def edit(image: Image.Image, attribute: str, strength: float, positive: bool) -> Image.Image:
    """Push the image towards (positive) or away from the attribute."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    sign = 1.0 if positive else -1.0
    if attribute == "warm":
        array[..., 0] = array[..., 0] * (1 - strength) + strength * (sign > 0)
        array[..., 2] = array[..., 2] * (1 - strength) + strength * (sign < 0)
    elif attribute == "bright":
        array = array * (1 - strength) + strength * (sign > 0)
    else:
        raise ValueError(f"unknown attribute {attribute!r}; choose warm or bright")
    return Image.fromarray((array.clip(0, 1) * 255).round().astype(np.uint8))


def random_crop(image: Image.Image, rng: random.Random) -> Image.Image:
    side = min(image.size)
    crop = int(side * rng.uniform(0.6, 1.0))
    left, top = rng.randint(0, image.width - crop), rng.randint(0, image.height - crop)
    return image.crop((left, top, left + crop, top + crop))


def store_images(store: Path) -> tuple[list[tuple[str, Image.Image, str]], list[str]]:
    """(id prefix, image, caption) for every row of a stage output with `image` and `caption` columns."""
    usable = []
    for row in load_samples(store):
        data = row["image"]["bytes"] if isinstance(row["image"], dict) else row["image"]
        # datasets may decode Image columns to PIL
        image = to_rgb(data) if isinstance(data, (bytes, bytearray)) else normalise(data)
        usable.append((row["id"][:16], image, (row.get("caption") or "").strip() or "an image"))
    return usable, []


def source_images(folder: Path) -> tuple[list[tuple[str, Image.Image, str]], list[str]]:
    """(name, image, caption) for every decodable image in FOLDER (or stage output); names that did not decode."""
    if Manifest.read(folder) is not None:
        return store_images(folder)
    usable, skipped = [], []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            image = to_rgb(path.read_bytes())
        except ValueError:  # to_rgb names every way a file can fail to decode
            skipped.append(path.name)
            continue
        if min(image.size) < 16:
            skipped.append(path.name)
            continue
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else ""
        usable.append((path.stem, image, caption or path.stem.replace("_", " ")))
    return usable, skipped


def make_prefs(output: str | os.PathLike, config: MakePrefsConfig) -> Path:
    source, output = Path(config.source), Path(output)
    if not source.is_dir():
        raise FileNotFoundError(f"--source {source} is not a folder of images or a stage output")
    with StageRun(output, STAGE, config, {"source": source}) as run:
        if run.finished:
            return run.skip()
        images, skipped = source_images(source)
        if not images:
            raise ValueError(f"no decodable image in {source}")
        rng = random.Random(config.seed)
        with run.writer(tables=False) as writer:
            count = 0
            for name, image, caption in images:
                for k in range(config.pairs_per_image):
                    crop = random_crop(image, rng)
                    good = edit(crop, config.attribute, config.strength, positive=not config.swap)
                    bad = edit(crop, config.attribute, config.strength, positive=config.swap)
                    pair = writer.path / f"{name}-{k:02d}"
                    pair.mkdir(exist_ok=True)
                    good.save(pair / "winner.png")
                    bad.save(pair / "loser.png")
                    (pair / "caption.txt").write_text((config.caption or caption) + "\n")
                    count += 1
            about = {"pairs": count, "skipped_sources": skipped, **config.model_dump()}
            (writer.path / "PAIRS.json").write_text(json.dumps(about, indent=2))
            writer.counts.update(
                input=len(images) + len(skipped),
                kept=len(images),
                rejected=len(skipped),
                pairs=count,
            )
    return output


def run_make_prefs(output: str, config: MakePrefsConfig) -> Path:
    """`t2i make-prefs`: see flows/cli.py."""
    return make_prefs(output, config)
