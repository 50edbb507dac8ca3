"""Does DPO move samples toward the preferred images, and only there? A sample-level check on a
class-conditional toy model, in minutes on one CPU thread.

1. The set: square images filled with one of four colours (brightness jitter, pixel noise),
   captioned "a {colour} image", plus the generic caption "an image" on red and blue images in
   equal parts.
2. The base: an MMDiT from a tiny init-model preset fitted to that set with rectified flow. Its
   samples for the generic caption are about half red, half blue; for the colour-naming prompts
   they follow the colour named.
3. Pairs, all with the generic caption: winner a fresh red image, loser a blue one with the same
   jitter (the control swaps them).
4. `t2i dpo`'s loop (dpo/trainer.py) from that base, then on held-out sampling seeds:
   - the preferred rate: share of the generic caption's samples classified red;
   - the colour accuracy on the four colour-naming prompts, which are outside the preference set.

The classifier is a logistic regression on the per-channel mean latent, fitted on the real encoded
images: the tiny kit's VAE is random, so decoded pixels carry no colour, while its latents
separate the colours (`ToyData.classifier_accuracy` measures it on unseen images).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dpo.config import DPOConfig
from dpo.encode import EncodedPairs
from model import latent_sampling
from model.conditioning import TextEncoding
from model.encoders import encode_images, encode_texts
from model.objective import flow_loss
from model.rectified_flow import sample_timesteps

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 70, 220),
    "yellow": (225, 210, 50),
}
PREFERRED, DISPREFERRED = "red", "blue"
GENERIC = "an image"
T5_LENGTH = 8


def colour_image(colour: str, size: int, rng: np.random.Generator, gain: float) -> Image.Image:
    """The colour at brightness `gain`, with per-pixel noise."""
    pixels = np.asarray(COLOURS[colour], dtype=np.float32) * gain
    pixels = pixels + rng.normal(0, 20, (size, size, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def caption_of(colour: str) -> str:
    return f"a {colour} image"


@dataclass
class ToyData:
    latents: torch.Tensor  # [N, C, h, w] the base's fitting set
    caption_index: torch.Tensor  # [N] row of `texts` each latent is captioned with
    texts: TextEncoding  # [len(COLOURS) + 1]: "a {colour} image" in COLOURS order, then GENERIC
    pairs: EncodedPairs  # winner red, loser blue, generic caption
    classifier: object  # colour index from per-channel mean latents (`classify`)
    classifier_accuracy: float  # on real latents of unseen images

    def text(self, row: int, n: int = 1) -> TextEncoding:
        return TextEncoding(
            **{
                k: v[row : row + 1].expand(n, *v.shape[1:]).clone()
                for k, v in vars(self.texts).items()
            }
        )

    def swapped(self) -> EncodedPairs:
        p = self.pairs
        return EncodedPairs(p.ids, p.latents_l, p.latents_w, p.text)


def colour_classifier(latents: torch.Tensor, labels: torch.Tensor):
    """Standardised logistic regression on per-channel mean latents (position-free colour)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = latents.float().mean(dim=(2, 3)).numpy()
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(
        features, labels.numpy()
    )


def classify(latents: torch.Tensor, classifier) -> torch.Tensor:
    """Index into COLOURS of each latent's colour."""
    return torch.as_tensor(classifier.predict(latents.float().mean(dim=(2, 3)).numpy()))


def make_toy_data(
    model_dir,
    size: int = 32,
    per_colour: int = 32,
    generic: int = 64,
    n_pairs: int = 64,
    seed: int = 0,
) -> ToyData:
    """Encode the fitting set, the pairs and a held-out set for the classifier with MODEL_DIR's encoders."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)

    def draw(colour: str, gain: float | None = None) -> Image.Image:
        return colour_image(colour, size, rng, rng.uniform(0.75, 1.0) if gain is None else gain)

    images, rows, colours = [], [], []
    for k in range(per_colour * len(names)):
        images.append(draw(names[k % len(names)]))
        rows.append(k % len(names))
        colours.append(k % len(names))
    for k in range(generic):
        colour = (PREFERRED, DISPREFERRED)[k % 2]
        images.append(draw(colour))
        rows.append(len(names))
        colours.append(names.index(colour))
    gains = rng.uniform(0.75, 1.0, n_pairs)
    winners = [draw(PREFERRED, g) for g in gains]
    losers = [draw(DISPREFERRED, g) for g in gains]
    held = [draw(names[k % len(names)]) for k in range(16 * len(names))]
    latents = encode_images(model_dir, images + winners + losers + held, size, progress=False)
    fit, rest = latents[: len(images)], latents[len(images) :]
    lat_w, lat_l, lat_held = rest[:n_pairs], rest[n_pairs : 2 * n_pairs], rest[2 * n_pairs :]
    texts = encode_texts(
        model_dir, [caption_of(c) for c in names] + [GENERIC], T5_LENGTH, progress=False
    )
    rows_t = torch.tensor(rows)
    classifier = colour_classifier(fit, torch.tensor(colours))
    truth = torch.tensor([k % len(names) for k in range(len(held))])
    accuracy = (classify(lat_held, classifier) == truth).float().mean().item()
    generic_text = TextEncoding(
        **{k: v[-1:].expand(n_pairs, *v.shape[1:]).clone() for k, v in vars(texts).items()}
    )
    pairs = EncodedPairs([f"pair-{i:04d}" for i in range(n_pairs)], lat_w, lat_l, generic_text)
    return ToyData(fit, rows_t, texts, pairs, classifier, accuracy)


def fit_base(
    transformer, data: ToyData, steps: int, batch: int = 16, lr: float = 2e-3, seed: int = 0
) -> list[float]:
    """Plain rectified-flow fitting (model/objective.py's loss, logit-normal t, shift 1) of the
    whole transformer on the toy set; returns the loss every 100 steps. The proof needs a base,
    not the full `t2i train` recipe."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    transformer.train().requires_grad_(True)
    losses, window = [], []
    for _ in range(steps):
        index = torch.randint(len(data.latents), (batch,), generator=generator)
        text = TextEncoding(
            **{k: v[data.caption_index[index]] for k, v in vars(data.texts).items()}
        )
        x0 = data.latents[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = sample_timesteps(batch, "logit_normal", generator=generator)
        loss = flow_loss(transformer, x0, text, t, noise).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        window.append(loss.item())
        if len(window) == 100:
            losses.append(sum(window) / len(window))
            window = []
    transformer.eval().requires_grad_(False)
    return losses


def sample(transformer, data: ToyData, row: int, seeds: list[int], steps: int) -> torch.Tensor:
    """Euler samples (model/latent_sampling.py, shift 1, no guidance) for caption row ROW."""
    text = data.text(row, len(seeds))
    negative = TextEncoding(**{k: v[0] for k, v in vars(text).items()})  # unused at guidance 1
    shape = tuple(data.latents.shape[1:])
    return latent_sampling.sample_latents(
        transformer, text, negative, seeds, shape, steps=steps, shift=1.0, guidance=1.0
    )


@dataclass
class SampleMeasure:
    preferred_rate: float  # share of the generic caption's samples classified PREFERRED
    colour_accuracy: float  # colour-naming prompts: share classified as the colour named
    per_colour: dict[str, float]


@torch.no_grad()
def measure(transformer, data: ToyData, seeds: list[int], steps: int = 10) -> SampleMeasure:
    names = list(COLOURS)
    generic = classify(sample(transformer, data, len(names), seeds, steps), data.classifier)
    per_colour = {
        name: (classify(sample(transformer, data, c, seeds, steps), data.classifier) == c)
        .float()
        .mean()
        .item()
        for c, name in enumerate(names)
    }
    return SampleMeasure(
        preferred_rate=(generic == names.index(PREFERRED)).float().mean().item(),
        colour_accuracy=sum(per_colour.values()) / len(per_colour),
        per_colour=per_colour,
    )


def build_base(
    cache: str | Path,
    preset: str = "tiny-d4",
    size: int = 32,
    steps: int = 1500,
    lr: float = 2e-3,
    batch: int = 16,
    seed: int = 0,
) -> tuple[Path, ToyData]:
    """The fitted base as a model folder (scheduler shift 1, as it was fitted) plus its toy data,
    built once per settings under CACHE/base-<hash>/ and reused."""
    from model.build import init_model

    settings = {
        "preset": preset,
        "size": size,
        "steps": steps,
        "lr": lr,
        "batch": batch,
        "seed": seed,
        "version": 2,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache) / f"base-{key}"
    if (folder / "done.json").is_file():
        return folder / "model", torch.load(folder / "data.pt", weights_only=False)
    tmp = Path(cache) / f".base-{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model = init_model(tmp / "model", preset, seed)
    data = make_toy_data(model, size, seed=seed)
    from dpo.trainer import load_transformer

    transformer = load_transformer(model, "cpu", torch.float32)
    clock = time.monotonic()
    losses = fit_base(transformer, data, steps, batch, lr, seed)
    transformer.save_pretrained(model / "transformer")
    scheduler = model / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler.read_text())
    scheduler.write_text(json.dumps({**config, "shift": 1.0}, indent=2))
    torch.save(data, tmp / "data.pt")
    done = {
        **settings,
        "fit_s": round(time.monotonic() - clock, 1),
        "losses": losses,
        "classifier_accuracy": data.classifier_accuracy,
    }
    (tmp / "done.json").write_text(json.dumps(done, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder / "model", data


@dataclass
class ArmResult:
    """One DPO run from the base: its samples, and its training diagnostics."""

    samples: SampleMeasure
    heldout_implicit_acc: float  # training diagnostic, not evidence
    guard: dict
    seconds: float


def run_arm(
    model_dir,
    data: ToyData,
    config: DPOConfig,
    work,
    seeds: list[int],
    swapped: bool = False,
    sample_steps: int = 10,
) -> ArmResult:
    """`t2i dpo`'s LoRA loop on the toy pairs (true or swapped labels), then the sample measures."""
    from dpo.guard import guard_summary
    from dpo.lora import add_lora
    from dpo.metrics import METRICS, metric_rows
    from dpo.trainer import (
        implicit_accuracy,
        load_transformer,
        split_heldout,
        train_lora,
    )
    from model.lora_train import lora_alpha
    from model.toolbox import scheduler_shift

    clock = time.monotonic()
    work = Path(work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    torch.manual_seed(config.seed)
    model = load_transformer(model_dir, "cpu", torch.float32)
    add_lora(model, config.lora_rank, lora_alpha(config), config.lora_targets, config.seed)
    train, held = split_heldout(data.swapped() if swapped else data.pairs, 0.25, config.seed)
    shift = config.shift if config.shift is not None else scheduler_shift(model_dir)
    train_lora(model, train, config, work, shift)
    seconds = time.monotonic() - clock
    return ArmResult(
        samples=measure(model, data, seeds, sample_steps),
        heldout_implicit_acc=implicit_accuracy(model, held, config, shift),
        guard=guard_summary(metric_rows(work / METRICS)),
        seconds=round(seconds, 1),
    )


@dataclass
class ProofResult:
    base: SampleMeasure
    dpo: ArmResult
    swapped: ArmResult | None

    @property
    def rise(self) -> float:
        return self.dpo.samples.preferred_rate - self.base.preferred_rate

    @property
    def control_fall(self) -> float | None:
        if self.swapped is None:
            return None
        return self.base.preferred_rate - self.swapped.samples.preferred_rate

    @property
    def other_prompts_change(self) -> float:
        return self.dpo.samples.colour_accuracy - self.base.colour_accuracy

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "rise": self.rise,
            "control_fall": self.control_fall,
            "other_prompts_change": self.other_prompts_change,
        }


def held_out_seeds(n: int) -> list[int]:
    """Sampling seeds no training draw uses."""
    return list(range(10_000, 10_000 + n))


def run_proof(
    model_dir,
    data: ToyData,
    config: DPOConfig,
    work,
    seeds: int = 64,
    control: bool = True,
    base: SampleMeasure | None = None,
) -> ProofResult:
    """Base, DPO and (optionally) swapped-label control, measured on the same held-out seeds."""
    from dpo.trainer import load_transformer

    chosen = held_out_seeds(seeds)
    if base is None:
        base = measure(load_transformer(model_dir, "cpu", torch.float32), data, chosen)
    dpo = run_arm(model_dir, data, config, Path(work) / "dpo", chosen)
    swapped = (
        run_arm(model_dir, data, config, Path(work) / "swapped", chosen, True) if control else None
    )
    return ProofResult(base, dpo, swapped)
