"""Options of the dpo package's commands (the CLI, Prefect forms and manifests share them).

Kept free of heavy imports so `t2i --help` stays fast.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, Field, field_validator

from curate.runtime.options import BASE_DTYPE, RenamedOptions, device_option, resume_value
from model.config import ModelFiles, ReportOptions, TimestepOptions
from model.lora_targets import (
    ALL_BLOCK_LINEARS,
    ATTENTION_PROJECTIONS,
    EMBEDDERS,
    FINAL_LAYER,
    TARGET_SETS,
    expand_lora_targets,
)

__all__ = ["ALL_BLOCK_LINEARS", "ATTENTION_PROJECTIONS", "EMBEDDERS", "FINAL_LAYER", "TARGET_SETS"]


class IngestPrefsConfig(BaseModel):
    # `t2i prefs`: its one-line summary, its --help text and its positional arguments
    summary: ClassVar[str] = (
        "ingest preference pairs (Pick-a-Pic v2, generic, or a folder of pairs)"
    )
    description: ClassVar[str] = (
        "Reads Pick-a-Pic v2 (caption, jpg_0, jpg_1, label_0; parquet or a saved dataset), a "
        "generic layout (caption, image_w, image_l) or a folder with one sub-folder per pair "
        "(caption.txt, winner.*, loser.*) and writes a preference table. Ties (label 0.5), rows "
        "with has_label or are_different false or labels not summing to 1, identical images, "
        "undecodable images and empty captions go to rejected/ with their reason. A hub-layout "
        "folder (data/SPLIT-00000-of-NNNNN.parquet) is read one --split at a time."
    )
    positionals: ClassVar[tuple[tuple[str, str], ...]] = (
        ("source", "preference data in any supported layout"),
        ("output", "output directory"),
    )

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


class DPOConfig(RenamedOptions, ModelFiles, TimestepOptions, ReportOptions):
    RENAMED = {  # old spellings, accepted with a warning until the next release (docs/options.md)
        "rank": "lora_rank",
        "alpha": "lora_alpha",
        "target_modules": "lora_targets",
        "base_dtype": "lora_base_dtype",
        "max_sequence_length": "t5_length",
    }
    # `t2i dpo`: its one-line summary, its --help text and its positional arguments
    summary: ClassVar[str] = "align a model with rank-128 LoRA Diffusion-DPO on preference pairs"
    description: ClassVar[str] = (
        "Diffusion-DPO (Wallace et al. 2023) on a rectified-flow model, errors in noise-prediction "
        "units so beta means Diffusion-DPO's beta, with a LoRA (rank 128, alpha 128) on the "
        "attention projections of the MMDiT blocks. Winner and loser share t and noise; the "
        "reference is the same network with the adapter disabled. PREFS is raw preference data "
        "(any layout `t2i prefs` reads) or its output. Writes OUTPUT/pytorch_lora_weights."
        "safetensors (StableDiffusion3Pipeline.load_lora_weights reads it), report.md (base vs "
        "LoRA samples for held-out captions, the --scorer win rate, then training diagnostics), "
        "metrics.jsonl (loss, implicit accuracy, margin, winner drift, saturation) and "
        "summary.json. Rerunning an interrupted run resumes from its last checkpoint."
    )
    positionals: ClassVar[tuple[tuple[str, str], ...]] = (
        ("prefs", "preference data or a `t2i prefs` output"),
        ("output", "output directory"),
    )

    model: str = Field(
        ..., description="local diffusers SD3 folder: the base model the LoRA adapts"
    )
    beta: float = Field(
        5000.0,
        gt=0.0,
        description="DPO strength beta, in units of 1 / (per-element mean squared noise-prediction error), "
        "Diffusion-DPO's units: loss = -log sigmoid(-beta/2 * ((err_w - ref_w) - (err_l - ref_l))) with "
        "each err the velocity MSE times (1 - t)^2 (see --error-units)",
    )
    error_units: Literal["noise", "velocity"] = Field(
        "noise",
        description="units of the per-sample errors inside the loss: noise = velocity MSE x (1 - t)^2, "
        "the noise-prediction MSE Diffusion-DPO's beta refers to; velocity = the raw velocity MSE "
        "(beta then acts 1/(1-t)^2 times stronger: ~16x at SD3's median t with shift 3)",
    )
    dpop_lambda: float = Field(
        0.0,
        ge=0.0,
        description="DPO-Positive (Pal et al. 2024) penalty lambda: the margin loses "
        "beta/2 * lambda * max(0, err_w - ref_w), so winners may not get worse than the reference; 0 = off",
    )
    sft_weight: float = Field(
        0.0,
        ge=0.0,
        description="weight gamma of an SFT term on winners, + gamma * beta/2 * mean(err_w - ref_w) "
        "(the winners' diffusion loss in the DPO term's units); 0 = off",
    )
    anchor_weight: float = Field(
        0.0,
        ge=0.0,
        description="weight of an adapter-off anchor on both halves of each pair: + weight * beta/2 * "
        "mean((1 - t)^2 (v_lora - v_base)^2), the change of the prediction in the DPO term's units "
        "(dpo/regularizers.py); 0 = off",
    )
    preserve_captions: list[str] = Field(
        default_factory=list,
        description="captions outside the preference set whose predictions the LoRA must keep (a "
        "sample of the base's training captions): each step every pair's noisy latents are also fed "
        "with one of them and the LoRA is pulled toward the adapter-off base (dpo/regularizers.py); "
        "keep them apart from --offtarget-captions, which judge what was not trained on",
    )
    preserve_weight: float = Field(
        2.0,
        ge=0.0,
        description="weight of that preservation term, + weight * beta/2 * mean((1 - t)^2 "
        "(v_lora - v_base)^2) on --preserve-captions (measured: benchmarks/RESULTS.md, issue 20: "
        "2 kept every held-out prompt within 0.05 of the base on two toys; 1 let the preference leak "
        "into prompts naming the losing colour, 3-5 over-corrected prompts naming the preferred one); "
        "acts only with --preserve-captions; 0 = off",
    )
    lr: float = Field(
        1e-4,
        gt=0.0,
        description="AdamW learning rate of the LoRA matrices (measured: benchmarks/RESULTS.md, issue 11)",
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    grad_clip: float = Field(
        1.0, gt=0.0, description="clip the LoRA gradients' global norm to this"
    )
    lora_rank: int = Field(128, ge=1, description="LoRA rank (SD3 appendix C: 128)")
    lora_alpha: float | None = Field(
        None,
        gt=0.0,
        description="LoRA alpha (the update is scaled by alpha / rank); default: the rank",
    )
    lora_targets: list[str] = Field(
        default_factory=lambda: list(ATTENTION_PROJECTIONS),
        description="module-name suffixes of the transformer's linear/conv layers that get a LoRA "
        "(attn.to_q, ff.net.2, proj_out, context_embedder, pos_embed.proj, time_text_embed.*: * is a "
        "wildcard), or the shorthands `attention` / `all-linears` (inside the blocks), `embedders` / "
        "`final-layer` (outside them). Default: the attention "
        "projections of both streams; every block linear as in SD3 appendix C (feed-forwards and AdaLN "
        "modulation too) moved prompts outside the preference set far more in the measurements "
        "(benchmarks/RESULTS.md, issue 11)",
    )

    _targets = field_validator("lora_targets")(expand_lora_targets)
    _resume = field_validator("resume", mode="before")(resume_value)

    max_steps: int = Field(
        4000, ge=1, description="optimizer steps (SD3 appendix C: 4k for the 2B model)"
    )
    batch_size: int = Field(
        4,
        ge=1,
        description="preference pairs per micro-batch on each device (accelerate: per process)",
    )
    grad_accum: int = Field(
        1,
        ge=1,
        description="micro-batches per optimizer step (effective batch = batch size x grad accum)",
    )
    resolution: int | None = Field(
        None, description="square training resolution in pixels; default: the model's native size"
    )
    t5_length: int = Field(77, ge=1, le=512, description="T5 tokens per caption")
    heldout_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="pairs held out (by a hash of their id) for the final implicit accuracy",
    )
    eval_seeds: int = Field(
        4,
        ge=0,
        description="after training, sample each evaluation caption with seeds 0..N-1 without and with "
        "the LoRA (side by side in OUT/eval/, win rate under --scorer in report.md); 0 = skip",
    )
    eval_captions: list[str] = Field(
        default_factory=list,
        description="captions for that comparison; default: the held-out pairs' captions",
    )
    offtarget_captions: list[str] = Field(
        default_factory=list,
        description="captions outside the preference set to watch, e.g. ones naming the attribute "
        "the losers have ('a blue car' when warm wins): sampled with the same seeds, each one's "
        "change reported on its own in report.md and summary.json, the worst drop first; a "
        "caption that occurs in the preference set is refused",
    )
    select_every: int = Field(
        0,
        ge=0,
        description="every N steps, export the LoRA so far and sample the preference and off-target "
        "captions (needs --scorer and --offtarget-captions); the exported LoRA is then the best "
        "checkpoint by dpo/selection.py's rule: the largest preference gain among those whose worst "
        "off-target caption fell by at most --select-tolerance; 0 = off (export the last step)",
    )
    select_tolerance: float = Field(
        0.05,
        ge=0.0,
        description="largest drop of any off-target caption's mean score (scorer units) a selected "
        "checkpoint may have",
    )
    eval_max_captions: int = Field(
        4, ge=1, description="at most this many held-out captions when --eval-captions is not given"
    )
    eval_steps: int = Field(28, ge=1, description="sampling steps of the comparison")
    eval_guidance: float = Field(
        7.0, ge=1.0, description="classifier-free guidance of the comparison"
    )
    scorer: str | None = Field(
        None,
        description="judge of the comparison: a local CLIP-style preference model folder (e.g. PickScore, "
        "a CLIPModel with its processor) or attribute:warm / attribute:bright (t2i make-prefs' attribute); "
        "report.md then gives the LoRA's win rate over the base",
    )
    log_every: int = Field(10, ge=1, description="steps per metrics row in metrics.jsonl")
    checkpoint_every: int = Field(200, ge=1, description="steps between resumable checkpoints")
    resume: str | None = Field(
        "latest",
        description="latest = continue from the latest checkpoint of an identical earlier run (its "
        "checkpoints are kept under a key of the run's options), a checkpoint folder, or none = "
        "start over",
    )
    device: str = device_option(
        "one process per device; `accelerate launch` for several, CUDA_VISIBLE_DEVICES to choose"
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description="autocast precision; auto = bf16 on a GPU that supports it, else none (fp32 on CPU)",
    )
    lora_base_dtype: BASE_DTYPE = Field(
        "auto",
        description="dtype of the frozen base transformer (the LoRA stays fp32); auto = the autocast "
        "precision: bf16 on GPUs (half the memory of fp32, docs/gpu.md), fp32 without autocast (CPU)",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute the transformer's activations in backward to save memory"
    )
    init_lora: str | None = Field(
        None,
        description="continue from an existing LoRA: a diffusers-format folder (pytorch_lora_weights"
        ".safetensors) or .safetensors file; its rank, alpha and target layers replace --lora-rank, "
        "--lora-alpha and --lora-targets",
    )
    save_dtype: Literal["fp32", "fp16", "bf16"] = Field(
        "bf16",
        description="dtype of the exported LoRA matrices (training and checkpoints stay fp32); "
        "`t2i lora-convert` rewrites the file for kohya or ComfyUI",
    )
    seed: int = Field(0, description="seed for batches, timesteps, noise and the LoRA init")


class MakePrefsConfig(BaseModel):
    # `t2i make-prefs`: its one-line summary, its --help text and its positional arguments
    summary: ClassVar[str] = "build synthetic preference pairs from a folder of images"
    description: ClassVar[str] = (
        "Makes two edited copies of each image, one with a measurable attribute (a warm tint, "
        "or brightness) and one with its opposite, and writes them as a folder of pairs "
        "(winner = the attribute) that `t2i dpo` reads. For demos and for checking that DPO "
        "moves a model the right way; --swap makes the control with the labels reversed."
    )
    positionals: ClassVar[tuple[tuple[str, str], ...]] = (
        ("output", "directory for the pair folders"),
    )

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
