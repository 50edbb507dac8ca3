"""Options of the model package's commands (the CLI, Prefect forms and manifests share them)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, Field, field_validator

from curate.runtime.executor import ExecutorOptions
from curate.runtime.options import BASE_DTYPE, RenamedOptions, device_option, resume_value
from model.lora_targets import (
    LORA_BLOCK_LINEARS,
    expand_lora_targets,
)


class VariantOption(BaseModel):
    """Which weight files of --model to load (every command that loads an SD3 folder takes it)."""

    variant: str | None = Field(
        None,
        description="weight variant of --model, e.g. fp16: load its *.fp16.safetensors files (a folder "
        "saved with save_pretrained(variant='fp16')); default: the files without a variant",
    )


class ModelFiles(VariantOption):
    """--variant, plus a Stability single-file transformer in place of --model's."""

    transformer_file: str | None = Field(
        None,
        description="Stability single-file SD3/SD3.5 checkpoint (e.g. sd3.5_medium.safetensors, MMDiT keys "
        "model.diffusion_model.joint_blocks.*) used as the transformer; --model supplies its "
        "transformer/config.json, the VAE, encoders and scheduler",
    )


class InitModelConfig(BaseModel):
    # `t2i init-model`: its one-line summary, its --help text and its positional arguments
    summary: ClassVar[str] = (
        "write a random-weight SD3 pipeline folder built from configs (offline)"
    )
    description: ClassVar[str] = (
        "Builds SD3Transformer2DModel (QK RMS-norm), a 16-channel AutoencoderKL, CLIP-L, CLIP-G, "
        "T5 and their tokenizers from configs alone, with random weights, and saves a diffusers "
        "folder that StableDiffusion3Pipeline.from_pretrained(OUTPUT) loads with no model hub."
    )
    positionals: ClassVar[tuple[tuple[str, str], ...]] = (
        ("output", "directory for the diffusers pipeline folder"),
    )

    preset: str = Field(
        "tiny",
        description="model size: 'tiny', 'tiny-d4' or 'tiny-d2-64' (offline test kits with tiny "
        "encoders; tiny-d2-64 has SD3's 64-wide heads, hidden 64 x depth, as sd-scripts and ComfyUI "
        "expect)",
    )
    seed: int = Field(0, description="seed for the random weights")


class SampleConfig(RenamedOptions, ModelFiles):
    RENAMED = {"max_sequence_length": "t5_length"}  # accepted until the next release
    # `t2i sample`: its one-line summary, its --help text and its positional arguments
    summary: ClassVar[str] = "generate images from a diffusers SD3 folder"
    description: ClassVar[str] = (
        "Loads --model (any local SD3/SD3.5 diffusers folder, e.g. stable-diffusion-3-medium-"
        "diffusers or `t2i init-model` output) and writes one PNG per prompt and seed to --out."
    )
    positionals: ClassVar[tuple[tuple[str, str], ...]] = ()

    model: str = Field(..., description="local diffusers SD3 folder to sample from")
    prompt: list[str] = Field(default_factory=list, description="one or more prompts")
    prompts: str | None = Field(None, description="text file with one prompt per line")
    seed: list[int] = Field(
        default_factory=lambda: [0], description="one image per prompt and seed"
    )
    steps: int = Field(28, ge=1, description="Euler steps (SD3 default 28)")
    guidance_scale: float = Field(
        7.0, ge=0.0, description="classifier-free guidance scale (SD3 default 7.0)"
    )
    height: int | None = Field(None, description="image height; default: the model's native size")
    width: int | None = Field(None, description="image width; default: the model's native size")
    t5_length: int | None = Field(
        None,
        ge=1,
        le=512,
        description="T5 tokens per prompt; default: the length --model was trained with (recorded by `t2i train` "
        "in its manifest.json), else 256 (the pipeline's default)",
    )
    out: str = Field("samples", description="directory for the PNGs")
    device: str = device_option()
    dtype: str = Field("fp32", description="fp32, fp16 or bf16")
    lora: str | None = Field(
        None,
        description="LoRA .safetensors file, or a folder with one (e.g. `t2i dpo` output), in diffusers, kohya, "
        "ComfyUI or OneTrainer key style: writes base/ and lora/ PNGs for the same seeds and a side-by-side grid.png",
    )
    lora_scale: float = Field(
        1.0, description="LoRA strength: 0 gives the base model, 1 the trained LoRA"
    )


class PrecomputeConfig(VariantOption, ExecutorOptions):
    # `t2i precompute`: its one-line summary, its --help text and its positional arguments
    summary: ClassVar[str] = (
        "pre-encode VAE latents and CLIP-L/CLIP-G/T5 embeddings of a captioned set (16-bit, memory-mapped)"
    )
    description: ClassVar[str] = (
        "Reads a curated or captioned store (id, image, caption, optional caption_synthetic) and "
        "encodes every image (square center crop at --resolution, or aspect-ratio buckets) with "
        "the VAE of --model (latents after its shift and scaling factors), and the original "
        "caption, the synthetic caption when present and the empty prompt with CLIP-L, CLIP-G "
        "(penultimate states + pooled projections) and T5 (last hidden states, --t5-length "
        "tokens, with the mask), exactly as StableDiffusion3Pipeline.encode_prompt does (SD3 "
        "section 5.3.1). One encoder is loaded at a time; output is safetensors shards plus an "
        "index, resumable per shard. Images that fail are listed in OUTPUT/rejected. Read the "
        "result with model.encoded.EncodedDataset."
    )
    positionals: ClassVar[tuple[tuple[str, str], ...]] = (
        ("input", "a curated or captioned store (a stage output directory)"),
        ("output", "directory for the pre-encoded set"),
    )

    model: str = Field(
        ...,
        description="local diffusers SD3/SD3.5 folder whose VAE and text encoders encode the set",
    )
    resolution: int = Field(
        256,
        ge=8,
        description="square crop side in pixels, or sqrt of the bucket area with --buckets (SD3 pre-trains at 256^2)",
    )
    buckets: bool = Field(
        False,
        description="aspect-ratio buckets of about resolution^2 pixels instead of square center crops (SD3 section 5.3.2)",
    )
    bucket_max_ratio: float = Field(
        2.0, ge=1.0, description="widest bucket aspect ratio (long side / short side)"
    )
    t5_length: int = Field(
        77,
        ge=1,
        le=512,
        description="T5 tokens per caption (SD3 pre-training uses 77; 256 for long captions)",
    )
    dtype: Literal["fp16", "bf16"] = Field(
        "fp16", description="16-bit storage type of every stored tensor"
    )
    compute_dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="dtype the encoders run in (fp16/bf16 on GPUs to save memory)"
    )
    device: str = device_option("of the encoders")
    batch_size: int = Field(16, ge=1, description="images or captions per encoder call")
    shard_size: int = Field(512, ge=1, description="input rows per shard (the unit of resumption)")


class TimestepOptions(BaseModel):
    """How training timesteps are drawn (SD3 sections 3.1 and 5.3.2); `t2i train` and `t2i dpo` share it."""

    density: Literal["logit_normal", "mode", "cosmap", "uniform"] = Field(
        "logit_normal", description="training timestep density (SD3 section 3.1: logit_normal)"
    )
    logit_mean: float = Field(0.0, description="logit-normal location m (SD3: 0.0)")
    logit_std: float = Field(1.0, gt=0, description="logit-normal scale s (SD3: 1.0)")
    mode_scale: float = Field(1.29, description="scale s of the mode(s) density (SD3 Eq. 20: 1.29)")
    shift: float | None = Field(
        None,
        gt=0,
        description="resolution shift alpha of Eq. 23 applied to every drawn timestep; default: the base "
        "model scheduler's shift when continuing a transformer (`t2i dpo`, and `t2i train` without --preset, "
        "which then leaves the exported scheduler as it was); for a fresh `t2i train --preset` model "
        "max(1, sqrt(pixels / 256^2)) of the encoded set (4.0 at 1024^2, where SD3 picked 3.0 by human "
        "preference; 1.0 at 256^2 and below), stored in the output scheduler for sampling",
    )


class ReportOptions(BaseModel):
    """Where `t2i train` and `t2i dpo` log while they run (model/trackers.py)."""

    report_to: Literal["tensorboard", "wandb", "all", "none"] = Field(
        "tensorboard",
        description="scalars and sample grids while the run trains go to: tensorboard (event files in "
        "the run's logs/ folder), wandb (Weights & Biases: pip install wandb; WANDB_MODE=offline keeps "
        "the run on disk, WANDB_PROJECT names the project), all (both) or none",
    )


class TrainConfig(ModelFiles, TimestepOptions, ReportOptions):
    """`t2i train`: rectified-flow training of the MMDiT on a pre-encoded set (SD3 paper sections 2-3, 5)."""

    # `t2i train`: its one-line summary, its --help text and its positional arguments
    summary: ClassVar[str] = "train the SD3 MMDiT with rectified flow on a pre-encoded set"
    description: ClassVar[str] = (
        "Reads ENCODED (output of `t2i precompute`) and trains --model's transformer, or a fresh "
        "one from --preset, with the SD3 recipe: logit-normal(0, 1) timesteps with the "
        "resolution shift, velocity loss eps - x0, each text encoder dropped with p = 0.464, "
        "original or synthetic caption with p = 0.5, AdamW (lr 1e-4, eps 1e-15, 1000 warmup "
        "steps), EMA. Writes OUTPUT as a diffusers SD3 folder (EMA weights, training shift in "
        "the scheduler) and OUTPUT/training/{checkpoints,logs,samples}. Resume with --resume "
        "latest. With --lora-rank R it trains a LoRA on the frozen transformer instead (16-bit "
        "base under 16-bit autocast; --optimizer adamw8bit, --gradient-checkpointing) and writes "
        "OUTPUT/pytorch_lora_weights.safetensors. Multi-GPU/FSDP: `accelerate launch -m "
        "flows.cli train ...` with accelerate's own config."
    )
    positionals: ClassVar[tuple[tuple[str, str], ...]] = (
        ("encoded", "pre-encoded set written by `t2i precompute`"),
        ("output", "directory for the trained diffusers pipeline folder"),
    )

    model: str = Field(
        ...,
        description="local diffusers SD3 folder: its VAE, encoders, tokenizers and scheduler are copied "
        "to the output; its transformer is trained further unless --preset starts a fresh one",
    )
    preset: str | None = Field(
        None,
        description="random-init the MMDiT from a depth preset (d2..d38: hidden 64*d, d heads, QK "
        "RMS-norm; tiny, tiny-d4) instead of continuing --model's transformer; widths come from --model's encoders",
    )
    init_from: str | None = Field(
        None,
        description="diffusers transformer folder to start from instead of --model/transformer",
    )
    # optimisation (SD3 section 5.1 / 5.3.3)
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (SD3: 1e-4)")
    warmup_steps: int = Field(
        1000, ge=0, description="linear learning-rate warmup steps, then constant (SD3: 1000)"
    )
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant",
        description="the learning rate after the warmup: constant (SD3), or a cosine / linear decay "
        "to 0 at --max-steps",
    )
    adam_beta1: float = Field(0.9, description="AdamW beta1")
    adam_beta2: float = Field(0.999, description="AdamW beta2")
    adam_eps: float = Field(
        1e-15, gt=0, description="AdamW epsilon (SD3 uses 1e-15 together with QK RMS-norm)"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(
        1.0, ge=0, description="clip the global gradient norm to this (0: no clipping)"
    )
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")
    batch_size: int = Field(
        8,
        ge=1,
        description="micro-batch size per device (SD3 pretrains with a global batch of 4096)",
    )
    max_steps: int = Field(1000, ge=1, description="optimizer steps to train for")
    ema_decay: float = Field(
        0.9999,
        ge=0,
        lt=1,
        description="EMA decay of the weights, warmed up as min(decay, (1+n)/(10+n))",
    )
    export_ema: bool = Field(
        True, description="write the EMA weights (not the raw ones) as the output transformer"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward to save memory"
    )
    # rectified flow (sections 2-3, Eq. 19-23): density and shift come from TimestepOptions
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = Field(
        "none",
        description="extra loss weight per timestep (SD3: none; the density does the weighting)",
    )
    unconditional: Literal["empty", "zeros"] = Field(
        "empty",
        description="what a dropped text encoder is replaced by: 'empty' = that encoder's encoding of the empty "
        "prompt (stored by precompute; the same negative input the stock StableDiffusion3Pipeline uses for "
        "guidance), 'zeros' = zero tensors",
    )
    encoder_drop: float = Field(
        0.464,
        ge=0,
        le=1,
        description="drop each of CLIP-L, CLIP-G, T5 independently with this p (SD3: 0.464)",
    )
    synthetic_caption_p: float = Field(
        0.5,
        ge=0,
        le=1,
        description="probability of the synthetic caption per sample per step (SD3: 0.5)",
    )
    # validation, logging, samples
    val_fraction: float = Field(
        0.05, ge=0, lt=1, description="share of samples held out for validation"
    )
    val_max_samples: int = Field(256, ge=0, description="at most this many held-out samples")
    val_timesteps: list[float] = Field(
        default_factory=lambda: [(i + 0.5) / 8 for i in range(8)],
        description="fixed timestep grid of the validation loss (the paper finds it tracks sample quality)",
    )
    val_ema: bool = Field(
        True,
        description="compute the validation loss with the EMA weights (what is exported and what SD3 selects "
        "by); --no-val-ema: the raw weights",
    )
    val_every: int = Field(
        500, ge=0, description="validation loss every N steps (0: only at the end)"
    )
    log_every: int = Field(
        50, ge=1, description="console line and TensorBoard scalars every N steps"
    )
    sample_every: int = Field(
        1000,
        ge=0,
        description="sample grid PNG every N steps (0: only at the end; needs --sample-count > 0)",
    )
    sample_count: int = Field(4, ge=0, description="held-out captions in the sample grid")
    sample_steps: int = Field(28, ge=1, description="Euler steps for sample grids (SD3: 28)")
    sample_guidance: float = Field(
        7.0, ge=0, description="classifier-free guidance for sample grids (SD3: 7.0)"
    )
    # checkpoints
    checkpoint_every: int = Field(
        500, ge=0, description="save the full training state every N steps (0: never)"
    )
    checkpoints_total_limit: int = Field(3, ge=1, description="keep only the newest N checkpoints")
    resume: str | None = Field(
        None,
        description="latest = continue from the newest checkpoint in OUTPUT/training/checkpoints, a "
        "checkpoint folder, or none; default none, and a rerun into a folder holding checkpoints is "
        "refused",
    )
    # execution
    device: str = device_option("one process per device; `accelerate launch` for multi-GPU")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="autocast precision; auto = bf16 on GPUs that support it, else fp32"
    )
    seed: int = Field(
        0, description="seed for weights, data order, timesteps, noise, encoder drop and captions"
    )
    compile: bool = Field(
        False,
        description="torch.compile the transformer (worth it on GPUs; the first steps pay the compile time)",
    )
    tf32: bool = Field(
        True, description="allow TF32 matmuls for fp32 work on NVIDIA GPUs (no effect on CPU)"
    )
    # low-memory mode: a LoRA on the frozen base (model/lora_train.py)
    lora_rank: int | None = Field(
        None,
        ge=1,
        description="train a LoRA of this rank on the frozen transformer instead of all its weights; "
        "OUTPUT then holds pytorch_lora_weights.safetensors for --model",
    )
    lora_alpha: float | None = Field(
        None, gt=0, description="LoRA alpha (update scaled by alpha / rank); default: the rank"
    )
    lora_targets: list[str] = Field(
        default_factory=lambda: list(LORA_BLOCK_LINEARS),
        description="module-name suffixes of the transformer's linear/conv layers that get a LoRA "
        "(default: every linear layer of the blocks; proj_out, context_embedder, pos_embed.proj, "
        "time_text_embed.* reach outside them; * is a wildcard)",
    )
    _targets = field_validator("lora_targets")(expand_lora_targets)
    _resume = field_validator("resume", mode="before")(resume_value)
    lora_base_dtype: BASE_DTYPE = Field(
        "auto",
        description="dtype of the frozen base under --lora-rank; auto = the autocast precision (bf16 "
        "on GPUs), fp32 without autocast (CPU)",
    )
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw",
        description="adamw (torch) or adamw8bit (bitsandbytes: optimizer states in 8 bits)",
    )
    save_dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "bf16", description="dtype of the exported LoRA matrices under --lora-rank"
    )
