"""`t2i dpo --init-lora`: continue training from an existing LoRA instead of a fresh one.

Reads a diffusers-format LoRA (a folder with pytorch_lora_weights.safetensors, or the file):
keys `transformer.<module>.lora_A.weight` / `.lora_B.weight`, with the adapter config (rank,
alpha, targets) in the file's `lora_adapter_metadata` when diffusers or `t2i dpo` wrote it, else
rank from the matrices and alpha = rank (diffusers' own assumption). The adapter is rebuilt on
exactly the named layers and loaded, so step 0 of the new run samples like the old LoRA.

Other key styles (kohya `lora_unet_...`, ComfyUI) go through `to_diffusers_keys`: the hook
where a converter for them plugs in; today it names the style it cannot read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import set_peft_model_state_dict
from safetensors import safe_open

from dpo.lora import LORA_FILE, lora_parameters

PREFIX = "transformer."
METADATA_KEY = "lora_adapter_metadata"


def lora_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    file = path / LORA_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"--init-lora {path}: no {LORA_FILE} there; pass a diffusers-format LoRA folder or its "
            ".safetensors file"
        )
    return file


def to_diffusers_keys(state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """The state dict with diffusers SD3 keys; the place for converters of other key styles."""
    if state and all(k.startswith(PREFIX) and ".lora_" in k for k in state):
        return state
    example = next(iter(state), "(no tensors)")
    style = (
        "kohya/ComfyUI"
        if example.startswith(("lora_unet_", "lora_te", "diffusion_model."))
        else "unknown"
    )
    raise ValueError(
        f"--init-lora {source}: keys like {example!r} are {style} style; only diffusers-format SD3 "
        "LoRAs (transformer.<module>.lora_A.weight) are read so far"
    )


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(peft state dict without the `transformer.` prefix, adapter metadata or {})."""
    file = lora_file(path)
    with safe_open(str(file), framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata() or {}
    state = to_diffusers_keys(state, file)
    raw = json.loads(metadata.get(METADATA_KEY, "{}"))
    adapter = {k.removeprefix(PREFIX): v for k, v in raw.items()}
    return {k.removeprefix(PREFIX): v for k, v in state.items()}, adapter


def add_init_lora(transformer, path: str | os.PathLike) -> LoraConfig:
    """Attach the LoRA at PATH to the frozen transformer as the trainable fp32 adapter."""
    state, adapter = read_lora(path)
    modules = sorted({k.split(".lora_")[0] for k in state})
    known = {name for name, _ in transformer.named_modules()}
    missing = [m for m in modules if m not in known]
    if missing:
        raise ValueError(
            f"--init-lora {path} adapts layers this model does not have, e.g. {missing[:3]}; "
            "was it trained on another architecture?"
        )
    rank = int(adapter.get("r") or next(v.shape[0] for k, v in state.items() if "lora_A" in k))
    config = LoraConfig(r=rank, lora_alpha=float(adapter.get("lora_alpha") or rank),
                        init_lora_weights=True, target_modules=modules)  # fmt: skip
    transformer.requires_grad_(False)
    transformer.add_adapter(config)
    result = set_peft_model_state_dict(transformer, state)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"--init-lora {path} does not fit: unexpected keys {unexpected[:3]}")
    for parameter in lora_parameters(transformer):
        parameter.data = parameter.data.float()
        parameter.requires_grad_(True)
    return config
