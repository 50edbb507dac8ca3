"""A second DPO proof task: four shapes x four colours at 64 px, the base trained by `t2i train`.

The set: a red / green / blue / yellow circle, square, triangle or cross, roughly centred (a few
pixels of jitter in place and size) on a dark background, captioned "a {colour} {shape}", plus
the generic caption "an image" on red and blue shapes in equal parts. The base is a tiny-d4 MMDiT
(4 layers x 64 hidden, the tiny kit's random encoders and VAE) trained from scratch by
`model.train.train` (`t2i train`'s loop) on that set, pre-encoded by `t2i precompute`'s
`run_precompute`; `steps` picks its strength (fewer steps: a weaker base).

Pairs: 64 on "an image", winner a red shape, loser the same shape, place and size in blue.

Colour and shape are read from latents (the VAE is random, so decoded pixels carry nothing):
two logistic regressions fitted on the real encoded training images, colour on per-channel
mean / max / min over space, shape on the whole latent (the shapes are centred).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from dpo.encode import EncodedPairs
from model.conditioning import TextEncoding

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 70, 220),
    "yellow": (225, 210, 50),
}
SHAPES = ("circle", "square", "triangle", "cross")
PREFERRED, DISPREFERRED = "red", "blue"
GENERIC = "an image"
# the two proof tasks: `t2i train` steps of their bases (fewer: a weaker base, a larger leak)
BASE_STEPS = {"strong": 1500, "weak": 500}
T5_LENGTH = 16


def class_prompts() -> list[tuple[str, str, str]]:
    """(caption, colour, shape) of every class prompt, colour-major."""
    return [(f"a {c} {s}", c, s) for c in COLOURS for s in SHAPES]


def shape_image(colour: str, shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    """SHAPE in COLOUR near the centre of a dark SIZE x SIZE image."""
    image = Image.new("RGB", (size, size), (20, 20, 20))
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(0.26, 0.34)
    cx, cy = size / 2 + rng.uniform(-size / 16, size / 16, 2)
    fill = tuple(int(v * rng.uniform(0.85, 1.0)) for v in COLOURS[colour])
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        w = r / 3
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    return image


def colour_features(latents: torch.Tensor) -> np.ndarray:
    flat = latents.float().flatten(2)
    return torch.cat([flat.mean(-1), flat.amax(-1), flat.amin(-1)], dim=1).numpy()


def shape_features(latents: torch.Tensor) -> np.ndarray:
    return latents.float().flatten(1).numpy()


def _classifier(features: np.ndarray, labels: np.ndarray):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1))
    return model.fit(features, labels)


@dataclass
class ShapesTask:
    """Everything the DPO proof needs about one trained base (saved beside it)."""

    name: str
    texts: TextEncoding  # [16 class prompts (class_prompts() order), GENERIC]
    empty: TextEncoding  # the unconditional input the base trained with
    latent_shape: tuple[int, int, int]
    pairs: EncodedPairs  # winner red, loser blue, GENERIC caption
    colour_classifier: object
    shape_classifier: object
    classifier_accuracy: dict[str, float]  # colour, shape: on real latents of unseen images

    def colour_of(self, latents: torch.Tensor) -> list[str]:
        names = list(COLOURS)
        return [names[int(i)] for i in self.colour_classifier.predict(colour_features(latents))]

    def shape_of(self, latents: torch.Tensor) -> list[str]:
        return [SHAPES[int(i)] for i in self.shape_classifier.predict(shape_features(latents))]

    def swapped(self) -> EncodedPairs:
        p = self.pairs
        return EncodedPairs(p.ids, p.latents_l, p.latents_w, p.text)


def _store(out: Path, images: list[Image.Image], captions: list[str]) -> Path:
    """A captioned store (the captioning stage's format) of IMAGES, as `t2i precompute` reads."""
    import datasets

    from curate.runtime.store_writer import StageWriter

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "caption_synthetic": datasets.Value("string"),
        }
    )
    rows = []
    for image, caption in zip(images, captions, strict=True):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        rows.append(
            {
                "id": hashlib.sha256(data).hexdigest(),
                "image": {"bytes": data, "path": None},
                "caption": caption,
                "caption_synthetic": None,
            }
        )
    with StageWriter(out, "caption", {"shapes_task": len(rows)}, "synthetic") as writer:
        writer.write_samples(rows, features)
    return out


def base_train_config(model: str, steps: int, seed: int = 0):
    """The `t2i train` options of the bases (issue 21's user recipe, synthetic captions off)."""
    from model.config import TrainConfig

    return TrainConfig(
        model=model,
        preset="tiny-d4",
        device="cpu",
        max_steps=steps,
        batch_size=16,
        lr=5e-4,
        warmup_steps=100,
        synthetic_caption_p=0.0,
        val_fraction=0.0,
        val_every=0,
        sample_every=0,
        sample_count=0,
        checkpoint_every=0,
        log_every=100,
        seed=seed,
    )


def build_task(
    cache: str | Path, name: str, steps: int, size: int = 64, per_class: int = 24, seed: int = 0
) -> tuple[Path, ShapesTask]:
    """Train the base once per settings under CACHE/shapes-<hash>/ and return (model folder, task)."""
    from model.build import init_model
    from model.config import PrecomputeConfig
    from model.encoded import EncodedDataset
    from model.encoders import encode_images, encode_texts
    from model.precompute import run_precompute
    from model.train import train

    settings = {"steps": steps, "size": size, "per_class": per_class, "seed": seed, "version": 1}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache) / f"shapes-{key}"
    if (folder / "done.json").is_file():
        task = torch.load(folder / "task.pt", weights_only=False)
        task.name = name
        return folder / "base", task
    tmp = Path(cache) / f".shapes-{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    kit = init_model(tmp / "kit", "tiny", seed)
    rng = np.random.default_rng(seed)
    images, captions, colours, shapes = [], [], [], []
    for _ in range(per_class):
        for caption, colour, shape in class_prompts():
            images.append(shape_image(colour, shape, size, rng))
            captions.append(caption)
            colours.append(list(COLOURS).index(colour))
            shapes.append(SHAPES.index(shape))
    for k in range(per_class * len(SHAPES) * 2):  # "an image": red and blue in equal parts
        colour, shape = (PREFERRED, DISPREFERRED)[k % 2], SHAPES[(k // 2) % len(SHAPES)]
        images.append(shape_image(colour, shape, size, rng))
        captions.append(GENERIC)
        colours.append(list(COLOURS).index(colour))
        shapes.append(SHAPES.index(shape))
    store = _store(tmp / "store", images, captions)
    encoded = run_precompute(
        store,
        tmp / "encoded",
        PrecomputeConfig(model=str(kit), resolution=size, t5_length=T5_LENGTH),
    )
    reader = EncodedDataset(encoded)
    clock = time.monotonic()
    train(reader, tmp / "base", base_train_config(str(kit), steps, seed))
    fit_s = time.monotonic() - clock

    # classifiers on the real latents of the training images; accuracy on unseen ones
    latents = encode_images(kit, images, size, progress=False)
    held_rng = np.random.default_rng(seed + 99)
    held = [(c, s) for _ in range(4) for _, c, s in class_prompts()]
    held_latents = encode_images(
        kit, [shape_image(c, s, size, held_rng) for c, s in held], size, progress=False
    )
    colour_clf = _classifier(colour_features(latents), np.array(colours))
    shape_clf = _classifier(shape_features(latents), np.array(shapes))
    accuracy = {
        "colour": float(
            (
                colour_clf.predict(colour_features(held_latents))
                == np.array([list(COLOURS).index(c) for c, _ in held])
            ).mean()
        ),
        "shape": float(
            (
                shape_clf.predict(shape_features(held_latents))
                == np.array([SHAPES.index(s) for _, s in held])
            ).mean()
        ),
    }

    # pairs on the generic caption: the same shape, place and size in red (winner) and blue
    n_pairs, winners, losers = 64, [], []
    for k in range(n_pairs):
        state = np.random.default_rng([seed, 7, k])
        winners.append(shape_image(PREFERRED, SHAPES[k % len(SHAPES)], size, state))
        state = np.random.default_rng([seed, 7, k])
        losers.append(shape_image(DISPREFERRED, SHAPES[k % len(SHAPES)], size, state))
    pair_latents = encode_images(kit, winners + losers, size, progress=False)
    texts = encode_texts(
        kit, [c for c, _, _ in class_prompts()] + [GENERIC], T5_LENGTH, progress=False
    )
    generic = TextEncoding(
        **{k: v[-1:].expand(n_pairs, *v.shape[1:]).clone() for k, v in vars(texts).items()}
    )
    pairs = EncodedPairs(
        [f"pair-{i:04d}" for i in range(n_pairs)],
        pair_latents[:n_pairs],
        pair_latents[n_pairs:],
        generic,
    )
    unconditional = base_train_config(str(kit), steps).unconditional
    empty = reader.empty_text()
    if unconditional == "zeros":
        empty = TextEncoding(
            **{k: v if k == "t5_mask" else torch.zeros_like(v) for k, v in vars(empty).items()}
        )
    task = ShapesTask(
        name, texts, empty, tuple(latents.shape[1:]), pairs, colour_clf, shape_clf, accuracy
    )
    torch.save(task, tmp / "task.pt")
    shutil.rmtree(tmp / "store", ignore_errors=True)
    done = {**settings, "fit_s": round(fit_s, 1), "classifier_accuracy": accuracy}
    (tmp / "done.json").write_text(json.dumps(done, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder / "base", task
