"""SD3 LoRAs on Stability's MMDiT module names (what kohya's sd-scripts and ComfyUI use).

Stability's names fuse q, k and v into one ``qkv`` linear. Fusing LoRAs that have separate down
matrices stacks the downs (rank 3r) and puts the ups on a block diagonal; the fused alpha is
3 * alpha so that alpha / rank (what kohya and ComfyUI apply, rank = rows of the down matrix)
is unchanged. Splitting inverts that exactly (our files record each part's rank in the metadata;
without it, equal thirds with zero off-diagonal blocks are split as such); a fused LoRA trained
with one shared down matrix (kohya's default) splits into q, k and v LoRAs that share it. The
last block's text-stream modulation and the final layer's modulation store (shift, scale) in
Stability's order and (scale, shift) in diffusers', so their up rows swap halves on the way.
"""

from __future__ import annotations

import re

import torch

from model.lora_types import LoraFormatError, LoraModule, LoraWeights

# diffusers module suffix inside transformer_blocks.N -> Stability's (module, part of a fused qkv).
BLOCK_TO_STABILITY: dict[str, tuple[str, int | None]] = {
    "attn.to_q": ("x_block.attn.qkv", 0),
    "attn.to_k": ("x_block.attn.qkv", 1),
    "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0),
    "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn2.to_q": ("x_block.attn2.qkv", 0),
    "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2),
    "attn.to_out.0": ("x_block.attn.proj", None),
    "attn.to_add_out": ("context_block.attn.proj", None),
    "attn2.to_out.0": ("x_block.attn2.proj", None),
    "ff.net.0.proj": ("x_block.mlp.fc1", None),
    "ff.net.2": ("x_block.mlp.fc2", None),
    "ff_context.net.0.proj": ("context_block.mlp.fc1", None),
    "ff_context.net.2": ("context_block.mlp.fc2", None),
    "norm1.linear": ("x_block.adaLN_modulation.1", None),
    "norm1_context.linear": ("context_block.adaLN_modulation.1", None),
}
# Layers outside the blocks (sd-scripts' optional emb_dims targets); the patch embedder is a Conv2d.
GLOBAL_TO_STABILITY: dict[str, str] = {
    "pos_embed.proj": "x_embedder.proj",
    "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
BLOCK_FROM_STABILITY = {
    stab: diff for diff, (stab, part) in BLOCK_TO_STABILITY.items() if part is None
}
QKV_PARTS: dict[str, list[str]] = {}  # fused Stability module -> its q, k, v diffusers suffixes
for _suffix, (_fused, _part) in sorted(BLOCK_TO_STABILITY.items(), key=lambda kv: kv[1][1] or 0):
    if _part is not None:
        QKV_PARTS.setdefault(_fused, []).append(_suffix)
GLOBAL_FROM_STABILITY = {stab: diff for diff, stab in GLOBAL_TO_STABILITY.items()}
SWAPPED_GLOBALS = {"norm_out.linear"}  # AdaLayerNormContinuous: (scale, shift) vs (shift, scale)


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    shift, scale = up.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def _is_pre_only_modulation(name: str, module: LoraModule) -> bool:
    """The last block's text-stream AdaLayerNormContinuous: 2 chunks (not 6) of the width."""
    return name.endswith(("norm1_context.linear", "context_block.adaLN_modulation.1")) and (
        module.up.shape[0] == 2 * module.down.shape[1]
    )


def from_stability(
    name: str, module: LoraModule, ranks: list[int] | None = None
) -> dict[str, LoraModule]:
    if name in GLOBAL_FROM_STABILITY:
        target = GLOBAL_FROM_STABILITY[name]
        up = _swap_halves(module.up) if target in SWAPPED_GLOBALS else module.up
        return {target: LoraModule(module.down, up, module.alpha)}
    _, index, suffix = name.split(".", 2)
    prefix = f"transformer_blocks.{index}."
    if suffix in QKV_PARTS:
        parts = _split_qkv(module, ranks)
        return {
            prefix + s: m for s, m in zip(QKV_PARTS[suffix], parts, strict=True) if m is not None
        }
    up = _swap_halves(module.up) if _is_pre_only_modulation(name, module) else module.up
    return {prefix + BLOCK_FROM_STABILITY[suffix]: LoraModule(module.down, up, module.alpha)}


def _split_qkv(fused: LoraModule, ranks: list[int] | None = None) -> list[LoraModule | None]:
    """q, k, v LoRAs of one fused qkv LoRA, exactly (see the module doc). RANKS: the parts' ranks
    as our writer records them (0: no LoRA on that projection)."""
    rank, out = fused.rank, fused.up.shape[0] // 3
    ups = fused.up.split(out, dim=0)
    valid = (
        isinstance(ranks, list)
        and len(ranks) == 3
        and all(isinstance(r, int) and r >= 0 for r in ranks)
    )
    if valid and sum(ranks) == rank:
        parts: list[LoraModule | None] = []
        start = 0
        for i, r in enumerate(ranks):
            block = LoraModule(
                fused.down[start : start + r],
                ups[i][:, start : start + r].clone(),
                fused.alpha * r / rank,
            )
            parts.append(block if r else None)
            start += r
        return parts
    if rank % 3 == 0:
        r = rank // 3
        off_diagonal = [
            ups[i][:, j * r : (j + 1) * r] for i in range(3) for j in range(3) if i != j
        ]
        if all(not block.any() for block in off_diagonal):
            downs = fused.down.split(r, dim=0)
            return [
                LoraModule(downs[i], ups[i][:, i * r : (i + 1) * r].clone(), fused.alpha / 3)
                for i in range(3)
            ]
    return [LoraModule(fused.down, up.clone(), fused.alpha) for up in ups]


def _fuse_qkv(parts: list[LoraModule | None]) -> LoraModule:
    """One qkv LoRA from q, k, v LoRAs (None: that projection has none): stacked downs, block-diagonal ups."""
    present = [p for p in parts if p is not None]
    out, total = present[0].up.shape[0], sum(p.rank for p in present)
    shared = len({p.scale for p in present}) == 1
    up = torch.zeros(3 * out, total, dtype=present[0].up.dtype if shared else torch.float32)
    column = 0
    for i, part in enumerate(parts):
        if part is not None:
            block = part.up if shared else part.up.float() * part.scale  # unequal scales: fold them
            up[i * out : (i + 1) * out, column : column + part.rank] = block
            column += part.rank
    alpha = present[0].scale * total if shared else float(total)
    return LoraModule(torch.cat([p.down for p in present], dim=0), up, alpha)


def to_stability(weights: LoraWeights) -> dict[str, LoraModule]:
    """LoraWeights on Stability's MMDiT module names, q/k/v fused."""
    result: dict[str, LoraModule] = {}
    fused: dict[str, list[LoraModule | None]] = {}
    for name, module in weights.modules.items():
        if name in GLOBAL_TO_STABILITY:
            up = _swap_halves(module.up) if name in SWAPPED_GLOBALS else module.up
            result[GLOBAL_TO_STABILITY[name]] = LoraModule(module.down, up, module.alpha)
            continue
        match = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name)
        if not match or match.group(2) not in BLOCK_TO_STABILITY:
            raise LoraFormatError(f"{name} has no counterpart among Stability's MMDiT modules")
        target, part = BLOCK_TO_STABILITY[match.group(2)]
        target = f"joint_blocks.{match.group(1)}.{target}"
        if part is not None:
            fused.setdefault(target, [None, None, None])[part] = module
            continue
        up = _swap_halves(module.up) if _is_pre_only_modulation(name, module) else module.up
        result[target] = LoraModule(module.down, up, module.alpha)
    for target, parts in fused.items():
        result[target] = _fuse_qkv(parts)
    return dict(sorted(result.items(), key=lambda kv: natural(kv[0])))


def qkv_ranks(weights: LoraWeights) -> dict[str, list[int]]:
    """Fused Stability module -> the ranks of its q, k, v parts (0: none), for exact splitting."""
    ranks: dict[str, list[int]] = {}
    for name, module in weights.modules.items():
        match = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name)
        target = BLOCK_TO_STABILITY.get(match.group(2)) if match else None
        if target is not None and target[1] is not None:
            key = f"joint_blocks.{match.group(1)}.{target[0]}"
            ranks.setdefault(key, [0, 0, 0])[target[1]] = module.rank
    return ranks


def natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
