"""LoRA on the MMDiT blocks with peft, and export in the format diffusers' SD3 loader reads.

The adapter is injected into the transformer itself (diffusers' `add_adapter`), so the DPO
reference is the same network with `disable_adapters()`: no second copy of the model. peft
initialises B = 0, so the adapted model starts exactly at the reference.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

LORA_FILE = "pytorch_lora_weights.safetensors"
BLOCKS = "transformer_blocks."


def block_linear_names(transformer: torch.nn.Module, suffixes: list[str]) -> list[str]:
    """Full names of the nn.Linear modules inside the transformer blocks that end with a suffix."""
    names = [
        name
        for name, module in transformer.named_modules()
        if name.startswith(BLOCKS)
        and isinstance(module, torch.nn.Linear)
        and any(name == s or name.endswith("." + s) for s in suffixes)
    ]
    if not names:
        raise ValueError(
            f"no linear layer inside {BLOCKS}* ends with any of {suffixes}; check --target-modules "
            "against the transformer's module names"
        )
    return names


def add_lora(
    transformer: SD3Transformer2DModel, rank: int, alpha: float, suffixes: list[str], seed: int = 0
) -> LoraConfig:
    """Freeze the transformer and attach a trainable fp32 LoRA to the chosen block linears."""
    transformer.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        init_lora_weights="gaussian",
        target_modules=block_linear_names(transformer, suffixes),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(config)
    for parameter in lora_parameters(transformer):
        parameter.data = parameter.data.float()
    return config


def lora_parameters(transformer: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in transformer.named_parameters() if "lora_" in n]


def lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()
    }


def save_lora_state(transformer: torch.nn.Module, path: str | os.PathLike) -> None:
    save_file(lora_state_dict(transformer), str(path))


def load_lora_state(transformer: torch.nn.Module, path: str | os.PathLike) -> None:
    result = set_peft_model_state_dict(transformer, load_file(str(path)))
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(
            f"{path} does not fit this transformer's LoRA: unexpected keys {missing[:3]}..."
        )


def export_lora(
    transformer: SD3Transformer2DModel, config: LoraConfig, output: str | os.PathLike
) -> Path:
    """Write OUTPUT/pytorch_lora_weights.safetensors as `StableDiffusion3Pipeline.load_lora_weights` reads it.

    The adapter config travels in the file's metadata: without it diffusers would guess alpha = rank.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    metadata = config.to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    StableDiffusion3Pipeline.save_lora_weights(
        output,
        transformer_lora_layers=lora_state_dict(transformer),
        transformer_lora_adapter_metadata=metadata,
        weight_name=LORA_FILE,
    )
    return output / LORA_FILE
