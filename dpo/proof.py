"""Does DPO move a model the right way? A measurable check on a tiny model, in minutes on a CPU.

1. A synthetic set: smooth random textures, half tinted warm and half cool, one caption.
2. A base model fitted to it with rectified flow, so its samples are a mix of warm and cool.
3. Preference pairs from fresh textures: winner = warm copy, loser = cool copy (or swapped).
4. DPO; then the warm rate of samples for held-out seeds, base vs LoRA.

The attribute is read in latent space: a sample counts as warm when its per-channel mean latent
is nearer the warm images' centroid than the cool images' (the tiny kit's VAE is random, so
decoded pixels carry no colour; its encoder still separates the two tints cleanly).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dpo.config import DPOConfig
from dpo.encode import EncodedPairs
from dpo.synthetic import edit
from model import latent_sampling
from model.conditioning import TextEncoding
from model.encoders import encode_images, encode_texts
from model.objective import flow_loss
from model.rectified_flow import sample_timesteps


def textures(n: int, size: int, seed: int) -> list[Image.Image]:
    """Smooth random grey-level textures (upsampled 4x4 noise), the raw material of both tints."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        small = (rng.uniform(0.2, 0.8, (4, 4, 1)) * np.ones((1, 1, 3)) * 255).astype(np.uint8)
        images.append(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))
    return images


@dataclass
class ProofData:
    base_latents: torch.Tensor  # fitting set for the base model, warm and cool mixed
    caption: TextEncoding  # the one caption, batch dim 1
    pairs: EncodedPairs  # winner warm, loser cool
    warm_centroid: torch.Tensor  # [C] per-channel mean latent of warm images
    cool_centroid: torch.Tensor

    def pairs_swapped(self) -> EncodedPairs:
        p = self.pairs
        return EncodedPairs(p.ids, p.latents_l, p.latents_w, p.text)


def make_proof_data(
    model_dir,
    n_base: int,
    n_pairs: int,
    size: int,
    caption: str = "a picture",
    seed: int = 0,
    strength: float = 0.5,
) -> ProofData:
    text = encode_texts(model_dir, [caption], t5_length=8, progress=False)
    grey = textures(n_base + n_pairs, size, seed)
    warm = encode_images(
        model_dir, [edit(g, "warm", strength, True) for g in grey], size, progress=False
    )
    cool = encode_images(
        model_dir, [edit(g, "warm", strength, False) for g in grey], size, progress=False
    )
    half = n_base // 2
    base = torch.cat([warm[:half], cool[half:n_base]])
    pair_text = repeat(text, n_pairs)
    pairs = EncodedPairs(
        [f"pair-{i}" for i in range(n_pairs)], warm[n_base:], cool[n_base:], pair_text
    )
    return ProofData(base, text, pairs, warm.mean(dim=(0, 2, 3)), cool.mean(dim=(0, 2, 3)))


def fit_base(
    transformer,
    latents: torch.Tensor,
    text: TextEncoding,
    steps: int,
    batch: int,
    lr: float,
    seed: int = 0,
) -> None:
    """Plain rectified-flow fitting (model/objective.py's loss, logit-normal t) of the whole transformer,
    on one caption and no encoder dropout: the proof needs a base, not the full `t2i train` recipe."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr)
    texts = repeat(text, batch)
    transformer.train()
    for _ in range(steps):
        x0 = latents[torch.randint(len(latents), (batch,), generator=generator)]
        noise = torch.randn(x0.shape, generator=generator)
        t = sample_timesteps(batch, "logit_normal", generator=generator)
        loss = flow_loss(transformer, x0, texts, t, noise).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    transformer.eval()


def repeat(text: TextEncoding, n: int) -> TextEncoding:
    """A batch-of-one encoding repeated n times."""
    return TextEncoding(**{k: v.expand(n, *v.shape[1:]).clone() for k, v in vars(text).items()})


def sample_latents(
    transformer,
    text: TextEncoding,
    seeds: list[int],
    shape: tuple[int, ...],
    steps: int = 10,
    shift: float = 1.0,
) -> torch.Tensor:
    """Euler samples (model/latent_sampling.py) for one caption, no guidance."""
    negative = TextEncoding(**{k: v[0] for k, v in vars(text).items()})  # unused at guidance 1
    return latent_sampling.sample_latents(
        transformer,
        repeat(text, len(seeds)),
        negative,
        seeds,
        shape,
        steps=steps,
        shift=shift,
        guidance=1.0,
    )


def warm_rate(latents: torch.Tensor, data: ProofData) -> float:
    """Fraction of samples whose per-channel mean latent is nearer the warm centroid."""
    means = latents.mean(dim=(2, 3))
    nearer_warm = (means - data.warm_centroid).norm(dim=1) < (means - data.cool_centroid).norm(
        dim=1
    )
    return nearer_warm.float().mean().item()


def warmth(latents: torch.Tensor, data: ProofData) -> float:
    """Mean projection of samples' channel means on the cool->warm axis: 0 = cool centroid, 1 = warm."""
    axis = data.warm_centroid - data.cool_centroid
    means = latents.mean(dim=(2, 3))
    return ((means - data.cool_centroid) @ axis / axis.dot(axis)).mean().item()


@dataclass
class ProofResult:
    base_rate: float
    dpo_rate: float
    swapped_rate: float
    base_warmth: float
    dpo_warmth: float
    swapped_warmth: float
    heldout_acc: float
    swapped_heldout_acc: float
    other_prompt_base_rate: float
    other_prompt_dpo_rate: float
    seconds: dict[str, float]


def run_proof(
    model_dir,
    work,
    *,
    size: int = 32,
    n_base: int = 32,
    n_pairs: int = 32,
    base_steps: int = 300,
    base_lr: float = 2e-3,
    dpo: DPOConfig | None = None,
    seeds: int = 64,
    sample_steps: int = 10,
) -> ProofResult:
    """Fit a base model, then DPO with true and swapped labels from that same base; measure all three."""
    import copy
    import time
    from pathlib import Path

    from dpo.lora import add_lora
    from dpo.trainer import implicit_accuracy, load_transformer, split_heldout, train_lora

    dpo = dpo or DPOConfig(
        model="-", beta=1000.0, lr=1e-3, rank=8, alpha=8, max_steps=60, batch_size=8, log_every=10
    )
    clock = time.monotonic()
    seconds: dict[str, float] = {}
    data = make_proof_data(model_dir, n_base, n_pairs, size)
    other = encode_texts(model_dir, ["zebra stripes at night"], t5_length=8, progress=False)
    base = load_transformer(model_dir, "cpu", torch.float32).requires_grad_(True)
    fit_base(base, data.base_latents, data.caption, base_steps, 8, base_lr)
    seconds["base_fit"] = time.monotonic() - clock
    held_seeds = list(range(10_000, 10_000 + seeds))
    shape = tuple(data.base_latents.shape[1:])

    def measure(model, text):
        return sample_latents(model, text, held_seeds, shape, steps=sample_steps)

    base_samples = measure(base, data.caption)
    results = {}
    for name, pairs in (("dpo", data.pairs), ("swapped", data.pairs_swapped())):
        clock = time.monotonic()
        model = copy.deepcopy(base)
        add_lora(model, dpo.rank, dpo.alpha, dpo.target_modules, dpo.seed)
        train, held = split_heldout(pairs, 0.25, dpo.seed)
        folder = Path(work) / name
        folder.mkdir(parents=True, exist_ok=True)
        train_lora(model, train, dpo, folder, shift=1.0)
        seconds[name] = time.monotonic() - clock
        results[name] = (
            measure(model, data.caption),
            implicit_accuracy(model, held, dpo, 1.0),
            measure(model, other),
        )
    return ProofResult(
        base_rate=warm_rate(base_samples, data),
        dpo_rate=warm_rate(results["dpo"][0], data),
        swapped_rate=warm_rate(results["swapped"][0], data),
        base_warmth=warmth(base_samples, data),
        dpo_warmth=warmth(results["dpo"][0], data),
        swapped_warmth=warmth(results["swapped"][0], data),
        heldout_acc=results["dpo"][1],
        swapped_heldout_acc=results["swapped"][1],
        other_prompt_base_rate=warm_rate(measure(base, other), data),
        other_prompt_dpo_rate=warm_rate(results["dpo"][2], data),
        seconds=seconds,
    )
