"""Options of the dpo package's commands (the CLI, Prefect forms and manifests share them).

Kept free of heavy imports so `t2i --help` stays fast.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from model.config import LORA_BLOCK_LINEARS, ModelFiles, TimestepOptions

ALL_BLOCK_LINEARS = LORA_BLOCK_LINEARS  # every linear layer of the MMDiT blocks (SD3 appendix C)


class IngestPrefsConfig(BaseModel):
    layout: Literal["auto", "pickapic", "generic", "folder"] = Field(
        "auto",
        description="input layout: pickapic (caption, jpg_0, jpg_1, label_0), generic (caption, image_w, "
        "image_l), folder (one sub-folder per pair: caption.txt, winner.*, loser.*); auto detects it",
    )
    tie_tolerance: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="Pick-a-Pic labels within this distance of 0.5 count as ties",
    )
    split: Literal["train", "validation", "test", "validation_unique", "test_unique"] | None = (
        Field(
            None,
            description="the split to read from a folder laid out like the hub download (data/SPLIT-00000-of-NNNNN"
            ".parquet) or a saved DatasetDict; required when the folder holds more than one split",
        )
    )
    max_pairs: int | None = Field(
        None, ge=1, description="stop once this many pairs are kept (default: every pair)"
    )


class DPOConfig(ModelFiles, TimestepOptions):
    model: str = Field(
        ..., description="local diffusers SD3 folder: the base model the LoRA adapts"
    )
    beta: float = Field(
        5000.0,
        gt=0.0,
        description="DPO strength beta, in units of 1 / (per-element mean squared velocity error): "
        "loss = -log sigmoid(-beta/2 * ((err_w - ref_w) - (err_l - ref_l))); 5000 is Diffusion-DPO's "
        "SD1.5/SDXL value in the same per-element-mean units",
    )
    lr: float = Field(1e-5, gt=0.0, description="AdamW learning rate of the LoRA matrices")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    grad_clip: float = Field(
        1.0, gt=0.0, description="clip the LoRA gradients' global norm to this"
    )
    rank: int = Field(128, ge=1, description="LoRA rank (SD3 appendix C: 128)")
    alpha: float = Field(
        128.0, gt=0.0, description="LoRA alpha; the update is scaled by alpha / rank"
    )
    target_modules: list[str] = Field(
        default_factory=lambda: list(ALL_BLOCK_LINEARS),
        description="module-name suffixes inside transformer_blocks that get a LoRA (default: every "
        "linear layer of the blocks, as SD3 appendix C)",
    )
    max_steps: int = Field(
        4000, ge=1, description="optimizer steps (SD3 appendix C: 4k for the 2B model)"
    )
    batch_size: int = Field(
        4, ge=1, description="preference pairs per step on each device (accelerate: per process)"
    )
    resolution: int | None = Field(
        None, description="square training resolution in pixels; default: the model's native size"
    )
    max_sequence_length: int = Field(77, ge=1, description="T5 tokens per caption")
    heldout_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="pairs held out (by a hash of their id) for the final implicit accuracy",
    )
    log_every: int = Field(10, ge=1, description="steps per metrics row in metrics.jsonl")
    checkpoint_every: int = Field(200, ge=1, description="steps between resumable checkpoints")
    resume: bool = Field(
        True, description="continue from the latest checkpoint of an identical earlier run"
    )
    device: str | None = Field(
        None,
        description="cpu, cuda, ...; default: what accelerate picks (one GPU per process; use "
        "`accelerate launch` for several, CUDA_VISIBLE_DEVICES to choose)",
    )
    base_dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32",
        description="dtype of the frozen base transformer: fp32, fp16 or bf16 (the LoRA stays fp32)",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute the transformer's activations in backward to save memory"
    )
    init_lora: str | None = Field(
        None,
        description="continue from an existing LoRA: a diffusers-format folder (pytorch_lora_weights"
        ".safetensors) or .safetensors file; its rank, alpha and target layers replace --rank, --alpha "
        "and --target-modules",
    )
    save_dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "bf16",
        description="dtype of the exported LoRA matrices (training and checkpoints stay fp32); "
        "`t2i lora-convert` rewrites the file for kohya or ComfyUI",
    )
    seed: int = Field(0, description="seed for batches, timesteps, noise and the LoRA init")


class MakePrefsConfig(BaseModel):
    source: str = Field(
        ...,
        description="folder of images with .txt captions (e.g. `t2i demo-data OUT --format folder`) or a "
        "stage output with image and caption columns (e.g. `t2i curate` output)",
    )
    attribute: Literal["warm", "bright"] = Field(
        "warm",
        description="what makes the winner win: 'warm' = red-tinted copy beats blue-tinted copy, "
        "'bright' = brightened copy beats darkened copy",
    )
    strength: float = Field(
        0.5, gt=0.0, le=1.0, description="how strongly the attribute is applied"
    )
    caption: str | None = Field(
        None,
        description="caption for every pair; default: the image's own .txt caption, else its file name",
    )
    seed: int = Field(0, description="seed for the random crops")
    pairs_per_image: int = Field(
        1, ge=1, description="pairs made from each source image (different crops)"
    )
    swap: bool = Field(
        False, description="swap winner and loser (a control that should move the other way)"
    )
