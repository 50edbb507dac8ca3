"""The transformer a `t2i train` run starts from, the shift it trains with, and what it exports."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel

from model import rectified_flow as rf
from model.build import build_transformer, transformer_config_for
from model.checkpoint import ModuleSubset
from model.config import TrainConfig
from model.ema import EMA
from model.export import export_pipeline
from model.folders import folder_text_dims, load_transformer
from model.lora_train import export_trained_lora
from model.toolbox import scheduler_shift


def build_or_load_transformer(config: TrainConfig) -> SD3Transformer2DModel:
    """A fresh MMDiT from --preset (widths read from --model's encoders and VAE), or the
    transformer to continue: --init-from, else --transformer-file, else --model/transformer."""
    model_dir = Path(config.model)
    if config.preset:
        spec = transformer_config_for(config.preset, folder_text_dims(model_dir))
        vae = AutoencoderKL.load_config(model_dir / "vae")
        spec["in_channels"] = spec["out_channels"] = vae["latent_channels"]
        torch.manual_seed(config.seed)
        return build_transformer(spec)
    if config.init_from and config.transformer_file:
        raise ValueError("pass --init-from or --transformer-file, not both")
    if not config.init_from:
        return load_transformer(model_dir, config.variant, torch.float32, config.transformer_file)
    source = Path(config.init_from)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"no transformer at {source}; pass --preset to start a fresh one")
    return SD3Transformer2DModel.from_pretrained(source, torch_dtype=torch.float32)


def check_compatible(transformer: SD3Transformer2DModel, sample: dict) -> None:
    """Fail before training when the encoded set was made with other encoders or another VAE."""
    cfg = transformer.config
    latents, text = sample["latents"], sample["text"]
    problems = []
    if latents.shape[0] != cfg.in_channels:
        problems.append(
            f"latents have {latents.shape[0]} channels, the transformer takes {cfg.in_channels}"
        )
    if text.t5.shape[-1] != cfg.joint_attention_dim:
        problems.append(
            f"T5 width {text.t5.shape[-1]} != joint_attention_dim {cfg.joint_attention_dim}"
        )
    pooled = text.clip_l_pooled.shape[-1] + text.clip_g_pooled.shape[-1]
    if pooled != cfg.pooled_projection_dim:
        problems.append(
            f"pooled CLIP width {pooled} != pooled_projection_dim {cfg.pooled_projection_dim}"
        )
    patches = max(latents.shape[1:]) // cfg.patch_size
    if cfg.pos_embed_max_size and patches > cfg.pos_embed_max_size:
        problems.append(
            f"latents of {tuple(latents.shape[1:])} need {patches} positions > pos_embed_max_size"
        )
    if problems:
        raise ValueError(
            f"the encoded set does not fit the model: {'; '.join(problems)}. "
            "Pre-encode with the same --model, or pick a matching --preset."
        )


def training_shift(config: TrainConfig, model_dir: Path, latents: torch.Tensor) -> float:
    """--shift; else, continuing a transformer, the base scheduler's own shift (what it was trained
    and is sampled with, 1.0 when its config names none); else, for a fresh --preset model,
    alpha = sqrt(pixels / 256^2) for the set's resolution (Eq. 23), never below 1 (the paper's
    base schedule is 256^2)."""
    if config.shift is not None:
        return config.shift
    if not config.preset:
        return scheduler_shift(model_dir)
    vae = AutoencoderKL.load_config(Path(model_dir) / "vae")
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return max(1.0, rf.resolution_shift(latents.shape[1] * factor * latents.shape[2] * factor))


def exported_shift(config: TrainConfig, shift: float) -> float | None:
    """The shift to write into the exported scheduler: None (leave it as it was) when continuing
    a transformer without --shift."""
    return shift if config.shift is not None or config.preset else None


def trained_weights(transformer: torch.nn.Module, lora) -> torch.nn.Module:
    """What a checkpoint holds of the model: a LoRA run keeps the adapter's tensors only (the
    frozen base is --model's), a full run every weight."""
    return (
        ModuleSubset(transformer, lambda key: "lora_" in key) if lora is not None else transformer
    )


def ema_copy(transformer: torch.nn.Module, ema: EMA) -> torch.nn.Module:
    shadow = copy.deepcopy(transformer)
    ema.copy_to(shadow)
    return shadow.eval()


def export_trained(
    model: torch.nn.Module, ema: EMA, lora, output: Path, config: TrainConfig, shift: float
) -> None:
    """OUTPUT as a diffusers SD3 folder (EMA weights unless --no-export-ema, the training shift in
    its scheduler), or under --lora-rank the LoRA file alone (the EMA's matrices, no base copy)."""
    if lora is not None:
        export_trained_lora(model, output, config, ema if config.export_ema else None)
        return
    final = ema_copy(model, ema) if config.export_ema else model
    export_pipeline(
        Path(config.model), final, output, exported_shift(config, shift), config.variant
    )
