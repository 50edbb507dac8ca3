"""Synthetic preference pairs with a measurable attribute (`t2i make-prefs`).

From each source image, one random crop is edited two ways: the winner gets the attribute and
the loser its opposite ('warm': a red tint vs a blue tint; 'bright': brightened vs darkened).
`attribute_score` measures the attribute on any image, so a test can check that the winners
have it and, after DPO, whether samples have more of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from curate.ingest import read_records
from curate.records import IngestOptions
from curate.runtime import reasons
from curate.runtime.decode import Invalid, decode_image
from curate.runtime.stage_runtime import StageRun
from dpo.config import MakePrefsConfig

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


def safe_name(key: str, used: set[str]) -> str:
    """A folder name for the source KEY that cannot leave OUT: [A-Za-z0-9._-] only, no leading dot.

    The file stem when it is already safe and unused (`astronaut.jpg` -> `astronaut`); otherwise
    the cleaned stem plus a short hash of KEY, so that `../../x` or two `a.jpg` in different
    sub-folders never share or escape a folder. The name is added to USED.
    """
    stem = PurePosixPath(key.replace("\\", "/").rsplit(":", 1)[-1]).name.rsplit(".", 1)[0]
    clean = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".-")[:80]
    if not clean or clean != stem or clean in used:
        clean = f"{clean or 'image'}-{hashlib.sha256(key.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
    used.add(clean)
    return clean


def source_images(folder: Path, skipped: dict[str, str]) -> Iterator[tuple[str, Image.Image, str]]:
    """(safe name, image, caption) for each usable image of FOLDER, one at a time.

    FOLDER is read by curate's ingest (an image folder, tar shards, parquet, a saved dataset or a
    stage output), so links out of the folder, path cells, hidden files and bad captions are
    refused there; images decode under the pixel cap. Every source that is not used lands in
    SKIPPED as {source key: "reason: detail"}.
    """
    used: set[str] = set()
    for record in read_records(folder, IngestOptions()):
        if record.refused:
            skipped[record.key] = f"{record.refused}: {record.detail}"
            continue
        try:
            image = decode_image(record.data)  # under curate.runtime.decode's pixel cap
        except Invalid as invalid:
            skipped[record.key] = f"{invalid.reason}: {invalid.detail}"
            continue
        if min(image.size) < 16:
            skipped[record.key] = f"{reasons.TOO_SMALL}: {image.width}x{image.height}, under 16 px"
            continue
        name = safe_name(record.key, used)
        yield name, image, record.caption or name.replace("_", " ")


def run_make_prefs(output: str | os.PathLike, config: MakePrefsConfig) -> Path:
    """Write pairs from --source into OUTPUT, atomically: a failed run leaves no OUTPUT behind.

    Sources are read and edited one at a time, so memory does not grow with their number.
    """
    source, output = Path(config.source), Path(output)
    if not source.is_dir():
        raise FileNotFoundError(f"--source {source} is not a folder of images or a stage output")
    with StageRun(output, STAGE, config, {"source": source}) as run:
        if run.finished:
            return run.skip()
        rng = random.Random(config.seed)
        skipped: dict[str, str] = {}
        with run.writer(tables=False) as writer:
            count = used = 0
            for name, image, caption in source_images(source, skipped):
                used += 1
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
            if not used:  # raised inside the writer: nothing is committed
                raise ValueError(f"no decodable image in {source}")
            about = {
                "pairs": count,
                "skipped_sources": list(skipped),
                "skipped_reasons": skipped,
                **config.model_dump(),
            }
            (writer.path / "PAIRS.json").write_text(json.dumps(about, indent=2))
            writer.counts.update(
                input=used + len(skipped), kept=used, rejected=len(skipped), pairs=count
            )
    return output
