"""`t2i train --lora-rank R`: train a LoRA on a frozen base transformer instead of all its weights.

The trainer (model/train.py) calls four functions here; everything else (data, objective, EMA,
accelerate, resume) is the same loop as full fine-tuning:

- `attach_lora`: the base goes to 16 bits when the run autocasts in 16 bits (bf16/fp16 on GPUs),
  else stays fp32; a fp32 LoRA (peft) is attached to the chosen block linears and only it trains.
- `make_optimizer`: AdamW, or bitsandbytes' 8-bit AdamW (states in 8 bits, block-wise scaled).
- `keep_only_lora_in_checkpoints`: accelerate's checkpoints hold the LoRA, not the frozen base, and
  load back exactly (the base comes from --model / --init-from again).
- `export_trained_lora`: OUTPUT/pytorch_lora_weights.safetensors in diffusers' format (alpha folded),
  which `t2i lora-convert` turns into kohya or ComfyUI files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from model.lora import add_lora, export_lora
from model.lora_formats import LORA_FILE

MODEL_FILE = "model.safetensors"  # accelerate's name for the first prepared model's weights
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


def attach_lora(transformer: torch.nn.Module, config, mixed_precision: str):
    """Freeze TRANSFORMER (cast to the base dtype) and attach the trainable LoRA; None without --lora-rank."""
    if not config.lora_rank:
        return None
    transformer.to(base_dtype(config.lora_base_dtype, mixed_precision))
    alpha = config.lora_alpha if config.lora_alpha is not None else float(config.lora_rank)
    return add_lora(transformer, config.lora_rank, alpha, config.lora_targets, config.seed)


def make_optimizer(parameters, config) -> torch.optim.Optimizer:
    """--optimizer adamw (torch) or adamw8bit (bitsandbytes), with the run's AdamW settings."""
    trainable = [p for p in parameters if p.requires_grad]
    kwargs = dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                  weight_decay=config.weight_decay)  # fmt: skip
    if config.optimizer == "adamw":
        return torch.optim.AdamW(trainable, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ValueError(
            f"--optimizer adamw8bit needs bitsandbytes ({error}); pip install bitsandbytes"
        ) from None
    return bnb.optim.AdamW8bit(trainable, **kwargs)


def keep_only_lora_in_checkpoints(accelerator, transformer: torch.nn.Module) -> None:
    """Checkpoints of a LoRA run store the adapter's tensors only; loading puts them back exactly."""

    def lora_only(state: dict) -> None:
        for key in [k for k in state if "lora_" not in k]:
            del state[key]

    def save_hook(models, weights, output_dir) -> None:
        for state in weights:
            lora_only(state)

    def load_hook(models, input_dir) -> None:
        model = accelerator.unwrap_model(models[0])
        state = load_file(str(Path(input_dir) / MODEL_FILE))
        expected = {k for k in model.state_dict() if "lora_" in k}
        if set(state) != expected:
            raise ValueError(
                f"checkpoint {input_dir} does not hold this run's LoRA ({len(state)} tensors, "
                f"{len(expected)} expected): was it written with other --lora-rank/--lora-targets?"
            )
        model.load_state_dict(state, strict=False)
        models.pop(0)  # accelerate must not load it again (strictly, without the base)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def export_trained_lora(model: torch.nn.Module, output: Path, config) -> Path:
    """OUTPUT/pytorch_lora_weights.safetensors (diffusers format, --save-dtype)."""
    return export_lora(model, None, Path(output), config.save_dtype)


__all__ = [
    "LORA_FILE",
    "attach_lora",
    "base_dtype",
    "export_trained_lora",
    "keep_only_lora_in_checkpoints",
    "make_optimizer",
]
