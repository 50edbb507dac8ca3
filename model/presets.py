"""Model sizes as configs: the MMDiT depth family of the SD3 paper and a tiny offline kit.

SD3 section 5.1 scales the MMDiT by its depth d alone: hidden size 64*d, d attention heads of
64 channels. SD3-medium is d=24 (2B parameters); the paper's largest is d=38 (8B).
Everything here is plain config dicts; `model.build` turns them into modules.
"""

from __future__ import annotations

from typing import Any

# SD3-medium's frozen encoders, for storage and memory arithmetic without their weights.
SD3_TEXT_DIMS = {"clip_l": 768, "clip_g": 1280, "t5": 4096, "clip_tokens": 77}


def mmdit_config(
    depth: int,
    *,
    head_dim: int = 64,
    joint_attention_dim: int = 4096,
    pooled_projection_dim: int = 2048,
    latent_channels: int = 16,
    patch_size: int = 2,
    sample_size: int = 128,
    pos_embed_max_size: int = 192,
    qk_norm: str | None = "rms_norm",
) -> dict[str, Any]:
    """`SD3Transformer2DModel` kwargs for MMDiT depth d (hidden 64*d, d heads)."""
    if depth < 1:
        raise ValueError(f"MMDiT depth must be >= 1, got {depth}")
    return {
        "sample_size": sample_size,
        "patch_size": patch_size,
        "in_channels": latent_channels,
        "out_channels": latent_channels,
        "num_layers": depth,
        "attention_head_dim": head_dim,
        "num_attention_heads": depth,
        "joint_attention_dim": joint_attention_dim,
        "caption_projection_dim": head_dim * depth,
        "pooled_projection_dim": pooled_projection_dim,
        "pos_embed_max_size": pos_embed_max_size,
        "qk_norm": qk_norm,
    }


# The transformer configs of the released models (their diffusers transformer/config.json), for
# parameter and memory arithmetic on the meta device.
_RELEASED_SPECS = {
    "SD3-medium": dict(depth=24, pos_embed_max_size=192, qk_norm=None, dual=()),
    "SD3.5-medium": dict(depth=24, pos_embed_max_size=384, qk_norm="rms_norm", dual=range(13)),
    "SD3.5-large": dict(depth=38, pos_embed_max_size=192, qk_norm="rms_norm", dual=()),
}


def released_config(name: str) -> dict[str, Any]:
    """`SD3Transformer2DModel` kwargs of a released model: SD3-medium, SD3.5-medium, SD3.5-large."""
    spec = _RELEASED_SPECS[name]
    config = mmdit_config(
        spec["depth"], pos_embed_max_size=spec["pos_embed_max_size"], qk_norm=spec["qk_norm"]
    )
    return config | {"dual_attention_layers": tuple(spec["dual"])}


RELEASED_MODELS = tuple(_RELEASED_SPECS)


# The tiny kit: every component small enough to build, save and sample from in a second, with
# deliberately unequal widths (CLIP-L 32, CLIP-G 48, T5 96) so a dimension mix-up fails loudly.
TINY_CLIP_L = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "projection_dim": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}
TINY_CLIP_G = {
    "hidden_size": 48,
    "intermediate_size": 96,
    "projection_dim": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
}
TINY_T5 = {
    "d_model": 96,
    "d_ff": 128,
    "d_kv": 24,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
}
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def tiny_mmdit_config(num_layers: int = 2, heads: int = 4, head_dim: int = 8) -> dict[str, Any]:
    """A transformer wired to the tiny encoders: joint dim = T5 width, pooled = CLIP-L + CLIP-G."""
    config = mmdit_config(
        num_layers,
        head_dim=head_dim,
        joint_attention_dim=TINY_T5["d_model"],
        pooled_projection_dim=TINY_CLIP_L["projection_dim"] + TINY_CLIP_G["projection_dim"],
        sample_size=16,
        pos_embed_max_size=64,
    )
    config["num_attention_heads"] = heads
    config["caption_projection_dim"] = heads * head_dim
    return config


# Named presets for `t2i init-model --preset`. The tiny ones pair with the tiny encoders; the dN
# presets are the paper's family and expect SD3's real encoder widths. "tiny-d2-64" keeps the
# family's rule (hidden 64 * depth, depth heads of 64), which sd-scripts and ComfyUI assume when
# they read a Stability checkpoint (depth = patch-embedder width / 64): the smallest kit their
# loaders accept, for interop tests. "tiny" and "tiny-d4" break that rule on purpose (narrow heads).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"transformer": tiny_mmdit_config(), "encoders": "tiny"},
    "tiny-d4": {
        "transformer": tiny_mmdit_config(num_layers=4, heads=4, head_dim=16),
        "encoders": "tiny",
    },
    "tiny-d2-64": {
        "transformer": tiny_mmdit_config(num_layers=2, heads=2, head_dim=64),
        "encoders": "tiny",
    },
    **{
        f"d{d}": {"transformer": mmdit_config(d), "encoders": "sd3"}
        for d in (2, 4, 8, 12, 15, 18, 24, 30, 38)
    },
}


def preset(name: str) -> dict[str, Any]:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
