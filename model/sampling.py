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
from model.lora import load_into_pipeline, read_lora_for

LORA_ADAPTER = "lora"


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


def side_by_side(
    base: Sequence[Image.Image], adapted: Sequence[Image.Image], gap: int = 4
) -> Image.Image:
    """One row per prompt and seed: the base model's image left, the LoRA's right."""
    width = max(i.width for i in base) * 2 + gap
    height = sum(i.height for i in base) + gap * (len(base) - 1)
    grid = Image.new("RGB", (width, height), "white")
    top = 0
    for left_image, right_image in zip(base, adapted):
        grid.paste(left_image, (0, top))
        grid.paste(right_image, (left_image.width + gap, top))
        top += left_image.height + gap
    return grid


def load_lora(pipe: StableDiffusion3Pipeline, lora, scale: float) -> None:
    """Load a LoRA (file, folder or LoraWeights; any key style, see model/lora_formats.py) at SCALE."""
    load_into_pipeline(pipe, lora, LORA_ADAPTER, scale)


def _save(results, folder: Path) -> list[Image.Image]:
    folder.mkdir(parents=True, exist_ok=True)
    for index, (prompt, seed, image) in enumerate(results):
        image.save(folder / f"{index:03d}-{slug(prompt)}-seed{seed}.png")
    return [image for _, _, image in results]


def run_sample(config: SampleConfig) -> Path:
    # A LoRA that does not fit the model fails here, before the pipeline loads or any image renders.
    lora = read_lora_for(config.lora, config.model) if config.lora is not None else None
    pipe = load_pipeline(config.model, config.device, parse_dtype(config.dtype))
    pipe.set_progress_bar_config(disable=True)
    prompts = read_prompts(config.prompt, config.prompts)
    out = Path(config.out)
    options = (config.steps, config.guidance_scale, config.height, config.width)
    if lora is None:
        _save(generate(pipe, prompts, config.seed, *options), out)
        return out
    load_lora(pipe, lora, config.lora_scale)
    pipe.disable_lora()
    base = _save(generate(pipe, prompts, config.seed, *options), out / "base")
    pipe.enable_lora()
    adapted = _save(generate(pipe, prompts, config.seed, *options), out / "lora")
    side_by_side(base, adapted).save(out / "grid.png")
    return out
