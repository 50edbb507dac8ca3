"""Sampling from a local SD3 folder: one PNG per prompt and seed."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image
from tqdm.auto import tqdm

from curate.runtime.options import resolve_device
from curate.runtime.stage_runtime import StageRun
from model.config import SampleConfig
from model.folders import load_pipeline, parse_dtype
from model.lora import load_into_pipeline, read_lora_for

LORA_ADAPTER = "lora"
STAGE = "sample"


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
    max_sequence_length: int = 256,
    zero_negative: bool = False,
) -> list[tuple[str, int, Image.Image]]:
    """(prompt, seed, image) for every prompt and seed; the same seed gives the same noise.
    ZERO_NEGATIVE: guide against zero embeddings (a model trained with `--unconditional zeros`)
    instead of the pipeline's encoding of the empty prompt."""
    results = []
    for prompt in tqdm(prompts, desc="sampling", unit="prompt", disable=len(prompts) < 2):
        text = (
            zero_negative_inputs(pipe, prompt, max_sequence_length)
            if zero_negative
            else {"prompt": prompt}
        )
        for seed in seeds:
            generator = torch.Generator("cpu").manual_seed(seed)
            image = pipe(
                **text,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                generator=generator,
                max_sequence_length=max_sequence_length,
            ).images[0]
            results.append((prompt, seed, image))
    return results


def zero_negative_inputs(
    pipe: StableDiffusion3Pipeline, prompt: str, max_sequence_length: int
) -> dict:
    """The prompt's embeddings, with zeros as the negative (unconditional) embeddings."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt,
        prompt,
        prompt,
        device=pipe.device,
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )
    return {
        "prompt_embeds": embeds,
        "pooled_prompt_embeds": pooled,
        "negative_prompt_embeds": torch.zeros_like(embeds),
        "negative_pooled_prompt_embeds": torch.zeros_like(pooled),
    }


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


def trained_record(model_dir: str | Path) -> dict:
    """What `t2i train` recorded about an output folder (its manifest's extra), or {}."""
    manifest = Path(model_dir) / "manifest.json"
    if not manifest.is_file():
        return {}
    try:
        record = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return {}
    return (record.get("extra") or {}) if record.get("stage") == "train" else {}


def trained_t5_length(model_dir: str | Path) -> int | None:
    """The T5 length a `t2i train` output was trained with, or None."""
    value = trained_record(model_dir).get("t5_length")
    return int(value) if value else None


def run_sample(output: str | Path, config: SampleConfig) -> Path:
    """Write one PNG per prompt and seed into OUTPUT (`t2i sample` names it with --out)."""
    reads = {"model": config.model, "lora": config.lora, "prompts": config.prompts}
    reads["transformer_file"] = config.transformer_file
    with StageRun(output, STAGE, config, reads, accounting=False) as run:
        if run.finished:
            return run.skip()
        # A LoRA that does not fit the model fails here, before the pipeline loads or any image renders.
        lora = read_lora_for(config.lora, config.model) if config.lora is not None else None
        pipe = load_pipeline(
            config.model,
            resolve_device(config.device),
            parse_dtype(config.dtype),
            variant=config.variant,
            transformer_file=config.transformer_file,
        )
        pipe.set_progress_bar_config(disable=True)
        prompts = read_prompts(config.prompt, config.prompts)
        t5_length = config.t5_length or trained_t5_length(config.model) or 256
        zeros = trained_record(config.model).get("unconditional") == "zeros"
        options = (
            config.steps,
            config.guidance_scale,
            config.height,
            config.width,
            t5_length,
            zeros,
        )
        with run.writer(tables=False) as writer:
            out = writer.path
            if lora is None:
                _save(generate(pipe, prompts, config.seed, *options), out)
            else:
                load_lora(pipe, lora, config.lora_scale)
                pipe.disable_lora()
                base = _save(generate(pipe, prompts, config.seed, *options), out / "base")
                pipe.enable_lora()
                adapted = _save(generate(pipe, prompts, config.seed, *options), out / "lora")
                side_by_side(base, adapted).save(out / "grid.png")
            writer.counts["images"] = len(prompts) * len(config.seed) * (1 if lora is None else 2)
    return run.output
