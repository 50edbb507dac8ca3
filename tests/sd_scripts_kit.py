"""LoRA files laid out as kohya's sd-scripts (networks/lora_sd3.py) saves them, built by hand.

sd-scripts wraps every nn.Linear of Stability's MMDiT blocks (q, k and v as one fused `qkv` with a
single down matrix), names it `lora_unet_` + its module path with dots as underscores, and saves
`lora_down.weight` [r, in], `lora_up.weight` [out, r] and a scalar `alpha`, all cast to the save
dtype (alpha too). `emb_dims` adds LoRAs on the embedders and the final layer; the patch embedder
`x_embedder.proj` is a Conv2d there, so its LoRA is a conv pair (down [r, in, p, p], up [out, r, 1, 1]).
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file

# (Stability module, (out, in) as a function of hidden h, text width j, pooled p, latent c, patch s)
EMBEDDERS = {
    "context_embedder": lambda h, j, p, c, s: (h, j),
    "t_embedder.mlp.0": lambda h, j, p, c, s: (h, 256),
    "t_embedder.mlp.2": lambda h, j, p, c, s: (h, h),
    "y_embedder.mlp.0": lambda h, j, p, c, s: (h, p),
    "y_embedder.mlp.2": lambda h, j, p, c, s: (h, h),
    "final_layer.adaLN_modulation.1": lambda h, j, p, c, s: (2 * h, h),
    "final_layer.linear": lambda h, j, p, c, s: (s * s * c, h),
}


def block_modules(config) -> dict[str, tuple[int, int]]:
    """Stability module path -> (out, in) of every linear sd-scripts wraps inside the joint blocks."""
    h = config["num_attention_heads"] * config["attention_head_dim"]
    modules = {}
    for i in range(config["num_layers"]):
        last = i == config["num_layers"] - 1
        for stream in ("x_block", "context_block"):
            base = f"joint_blocks.{i}.{stream}."
            if stream == "context_block" and last:  # pre-only: qkv and a (shift, scale) modulation
                modules |= {base + "attn.qkv": (3 * h, h), base + "adaLN_modulation.1": (2 * h, h)}
                continue
            modules |= {base + "attn.qkv": (3 * h, h), base + "attn.proj": (h, h),
                        base + "mlp.fc1": (4 * h, h), base + "mlp.fc2": (h, 4 * h),
                        base + "adaLN_modulation.1": (6 * h, h)}  # fmt: skip
    return modules


def sd_scripts_state_dict(
    config, rank: int, alpha: float, dtype=torch.float32, seed: int = 0, emb: bool = False
) -> dict[str, torch.Tensor]:
    """A trained-looking (B != 0) sd-scripts SD3 LoRA for a transformer CONFIG; EMB: emb_dims too."""
    g = torch.Generator().manual_seed(seed)
    shapes = block_modules(config)
    h = config["num_attention_heads"] * config["attention_head_dim"]
    if emb:
        dims = (h, config["joint_attention_dim"], config["pooled_projection_dim"],
                config["out_channels"] or config["in_channels"], config["patch_size"])  # fmt: skip
        shapes |= {name: shape(*dims) for name, shape in EMBEDDERS.items()}
    state = {}
    for name, (out, inp) in shapes.items():
        stem = "lora_unet_" + name.replace(".", "_")
        state[f"{stem}.lora_down.weight"] = torch.randn(rank, inp, generator=g) / inp**0.5
        state[f"{stem}.lora_up.weight"] = torch.randn(out, rank, generator=g) * 0.05
        state[f"{stem}.alpha"] = torch.tensor(alpha)
    if emb:  # the patch embedder is a conv: kernel = stride = patch size
        p, c = config["patch_size"], config["in_channels"]
        stem = "lora_unet_x_embedder_proj"
        state[f"{stem}.lora_down.weight"] = torch.randn(rank, c, p, p, generator=g) * 0.1
        state[f"{stem}.lora_up.weight"] = torch.randn(h, rank, 1, 1, generator=g) * 0.05
        state[f"{stem}.alpha"] = torch.tensor(alpha)
    return {k: v.to(dtype) for k, v in state.items()}


def save_sd_scripts_lora(path, config, rank=4, alpha=2.0, dtype=torch.float32, **kwargs):
    state = sd_scripts_state_dict(config, rank, alpha, dtype, **kwargs)
    metadata = {"ss_network_module": "networks.lora_sd3", "ss_network_dim": str(rank),
                "ss_network_alpha": str(alpha), "ss_base_model_version": "sd3"}  # fmt: skip
    save_file(state, str(path), metadata=metadata)
    return path
