"""Model folders shaped like the ones users download, made from the tiny kit (tests only).

    fp16_folder(tiny, out)      save_pretrained(variant="fp16"): only *.fp16.safetensors weights
    t5_less_folder(tiny, out)   loaded with text_encoder_3=tokenizer_3=None and saved: both null
                                in model_index.json, no folders
    stability_file(transformer, path)
                                the MMDiT's weights under Stability's key names
                                (model.diffusion_model.joint_blocks.N...), as in sd3.5_medium.safetensors

`stability_state_dict` runs diffusers' single-file conversion (single_file_utils'
convert_sd3_transformer_checkpoint_to_diffusers) backwards, so loading its output through
`from_single_file` must give back the same tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import save_file

from model.folders import load_pipeline

PREFIX = "model.diffusion_model."


def fp16_folder(tiny: str | Path, out: Path) -> Path:
    pipe = load_pipeline(tiny)  # diffusers itself needs text_encoder_3=None for T5-less folders
    pipe.to(torch.float16).save_pretrained(out, variant="fp16")
    return out


def t5_less_folder(tiny: str | Path, out: Path) -> Path:
    pipe = StableDiffusion3Pipeline.from_pretrained(
        tiny, text_encoder_3=None, tokenizer_3=None, local_files_only=True
    )
    pipe.save_pretrained(out)
    return out


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """AdaLayerNorm's (scale, shift) <-> Stability's (shift, scale); its own inverse."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def stability_state_dict(transformer: SD3Transformer2DModel) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    last = transformer.config.num_layers - 1
    out = {
        "pos_embed": sd.pop("pos_embed.pos_embed"),
        "x_embedder.proj.weight": sd.pop("pos_embed.proj.weight"),
        "x_embedder.proj.bias": sd.pop("pos_embed.proj.bias"),
        "context_embedder.weight": sd.pop("context_embedder.weight"),
        "context_embedder.bias": sd.pop("context_embedder.bias"),
        "final_layer.linear.weight": sd.pop("proj_out.weight"),
        "final_layer.linear.bias": sd.pop("proj_out.bias"),
        "final_layer.adaLN_modulation.1.weight": _swap_halves(sd.pop("norm_out.linear.weight")),
        "final_layer.adaLN_modulation.1.bias": _swap_halves(sd.pop("norm_out.linear.bias")),
    }
    for ours, theirs in (("timestep_embedder", "t_embedder"), ("text_embedder", "y_embedder")):
        for a, b in (("linear_1", "0"), ("linear_2", "2")):
            for kind in ("weight", "bias"):
                out[f"{theirs}.mlp.{b}.{kind}"] = sd.pop(f"time_text_embed.{ours}.{a}.{kind}")
    for i in range(transformer.config.num_layers):
        block, theirs = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        x, c = theirs + "x_block.", theirs + "context_block."
        for kind in ("weight", "bias"):
            out[f"{x}attn.qkv.{kind}"] = torch.cat(
                [sd.pop(f"{block}attn.to_{n}.{kind}") for n in "qkv"]
            )
            out[f"{c}attn.qkv.{kind}"] = torch.cat(
                [sd.pop(f"{block}attn.add_{n}_proj.{kind}") for n in "qkv"]
            )
            out[f"{x}attn.proj.{kind}"] = sd.pop(f"{block}attn.to_out.0.{kind}")
            out[f"{x}adaLN_modulation.1.{kind}"] = sd.pop(f"{block}norm1.linear.{kind}")
            context_norm = sd.pop(f"{block}norm1_context.linear.{kind}")
            out[f"{c}adaLN_modulation.1.{kind}"] = (
                _swap_halves(context_norm) if i == last else context_norm
            )
            out[f"{x}mlp.fc1.{kind}"] = sd.pop(f"{block}ff.net.0.proj.{kind}")
            out[f"{x}mlp.fc2.{kind}"] = sd.pop(f"{block}ff.net.2.{kind}")
            if i != last:  # the last block's context stream ends before its output and MLP
                out[f"{c}attn.proj.{kind}"] = sd.pop(f"{block}attn.to_add_out.{kind}")
                out[f"{c}mlp.fc1.{kind}"] = sd.pop(f"{block}ff_context.net.0.proj.{kind}")
                out[f"{c}mlp.fc2.{kind}"] = sd.pop(f"{block}ff_context.net.2.{kind}")
            if f"{block}attn2.to_q.{kind}" in sd:  # SD3.5's dual-attention blocks
                out[f"{x}attn2.qkv.{kind}"] = torch.cat(
                    [sd.pop(f"{block}attn2.to_{n}.{kind}") for n in "qkv"]
                )
                out[f"{x}attn2.proj.{kind}"] = sd.pop(f"{block}attn2.to_out.0.{kind}")
        norms = {
            "attn.norm_q": f"{x}attn.ln_q",
            "attn.norm_k": f"{x}attn.ln_k",
            "attn.norm_added_q": f"{c}attn.ln_q",
            "attn.norm_added_k": f"{c}attn.ln_k",
            "attn2.norm_q": f"{x}attn2.ln_q",
            "attn2.norm_k": f"{x}attn2.ln_k",
        }
        for ours, theirs_norm in norms.items():  # QK RMS-norm weights, where the model has them
            if f"{block}{ours}.weight" in sd:
                out[f"{theirs_norm}.weight"] = sd.pop(f"{block}{ours}.weight")
    if sd:
        raise AssertionError(f"no Stability name for {sorted(sd)}")
    return {PREFIX + k: v.contiguous() for k, v in out.items()}


def stability_file(
    transformer: SD3Transformer2DModel, path: Path, extra: dict[str, torch.Tensor] | None = None
) -> Path:
    """EXTRA: other tensors in the file, e.g. a VAE under first_stage_model.* as in Stability's
    all-in-one checkpoints."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({**stability_state_dict(transformer), **(extra or {})}, str(path))
    return path
