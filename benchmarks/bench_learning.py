"""Proof that `model.train` learns conditioning: coloured shapes, trained from scratch, sampled
for held-out seeds, and classified by colour in latent space.

The set: 32x32 images of a red/green/blue/yellow circle or square at a random place and size on a
dark background, captioned "a {colour} {shape}" (and a synthetic caption for 2 in 3 of them),
encoded with the tiny kit's random VAE and text encoders. A colour classifier (logistic regression
on position-invariant per-channel statistics of the latents) is fitted on real latents; a sample
counts as correct when the classifier assigns it the colour its caption names. Chance is 1/4.

    python benchmarks/bench_learning.py --steps 600        # numbers for benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import SD3Transformer2DModel

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from train_sets import COLOURS, SHAPES, shapes_encoded  # noqa: E402

from model.build import init_model  # noqa: E402
from model.conditioning import TextEncoding  # noqa: E402
from model.config import TrainConfig  # noqa: E402
from model.encoded import EncodedDataset  # noqa: E402
from model.encoders import encode_texts  # noqa: E402
from model.latent_sampling import sample_latents  # noqa: E402
from model.train import train  # noqa: E402
from model.train_model import build_or_load_transformer  # noqa: E402


def latent_features(latents: torch.Tensor) -> np.ndarray:
    """Per-channel mean, max and min over space: colour shows, position does not."""
    flat = latents.float().flatten(2)
    return torch.cat([flat.mean(-1), flat.amax(-1), flat.amin(-1)], dim=1).numpy()


def real_latents(reader: EncodedDataset, labels: dict[str, int]) -> tuple[torch.Tensor, np.ndarray]:
    latents = torch.stack([reader.sample(i)["latents"] for i in range(len(reader))])
    return latents, np.array([labels[i] for i in reader.ids])


def colour_classifier(latents: torch.Tensor, labels: np.ndarray):
    """Standardised logistic regression on real latents (0.97-0.98 accuracy on held-out real ones)."""
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    return classifier.fit(latent_features(latents), labels)


def captions_of(colours: tuple[str, ...]) -> list[tuple[int, str]]:
    return [(c, f"a {colour} {shape}") for c, colour in enumerate(colours) for shape in SHAPES]


def zeros_like_text(text: TextEncoding) -> TextEncoding:
    return TextEncoding(
        **{k: v if k == "t5_mask" else torch.zeros_like(v) for k, v in vars(text).items()}
    )


def conditioning_accuracy(
    transformer,
    colours: tuple[str, ...],
    model_dir: str,
    reader: EncodedDataset,
    classifier,
    seeds: list[int],
    steps: int,
    guidance: float,
    shift: float,
    negative: str = "empty",
) -> float:
    """Share of samples (every colour x shape caption x held-out seed) classified as their caption's
    colour; guidance contrasts with NEGATIVE: the empty prompt's encoding, or zeros."""
    captions = captions_of(colours)
    texts = encode_texts(
        model_dir, [text for _, text in captions], reader.info["t5_length"], progress=False
    )
    shape = tuple(reader.sample(0)["latents"].shape)
    correct = total = 0
    for k, (label, _) in enumerate(captions):
        text = TextEncoding(**{name: value[k] for name, value in vars(texts).items()})
        batch = TextEncoding.stack([text] * len(seeds))
        uncond = (
            reader.empty_text() if negative == "empty" else zeros_like_text(reader.empty_text())
        )
        latents = sample_latents(transformer, batch, uncond, seeds, shape, steps, shift, guidance)
        correct += int((classifier.predict(latent_features(latents)) == label).sum())
        total += len(seeds)
    return correct / total


def pipeline_per_caption(
    model_dir: str | Path,
    colours: tuple[str, ...],
    classifier,
    seeds: list[int],
    steps: int,
    guidance: float,
    size: int,
    t5_length: int,
) -> dict[str, float]:
    """The same measure through diffusers' stock StableDiffusion3Pipeline loaded from MODEL_DIR
    (its own text encoders, scheduler and empty-prompt guidance), per caption; latents come back
    before the VAE (output_type="latent"), in the space the classifier was fitted in."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    found = {}
    for label, caption in captions_of(colours):
        latents = pipe(
            prompt=[caption] * len(seeds),
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            max_sequence_length=t5_length,
            output_type="latent",
            generator=[torch.Generator().manual_seed(s) for s in seeds],
        ).images
        found[caption] = float((classifier.predict(latent_features(latents)) == label).mean())
    return found


def pipeline_accuracy(*args, **kwargs) -> float:
    """`pipeline_per_caption` over all captions (each has the same number of seeds)."""
    per_caption = pipeline_per_caption(*args, **kwargs)
    return sum(per_caption.values()) / len(per_caption)


def measure(
    preset: str = "tiny-d4",
    steps: int = 1000,
    n: int = 256,
    batch: int = 16,
    lr: float = 1e-3,
    seeds: int = 16,
    sample_steps: int = 16,
    guidance: float = 4.0,
    size: int = 32,
    solid: bool = False,
    colours: tuple[str, ...] = tuple(COLOURS),
    warmup: int | None = None,
    held_out: int = 64,
    work: Path | None = None,
    unconditional: str = "empty",
    pipeline: bool = False,
    blind_control: bool = False,
) -> dict:
    """Train from scratch on the shapes set and compare colour accuracy before and after."""
    torch.set_num_threads(1)
    work = Path(work or tempfile.mkdtemp(prefix="bench-learning-"))
    model = str(init_model(work / "model", "tiny"))
    shapes = dict(size=size, colours=colours, solid=solid)
    encoded, labels = shapes_encoded(model, work / "train", n, seed=0, **shapes)
    reader = EncodedDataset(encoded)
    classifier = colour_classifier(*real_latents(reader, labels))
    real_accuracy = None  # the classifier on real latents of unseen images
    if held_out:
        held_encoded, held_labels = shapes_encoded(
            model, work / "held-out", held_out, seed=99, **shapes
        )
        held_latents, held_truth = real_latents(EncodedDataset(held_encoded), held_labels)
        real_accuracy = float(
            (classifier.predict(latent_features(held_latents)) == held_truth).mean()
        )
    config = TrainConfig(
        model=model,
        preset=preset,
        device="cpu",
        max_steps=steps,
        batch_size=batch,
        lr=lr,
        warmup_steps=min(100, steps // 10) if warmup is None else warmup,
        shift=1.0,
        ema_decay=0.99,
        val_fraction=0.0,
        log_every=max(1, steps // 5),
        val_every=0,
        sample_every=0,
        sample_count=0,
        checkpoint_every=0,
        unconditional=unconditional,
    )
    sample_seeds = list(range(1000, 1000 + seeds))  # never used for training noise

    def evaluate(transformer) -> float:
        return conditioning_accuracy(
            transformer,
            colours,
            model,
            reader,
            classifier,
            sample_seeds,
            sample_steps,
            guidance,
            1.0,
            unconditional,
        )

    def through_pipeline(folder: Path | str) -> dict[str, float]:
        return pipeline_per_caption(
            folder,
            colours,
            classifier,
            sample_seeds,
            sample_steps,
            guidance,
            size,
            reader.info["t5_length"],
        )

    untrained_accuracy = evaluate(build_or_load_transformer(config).eval())
    started = time.time()
    out = train(reader, work / "trained", config)
    train_s = time.time() - started
    trained = SD3Transformer2DModel.from_pretrained(out / "transformer").eval()
    stock = {}
    if pipeline:  # the base folder's random transformer is the untrained control
        runs = {"untrained": model, "trained": out}
        if blind_control:  # the same run with every encoder always dropped: it never sees a caption
            runs["blind"] = train(
                reader, work / "blind", config.model_copy(update={"encoder_drop": 1.0})
            )
        for name, folder in runs.items():
            per_caption = through_pipeline(folder)
            stock[f"pipeline_{name}_per_caption"] = per_caption
            stock[f"pipeline_{name}_accuracy"] = sum(per_caption.values()) / len(per_caption)
    return {
        "unconditional": unconditional,
        **stock,
        "preset": preset,
        "params": sum(p.numel() for p in trained.parameters()),
        "image_size": size,
        "solid": solid,
        "colours": len(colours),
        "steps": steps,
        "batch": batch,
        "lr": lr,
        "train_samples": n,
        "train_s": round(train_s, 1),
        "chance": 1 / len(colours),
        "classifier_on_real_latents": real_accuracy,
        "untrained_accuracy": untrained_accuracy,
        "trained_accuracy": evaluate(trained),
        "samples_per_model": len(colours) * len(SHAPES) * seeds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny-d4")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--unconditional", choices=("empty", "zeros"), default="empty")
    parser.add_argument(
        "--pipeline", action="store_true", help="also classify stock-pipeline samples"
    )
    args = parser.parse_args()
    result = measure(
        args.preset,
        args.steps,
        args.n,
        args.batch,
        args.lr,
        args.seeds,
        unconditional=args.unconditional,
        pipeline=args.pipeline,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
