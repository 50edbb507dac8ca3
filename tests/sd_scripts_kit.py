"""LoRA files laid out as kohya's sd-scripts (networks/lora_sd3.py) saves them, built by hand.

sd-scripts wraps every nn.Linear of Stability's MMDiT blocks (q, k and v as one fused `qkv` with a
single down matrix), names it `lora_unet_` + its module path with dots as underscores, and saves
`lora_down.weight` [r, in], `lora_up.weight` [out, r] and a scalar `alpha`, all cast to the save
dtype (alpha too). `emb_dims` adds LoRAs on the embedders and the final layer; the patch embedder
`x_embedder.proj` is a Conv2d there, so its LoRA is a conv pair (down [r, in, p, p], up [out, r, 1, 1]).
"""

from __future__ import annotations

import torch
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from safetensors.torch import load_file, save_file

from model.build import build_transformer

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
            modules |= {
                base + "attn.qkv": (3 * h, h),
                base + "attn.proj": (h, h),
                base + "mlp.fc1": (4 * h, h),
                base + "mlp.fc2": (h, 4 * h),
                base + "adaLN_modulation.1": (6 * h, h),
            }
    return modules


def sd_scripts_state_dict(
    config, rank: int, alpha: float, dtype=torch.float32, seed: int = 0, emb_rank: int = 0
) -> dict[str, torch.Tensor]:
    """A trained-looking (B != 0) sd-scripts SD3 LoRA for a transformer CONFIG; EMB_RANK > 0:
    emb_dims too, at that rank on every embedder and the final layer."""
    g = torch.Generator().manual_seed(seed)
    shapes = block_modules(config)
    h = config["num_attention_heads"] * config["attention_head_dim"]
    ranks = dict.fromkeys(shapes, rank)
    if emb_rank:
        dims = (
            h,
            config["joint_attention_dim"],
            config["pooled_projection_dim"],
            config["out_channels"] or config["in_channels"],
            config["patch_size"],
        )
        shapes |= {name: shape(*dims) for name, shape in EMBEDDERS.items()}
        ranks |= dict.fromkeys(EMBEDDERS, emb_rank)
    state = {}
    for name, (out, inp) in shapes.items():
        stem = "lora_unet_" + name.replace(".", "_")
        r = ranks[name]
        state[f"{stem}.lora_down.weight"] = torch.randn(r, inp, generator=g) / inp**0.5
        state[f"{stem}.lora_up.weight"] = torch.randn(out, r, generator=g) * 0.05
        state[f"{stem}.alpha"] = torch.tensor(alpha)
    if emb_rank:  # the patch embedder is a conv: kernel = stride = patch size
        p, c = config["patch_size"], config["in_channels"]
        stem = "lora_unet_x_embedder_proj"
        state[f"{stem}.lora_down.weight"] = torch.randn(emb_rank, c, p, p, generator=g) * 0.1
        state[f"{stem}.lora_up.weight"] = torch.randn(h, emb_rank, 1, 1, generator=g) * 0.05
        state[f"{stem}.alpha"] = torch.tensor(alpha)
    return {k: v.to(dtype) for k, v in state.items()}


def save_sd_scripts_lora(path, config, rank=4, alpha=2.0, dtype=torch.float32, **kwargs):
    state = sd_scripts_state_dict(config, rank, alpha, dtype, **kwargs)
    metadata = {
        "ss_network_module": "networks.lora_sd3",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sd3",
    }
    save_file(state, str(path), metadata=metadata)
    return path


def stability_checkpoint(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """A diffusers SD3 transformer state dict under Stability's MMDiT names (written out here, by
    hand, from the MMDiT reference layout; diffusers' converter below checks it)."""

    def swap(t):
        shift, scale = t.chunk(2, dim=0)
        return torch.cat([scale, shift])

    out = {
        "pos_embed": sd["pos_embed.pos_embed"],
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "context_embedder.weight": sd["context_embedder.weight"],
        "context_embedder.bias": sd["context_embedder.bias"],
        "final_layer.linear.weight": sd["proj_out.weight"],
        "final_layer.linear.bias": sd["proj_out.bias"],
        "final_layer.adaLN_modulation.1.weight": swap(sd["norm_out.linear.weight"]),
        "final_layer.adaLN_modulation.1.bias": swap(sd["norm_out.linear.bias"]),
    }
    for ours, theirs in (("timestep_embedder", "t_embedder"), ("text_embedder", "y_embedder")):
        for i, j in ((1, 0), (2, 2)):
            for end in ("weight", "bias"):
                out[f"{theirs}.mlp.{j}.{end}"] = sd[f"time_text_embed.{ours}.linear_{i}.{end}"]
    for i in range(num_layers):
        d, s = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        last = i == num_layers - 1
        pairs = {
            "x_block.attn.proj": "attn.to_out.0",
            "x_block.mlp.fc1": "ff.net.0.proj",
            "x_block.mlp.fc2": "ff.net.2",
            "x_block.adaLN_modulation.1": "norm1.linear",
        }
        if not last:
            pairs |= {
                "context_block.attn.proj": "attn.to_add_out",
                "context_block.mlp.fc1": "ff_context.net.0.proj",
                "context_block.mlp.fc2": "ff_context.net.2",
                "context_block.adaLN_modulation.1": "norm1_context.linear",
            }
        qkv = {
            "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
            "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        }
        if d + "attn2.to_q.weight" in sd:
            pairs["x_block.attn2.proj"] = "attn2.to_out.0"
            qkv["x_block.attn2.qkv"] = ("attn2.to_q", "attn2.to_k", "attn2.to_v")
        for end in ("weight", "bias"):
            for theirs, ours in pairs.items():
                out[f"{s}{theirs}.{end}"] = sd[f"{d}{ours}.{end}"]
            for theirs, parts in qkv.items():
                out[f"{s}{theirs}.{end}"] = torch.cat([sd[f"{d}{p}.{end}"] for p in parts])
            if last:
                out[f"{s}context_block.adaLN_modulation.1.{end}"] = swap(
                    sd[f"{d}norm1_context.linear.{end}"]
                )
        for theirs, ours in (
            ("x_block.attn", "attn.norm_"),
            ("context_block.attn", "attn.norm_added_"),
            ("x_block.attn2", "attn2.norm_"),
        ):
            for qk in ("q", "k"):
                if f"{d}{ours}{qk}.weight" in sd:
                    out[f"{s}{theirs}.ln_{qk}.weight"] = sd[f"{d}{ours}{qk}.weight"]
    return out


def merged_like_comfyui(transformer, file) -> torch.nn.Module:
    """TRANSFORMER's weights with a kohya/ComfyUI LoRA file added the way those tools apply it:
    W[module] += alpha / rows(down) * up @ down on Stability's names; back through diffusers."""
    checkpoint = stability_checkpoint(
        {k: v.clone() for k, v in transformer.state_dict().items()},
        transformer.config.num_layers,
    )
    lora = load_file(str(file))
    for key in [k for k in lora if k.endswith(".lora_down.weight")]:
        stem = key.removesuffix(".lora_down.weight")
        down, up = lora[key].float(), lora[stem + ".lora_up.weight"].float()
        alpha = lora[stem + ".alpha"].item()
        module = stem.removeprefix("diffusion_model.")
        if stem.startswith("lora_unet_"):  # kohya: find the weight whose flattened name matches
            flat = {k.removesuffix(".weight").replace(".", "_"): k for k in checkpoint}
            weight_key = flat[stem.removeprefix("lora_unet_")]
        else:
            weight_key = module + ".weight"
        weight = checkpoint[weight_key]
        delta = (
            alpha / down.shape[0] * up.flatten(1) @ down.flatten(1)
        )  # a conv: 1x1 up, k x k down
        checkpoint[weight_key] = weight + delta.reshape(weight.shape)
    merged = build_transformer(dict(transformer.config))
    merged.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(checkpoint))
    return merged.eval()
