"""`t2i train --lora-rank R`: train a LoRA on a frozen base transformer instead of all its weights.

The trainer (model/train.py) calls three functions here; everything else (data, objective, EMA,
checkpoints: the adapter only, via model.checkpoint.ModuleSubset) is the same loop as full fine-tuning:

- `attach_lora`: the base goes to 16 bits when the run autocasts in 16 bits (bf16/fp16 on GPUs),
  else stays fp32; a fp32 LoRA (peft) is attached to the chosen block linears and only it trains.
- `make_optimizer`: AdamW, or bitsandbytes' 8-bit AdamW (states in 8 bits, block-wise scaled).
- `export_trained_lora`: OUTPUT/pytorch_lora_weights.safetensors in diffusers' format (alpha folded),
  which `t2i lora-convert` turns into kohya or ComfyUI files.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.lora import add_lora, lora_weights
from model.lora_formats import LORA_FILE, save_lora

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def base_dtype(requested: str, mixed_precision: str) -> torch.dtype:
    """The frozen base's dtype: 'auto' follows the autocast precision (16-bit needs autocast,
    since the fp32 inputs and the LoRA meet the base weights inside autocast's casts)."""
    if requested == "auto":
        return _DTYPES.get(mixed_precision, torch.float32)
    if requested != "fp32" and mixed_precision != requested:
        raise ValueError(
            f"--lora-base-dtype {requested} needs --mixed-precision {requested} (the run autocasts "
            f"in {mixed_precision}); use --lora-base-dtype auto"
        )
    return _DTYPES[requested]


def lora_alpha(config) -> float:
    """--lora-alpha of `t2i train` and `t2i dpo`; unset = the rank (a scale alpha / rank of 1)."""
    return config.lora_alpha if config.lora_alpha is not None else float(config.lora_rank)


def attach_lora(transformer: torch.nn.Module, config, mixed_precision: str):
    """Freeze TRANSFORMER (cast to the base dtype) and attach the trainable LoRA; None without --lora-rank."""
    if not config.lora_rank:
        return None
    transformer.to(base_dtype(config.lora_base_dtype, mixed_precision))
    alpha = lora_alpha(config)
    return add_lora(transformer, config.lora_rank, alpha, config.lora_targets, config.seed)


def make_optimizer(parameters, config, fused: bool = False) -> torch.optim.Optimizer:
    """--optimizer adamw (torch; FUSED: one kernel for all tensors) or adamw8bit (bitsandbytes),
    with the run's AdamW settings."""
    trainable = [p for p in parameters if p.requires_grad]
    kwargs = dict(
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    if config.optimizer == "adamw":
        return torch.optim.AdamW(trainable, fused=fused or None, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ValueError(
            f"--optimizer adamw8bit needs bitsandbytes ({error}); pip install bitsandbytes"
        ) from None
    return bnb.optim.AdamW8bit(trainable, **kwargs)


def export_trained_lora(model: torch.nn.Module, output: Path, config, ema=None) -> Path:
    """OUTPUT/pytorch_lora_weights.safetensors (diffusers format, --save-dtype); with EMA, its
    shadow matrices (no copy of the frozen base is made)."""
    weights = lora_weights(model, ema.shadow if ema is not None else None)
    return save_lora(weights, Path(output), "diffusers", config.save_dtype)


__all__ = [
    "LORA_FILE",
    "attach_lora",
    "base_dtype",
    "export_trained_lora",
    "lora_alpha",
    "make_optimizer",
]
