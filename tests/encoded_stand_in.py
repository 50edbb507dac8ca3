"""TEST HELPER ONLY: an in-memory stand-in for `model.encoded.EncodedDataset`.

The precompute stage (model/encoded.py) was being written in parallel; until it lands, the
trainer's tests and benchmarks encode a small set here with the tiny pipeline's real VAE and
text encoders (through diffusers' own SD3 prompt helpers) and serve it through the same
contract: ids, len, has_synthetic(i), sample(i, variant), empty_text(), bucket(i), info.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save_file

from model.conditioning import TextEncoding

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 60, 230),
    "yellow": (230, 220, 30),
}
SHAPES = ("circle", "square")


@torch.no_grad()
def encode_texts(pipe, captions: list[str], t5_length: int = 32) -> list[TextEncoding]:
    l_seq, l_pool = pipe._get_clip_prompt_embeds(captions, device="cpu", clip_model_index=0)
    g_seq, g_pool = pipe._get_clip_prompt_embeds(captions, device="cpu", clip_model_index=1)
    t5 = pipe._get_t5_prompt_embeds(captions, max_sequence_length=t5_length, device="cpu")
    mask = pipe.tokenizer_3(captions, padding="max_length", max_length=t5_length, truncation=True,
                            return_tensors="pt").attention_mask  # fmt: skip
    return [
        TextEncoding(l_seq[k], l_pool[k], g_seq[k], g_pool[k], t5[k], mask[k]).to(torch.bfloat16)
        for k in range(len(captions))
    ]


@torch.no_grad()
def encode_images(pipe, images: list[Image.Image]) -> torch.Tensor:
    pixels = torch.stack(
        [torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)) for im in images]
    )
    pixels = pixels.permute(0, 3, 1, 2) / 127.5 - 1
    config = pipe.vae.config
    latents = pipe.vae.encode(pixels).latent_dist.mean
    return ((latents - config.shift_factor) * config.scaling_factor).to(torch.bfloat16)


class StandInEncodedSet:
    """The EncodedDataset contract over tensors held in memory (test helper)."""

    def __init__(self, pipe=None, images=(), captions=(), synthetic=None, t5_length=32, batch=64):
        if pipe is None:  # filled in by `load`
            return
        self.ids = [
            hashlib.sha256(np.asarray(im).tobytes() + c.encode()).hexdigest()
            for im, c in zip(images, captions, strict=True)
        ]
        self.latents = torch.cat(
            [encode_images(pipe, images[k : k + batch]) for k in range(0, len(images), batch)]
        )
        self.original = sum(
            (
                encode_texts(pipe, captions[k : k + batch], t5_length)
                for k in range(0, len(captions), batch)
            ),
            [],
        )
        self.synthetic = [None] * len(images)
        if synthetic is not None:
            present = [k for k, s in enumerate(synthetic) if s]
            for k, enc in zip(
                present, encode_texts(pipe, [synthetic[k] for k in present], t5_length), strict=True
            ):
                self.synthetic[k] = enc
        self.empty = encode_texts(pipe, [""], t5_length)[0]
        self.captions = list(captions)
        self.info = {"t5_length": t5_length, "resolution": images[0].size[0]}

    def __len__(self) -> int:
        return len(self.ids)

    def save(self, path: Path) -> Path:
        """One safetensors file, so a subprocess can read the set without loading the encoders."""
        tensors = {"latents": self.latents.contiguous()}
        for name, texts in (
            ("original", self.original),
            ("synthetic", self.synthetic),
            ("empty", [self.empty]),
        ):
            for k, text in enumerate(texts):
                for field, value in (vars(text) if text is not None else {}).items():
                    tensors[f"{name}.{k}.{field}"] = value.contiguous()
        meta = {"ids": self.ids, "captions": self.captions, "info": self.info}
        save_file(tensors, str(path), metadata={"meta": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: Path) -> StandInEncodedSet:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["meta"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        self = cls()
        self.ids, self.captions, self.info = meta["ids"], meta["captions"], meta["info"]
        self.latents = tensors["latents"]

        def text(name: str, k: int) -> TextEncoding | None:
            if f"{name}.{k}.t5" not in tensors:
                return None
            return TextEncoding(
                **{f.name: tensors[f"{name}.{k}.{f.name}"] for f in fields(TextEncoding)}
            )

        self.original = [text("original", k) for k in range(len(self.ids))]
        self.synthetic = [text("synthetic", k) for k in range(len(self.ids))]
        self.empty = text("empty", 0)
        return self

    def has_synthetic(self, i: int) -> bool:
        return self.synthetic[i] is not None

    def sample(self, i: int, variant: str = "original") -> dict:
        text = self.synthetic[i] if variant == "synthetic" else self.original[i]
        if text is None:
            raise KeyError(f"sample {self.ids[i]} has no synthetic caption")
        return {"id": self.ids[i], "latents": self.latents[i], "text": text, "variant": variant}

    def empty_text(self) -> TextEncoding:
        return self.empty

    def bucket(self, i: int) -> tuple[int, int]:
        return tuple(self.latents.shape[-2:])


def shape_image(
    colour: str, shape: str, size: int, rng: np.random.Generator, solid: bool = False
) -> Image.Image:
    """A coloured circle or square at a random place and size on a dark background; `solid`: the
    whole image in the colour with pixel noise (the easiest conditional task)."""
    if solid:
        pixels = np.asarray(COLOURS[colour], dtype=np.float32) + rng.normal(0, 25, (size, size, 3))
        return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    image = Image.new("RGB", (size, size), (20, 20, 20))
    draw = ImageDraw.Draw(image)
    r = rng.integers(size // 5, size // 3)
    cx, cy = rng.integers(r, size - r, size=2)
    box = [cx - r, cy - r, cx + r, cy + r]
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return image


def shapes_set(
    pipe, n: int, size: int = 32, seed: int = 0, colours=tuple(COLOURS), solid: bool = False
):
    """n images whose captions name their colour and shape; labels are the colour indices."""
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
    return StandInEncodedSet(pipe, images, captions, synthetic), labels


def main(argv: list[str] | None = None) -> None:
    """`python tests/encoded_stand_in.py SET.safetensors OUT CONFIG_JSON`: train on a saved stand-in
    set in a process of its own (the SIGKILL-and-resume test kills it)."""
    import sys

    torch.set_num_threads(1)
    from model.config import TrainConfig
    from model.train import train

    saved, out, config_json = argv or sys.argv[1:]
    train(StandInEncodedSet.load(Path(saved)), out, TrainConfig(**json.loads(config_json)))


if __name__ == "__main__":
    main()
