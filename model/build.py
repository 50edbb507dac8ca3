"""Build SD3 components from configs, or load them from a local diffusers folder.

`init_model` writes a random-weight SD3 pipeline folder that
`StableDiffusion3Pipeline.from_pretrained(folder)` loads offline; `load_pipeline` is the same
loading code users run on real SD3/SD3.5 folders.

Every stage loads through this module: `load_pipeline` (sampling), `load_component` (one encoder,
tokenizer or the VAE), `load_transformer` (training, DPO). Each takes `variant` (fp16: the
`*.fp16.safetensors` files), accepts T5-less folders (`has_t5` False: text_encoder_3 null in
model_index.json; callers feed zeros in T5's place, as the pipeline does), and
`load_transformer`/`load_pipeline` take `transformer_file`, a Stability single-file MMDiT
checkpoint converted by diffusers' `from_single_file` with the folder's transformer config.
Every failure is a `ModelFolderError` whose one-line message names the path and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from model import presets
from model.tokenizers import build_clip_tokenizer, build_t5_tokenizer

# SD3 trains and samples 1024^2 with shift 3.0 (paper Eq. 23, alpha = sqrt(m/n)).
DEFAULT_SHIFT = 3.0


def build_transformer(
    config: dict[str, Any], device: str | torch.device = "cpu"
) -> SD3Transformer2DModel:
    """A randomly initialised MMDiT; pass device="meta" to check shapes without allocating."""
    with torch.device(device):
        return SD3Transformer2DModel(**config)


def transformer_config_for(depth_or_preset: str, text_dims: dict[str, int]) -> dict[str, Any]:
    """A preset's transformer config, with its conditioning widths read from the encoders."""
    config = dict(presets.preset(depth_or_preset)["transformer"])
    config["joint_attention_dim"] = text_dims["t5"]
    config["pooled_projection_dim"] = text_dims["clip_l_pooled"] + text_dims["clip_g_pooled"]
    return config


def text_dims(pipe_or_components: Any) -> dict[str, int]:
    """Encoder widths read from the loaded encoders' configs (never from our presets)."""
    get = (
        (lambda n: getattr(pipe_or_components, n))
        if not isinstance(pipe_or_components, dict)
        else pipe_or_components.__getitem__
    )
    clip_l, clip_g, t5 = (
        get("text_encoder").config,
        get("text_encoder_2").config,
        get("text_encoder_3").config,
    )
    return {
        "clip_l": clip_l.hidden_size,
        "clip_g": clip_g.hidden_size,
        "clip_l_pooled": clip_l.projection_dim,
        "clip_g_pooled": clip_g.projection_dim,
        "t5": t5.d_model,
    }


def build_tiny_components(seed: int = 0, transformer_preset: str = "tiny") -> dict[str, Any]:
    """Every component of an SD3 pipeline, tiny and random, from configs alone."""
    torch.manual_seed(seed)
    clip_tokenizer = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer()
    clip_common = {
        "vocab_size": len(clip_tokenizer),
        "bos_token_id": clip_tokenizer.bos_token_id,
        "eos_token_id": clip_tokenizer.eos_token_id,
        "pad_token_id": clip_tokenizer.pad_token_id,
    }
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**presets.TINY_CLIP_L, **clip_common))
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(**presets.TINY_CLIP_G, **clip_common)
    )
    text_encoder_3 = T5EncoderModel(
        T5Config(
            **presets.TINY_T5,
            vocab_size=len(t5_tokenizer),
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
            decoder_start_token_id=t5_tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(**presets.TINY_VAE)
    components = {
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "text_encoder_3": text_encoder_3,
        "tokenizer": clip_tokenizer,
        "tokenizer_2": build_clip_tokenizer(),
        "tokenizer_3": t5_tokenizer,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=DEFAULT_SHIFT),
    }
    config = transformer_config_for(transformer_preset, text_dims(components))
    config["in_channels"] = config["out_channels"] = vae.config.latent_channels
    components["transformer"] = build_transformer(config)
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return components


def init_model(output: str | os.PathLike, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight SD3 pipeline folder built purely from configs (no hub access)."""
    spec = presets.preset(preset)
    if spec["encoders"] != "tiny":
        raise ValueError(
            f"preset {preset!r} has SD3's full encoder widths (T5-XXL, CLIP-G); writing random "
            "encoders of that size is pointless. Use a real SD3 folder as --model, or a tiny preset."
        )
    pipe = StableDiffusion3Pipeline(**build_tiny_components(seed, preset))
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(output, safe_serialization=True)
    return output


# ----------------------------------------------------------------------------- loading


def run_init_model(output: str, config) -> Path:
    """`t2i init-model`: see flows/cli.py."""
    from curate.runtime.stage_runtime import write_folder

    return write_folder(
        output, "init-model", config, lambda path: init_model(path, config.preset, config.seed)
    )
