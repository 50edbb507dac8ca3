"""Options of the commands that write files for other tools or merge them: `t2i lora-convert` (a
LoRA in another key style), `t2i export-single-file` (the transformer in Stability's layout) and
`t2i merge-lora` (a LoRA merged into its base model)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, Field

from model.config import VariantOption


class LoraConvertConfig(BaseModel):
    """`t2i lora-convert`: one LoRA file into another tool's key style."""

    # `t2i lora-convert`: its one-line summary, its --help text and its positional arguments
    summary: ClassVar[str] = "convert an SD3 LoRA between diffusers, kohya and ComfyUI key styles"
    description: ClassVar[str] = (
        "Reads a LoRA file (or a folder holding one) in diffusers, kohya (sd-scripts lora_sd3), "
        "ComfyUI, OneTrainer or peft key style, detected from its keys, and writes it in --to's "
        "style. kohya and ComfyUI use Stability's MMDiT module names with q/k/v fused (downs "
        "stacked, ups block-diagonal, alpha scaled with the rank); diffusers files carry alpha "
        "folded into B. Converting back gives the same matrices. OUTPUT is a .safetensors path "
        "or a folder (then OUTPUT/pytorch_lora_weights.safetensors)."
    )
    positionals: ClassVar[tuple[tuple[str, str], ...]] = (
        ("input", "LoRA .safetensors file or a folder with one"),
        ("output", "a .safetensors path or a folder"),
    )

    to: Literal["diffusers", "kohya", "comfyui"] = Field(
        ...,
        description="diffusers (StableDiffusion3Pipeline.load_lora_weights; alpha folded into B), kohya "
        "(sd-scripts lora_sd3: lora_unet_joint_blocks_N_..., fused qkv, .alpha) or comfyui "
        "(diffusion_model.joint_blocks.N...., fused qkv, .alpha)",
    )
    save_dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "bf16", description="dtype of the written LoRA matrices (alpha stays fp32)"
    )


class ExportSingleFileConfig(VariantOption):
    """`t2i export-single-file`: a diffusers SD3 folder's transformer in Stability's layout."""

    # `t2i export-single-file`: its one-line summary, its --help text and its positional arguments
    summary: ClassVar[str] = (
        "write a trained SD3 transformer as one Stability-layout .safetensors file (ComfyUI)"
    )
    description: ClassVar[str] = (
        "Reads MODEL's transformer (a diffusers SD3 folder: `t2i train` output, or any SD3/SD3.5 "
        "folder) and writes it under Stability's MMDiT names, model.diffusion_model.joint_blocks.N"
        ".x_block.attn.qkv.weight and so on (q/k/v fused, the (shift, scale) modulations in "
        "Stability's order): the file ComfyUI's Load Diffusion Model and sd-scripts read, and "
        "diffusers' SD3Transformer2DModel.from_single_file(OUTPUT, config=MODEL) loads back. The "
        "VAE and text encoders stay in MODEL (ComfyUI loads them separately)."
    )
    positionals: ClassVar[tuple[tuple[str, str], ...]] = (
        ("model", "diffusers SD3 folder whose transformer to export"),
        ("output", "the .safetensors file to write"),
    )

    save_dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "bf16", description="dtype of the written weights (Stability ships SD3 in 16 bits)"
    )


class MergeLoraConfig(VariantOption):
    """`t2i merge-lora`: a LoRA merged into its base model's transformer, as a new SD3 folder."""

    summary: ClassVar[str] = "merge a LoRA into its base SD3 model: a new diffusers folder"
    description: ClassVar[str] = (
        "Writes OUTPUT, a copy of the diffusers SD3 folder BASE whose transformer weights are "
        "W + alpha / rank * up @ down for every layer the LoRA adapts (the fuse_lora update), "
        "in fp32 unless --save-dtype says otherwise. A fine-tune LoRA merged this way is the "
        "reference model Diffusion-DPO needs (`t2i dpo --model OUTPUT`, a fresh LoRA)."
    )
    positionals: ClassVar[tuple[tuple[str, str], ...]] = (
        ("base", "diffusers SD3 folder the LoRA was trained on"),
        ("lora", "LoRA .safetensors file or a folder with one (any key style)"),
        ("output", "the merged diffusers folder to write"),
    )

    save_dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="dtype of the merged transformer's weights"
    )
