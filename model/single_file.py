"""`t2i export-single-file`: a trained SD3 transformer as one Stability-layout .safetensors file.

Stability's checkpoints (and what ComfyUI's "Load Diffusion Model" and sd-scripts read) name the
MMDiT's weights ``model.diffusion_model.joint_blocks.N.x_block.attn.qkv.weight`` and so on: the
reference implementation's module paths, q, k and v fused into one ``qkv`` linear, and the two
modulations that diffusers stores as (scale, shift), the last block's text-stream norm and the
final layer's, in (shift, scale) order. The linear layers' names are the LoRA tables of
model/lora_stability.py; the other weights (position table, q/k RMS norms) are listed here.
diffusers' `SD3Transformer2DModel.from_single_file(path, config=MODEL_DIR)` reads the file back.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch

from model.lora_stability import BLOCK_TO_STABILITY, GLOBAL_TO_STABILITY, SWAPPED_GLOBALS

PREFIX = "model.diffusion_model."
# diffusers parameter (outside the linears) -> Stability's
GLOBAL_PARAMETERS = {"pos_embed.pos_embed": "pos_embed"}
BLOCK_NORMS = {
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
}


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def stability_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers SD3Transformer2DModel state dict under Stability's MMDiT names (no prefix)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    unplaced = []
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        if key in GLOBAL_PARAMETERS:
            out[GLOBAL_PARAMETERS[key]] = tensor
        elif module in GLOBAL_TO_STABILITY:
            swap = module in SWAPPED_GLOBALS
            out[f"{GLOBAL_TO_STABILITY[module]}.{leaf}"] = _swap_halves(tensor) if swap else tensor
        elif match := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module):
            index, suffix = match.groups()
            block = f"joint_blocks.{index}."
            if suffix in BLOCK_NORMS:
                out[f"{block}{BLOCK_NORMS[suffix]}.{leaf}"] = tensor
            elif suffix in BLOCK_TO_STABILITY:
                target, part = BLOCK_TO_STABILITY[suffix]
                name = f"{block}{target}.{leaf}"
                if part is not None:
                    fused.setdefault(name, {})[part] = tensor
                elif suffix == "norm1_context.linear" and _is_pre_only(state, index, tensor):
                    out[name] = _swap_halves(tensor)  # the last block's (scale, shift) norm
                else:
                    out[name] = tensor
            else:
                unplaced.append(key)
        else:
            unplaced.append(key)
    if unplaced:
        raise ValueError(
            f"{len(unplaced)} transformer weights have no place in Stability's MMDiT layout "
            f"(e.g. {unplaced[0]}); is this an SD3/SD3.5 transformer?"
        )
    for name, parts in fused.items():
        if sorted(parts) != [0, 1, 2]:
            raise ValueError(f"{name}: q, k and v must all be present to fuse them")
        out[name] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return out


def _is_pre_only(state: dict[str, torch.Tensor], index: str, tensor: torch.Tensor) -> bool:
    """The last block's text stream ends in an AdaLayerNormContinuous: 2 chunks, not 6."""
    width = state[f"transformer_blocks.{index}.norm1.linear.weight"].shape[1]
    return tensor.shape[0] == 2 * width


def run_export_single_file(model: str, output: str, config) -> Path:
    """`t2i export-single-file MODEL OUTPUT`: see flows/cli.py."""
    from safetensors.torch import save_file

    from curate.runtime.output_guard import check_output_file
    from curate.runtime.store_writer import share_like_umask
    from model.folders import load_transformer
    from model.lora_formats import SAVE_DTYPES

    target = Path(output)
    if target.suffix != ".safetensors":
        raise ValueError(
            f"{output} should be a .safetensors path (one file, e.g. my-model.safetensors)"
        )
    if target.resolve().is_relative_to(Path(model).resolve()):
        raise ValueError(
            f"{output} is inside {model}; write the single file outside the model folder"
        )
    check_output_file(output, "export-single-file", {"model": model}, target)
    transformer = load_transformer(model, config.variant)
    dtype = SAVE_DTYPES[config.save_dtype]
    tensors = {
        PREFIX + k: v.detach().to("cpu", dtype, copy=True).contiguous()
        for k, v in stability_state_dict(transformer.state_dict()).items()
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    share_like_umask(tmp)
    os.replace(tmp, target)
    print(
        f"{len(tensors)} MMDiT tensors in Stability's layout ({config.save_dtype})", file=sys.stderr
    )
    return target
