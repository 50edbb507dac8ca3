"""Options of the model package's commands (the CLI, Prefect forms and manifests share them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class InitModelConfig(BaseModel):
    preset: str = Field(
        "tiny", description="model size: 'tiny' or 'tiny-d4' (offline test kits with tiny encoders)"
    )
    seed: int = Field(0, description="seed for the random weights")


class SampleConfig(BaseModel):
    model: str = Field(..., description="local diffusers SD3 folder to sample from")
    prompt: list[str] = Field(default_factory=list, description="one or more prompts")
    prompts: str | None = Field(None, description="text file with one prompt per line")
    seed: list[int] = Field(default_factory=lambda: [0], description="one image per prompt and seed")
    steps: int = Field(28, ge=1, description="Euler steps (SD3 default 28)")
    guidance_scale: float = Field(7.0, ge=0.0, description="classifier-free guidance scale (SD3 default 7.0)")
    height: int | None = Field(None, description="image height; default: the model's native size")
    width: int | None = Field(None, description="image width; default: the model's native size")
    out: str = Field("samples", description="directory for the PNGs")
    device: str = Field("cpu", description="torch device, e.g. cuda or cuda:1")
    dtype: str = Field("fp32", description="fp32, fp16 or bf16")
    lora: str | None = Field(
        None,
        description="folder with pytorch_lora_weights.safetensors (e.g. `t2i dpo` output): writes base/ and "
        "lora/ PNGs for the same seeds and a side-by-side grid.png",
    )
    lora_scale: float = Field(
        1.0, description="LoRA strength: 0 gives the base model, 1 the trained LoRA"
    )


class PrecomputeConfig(BaseModel):
    model: str = Field(..., description="local diffusers SD3/SD3.5 folder whose VAE and text encoders encode the set")
    resolution: int = Field(
        256, ge=8, description="square crop side in pixels, or sqrt of the bucket area with --buckets (SD3 pre-trains at 256^2)"
    )
    buckets: bool = Field(
        False, description="aspect-ratio buckets of about resolution^2 pixels instead of square center crops (SD3 section 5.3.2)"
    )
    bucket_max_ratio: float = Field(2.0, ge=1.0, description="widest bucket aspect ratio (long side / short side)")
    t5_length: int = Field(
        77, ge=1, le=512, description="T5 tokens per caption (SD3 pre-training uses 77; 256 for long captions)"
    )
    dtype: Literal["fp16", "bf16"] = Field("fp16", description="16-bit storage type of every stored tensor")
    compute_dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="dtype the encoders run in (fp16/bf16 on GPUs to save memory)"
    )
    device: str = Field("cpu", description="torch device for the encoders, e.g. cuda or cuda:1")
    batch_size: int = Field(16, ge=1, description="images or captions per encoder call")
    shard_size: int = Field(512, ge=1, description="input rows per shard (the unit of resumption)")
