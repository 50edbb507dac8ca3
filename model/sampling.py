"""Sampling from a local SD3 folder: one PNG per prompt and seed."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image
from tqdm.auto import tqdm

from model.build import load_pipeline, parse_dtype
from model.config import SampleConfig


def read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
    collected = list(prompts)
    if prompts_file:
        lines = Path(prompts_file).read_text().splitlines()
        collected += [line.strip() for line in lines if line.strip()]
    if not collected:
        raise ValueError("no prompt given: pass --prompt TEXT (repeatable) or --prompts FILE")
    return collected


def generate(
    pipe: StableDiffusion3Pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 28,
    guidance_scale: float = 7.0,
    height: int | None = None,
    width: int | None = None,
) -> list[tuple[str, int, Image.Image]]:
    """(prompt, seed, image) for every prompt and seed; the same seed gives the same noise."""
    results = []
    for prompt in tqdm(prompts, desc="sampling", unit="prompt", disable=len(prompts) < 2):
        for seed in seeds:
            generator = torch.Generator("cpu").manual_seed(seed)
            image = pipe(
                prompt=prompt,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                generator=generator,
            ).images[0]
            results.append((prompt, seed, image))
    return results


def slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def run_sample(config: SampleConfig) -> Path:
    pipe = load_pipeline(config.model, config.device, parse_dtype(config.dtype))
    pipe.set_progress_bar_config(disable=True)
    prompts = read_prompts(config.prompt, config.prompts)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    for index, (prompt, seed, image) in enumerate(
        generate(pipe, prompts, config.seed, config.steps, config.guidance_scale, config.height, config.width)
    ):
        image.save(out / f"{index:03d}-{slug(prompt)}-seed{seed}.png")
    return out
