"""Which layers of the MMDiT a LoRA adapts: the block linears by name (SD3 appendix C), the shorthand sets, and their expansion."""

from __future__ import annotations

# Every linear layer of an MMDiT block (SD3 appendix C puts its LoRA "on all linear layers"): both
# streams' attention projections, both feed-forwards and both AdaLN modulations; SD3.5's second
# attention (attn2) too. Suffixes of module names inside `transformer_blocks`.
LORA_BLOCK_LINEARS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "norm1.linear",
    "norm1_context.linear",
]

ALL_BLOCK_LINEARS = LORA_BLOCK_LINEARS  # every linear layer of the MMDiT blocks (SD3 appendix C)

# The attention projections of both streams only (no feed-forward, no AdaLN modulation).
ATTENTION_PROJECTIONS = [name for name in ALL_BLOCK_LINEARS if name.startswith(("attn.", "attn2."))]

# The layers outside the blocks: the input embedders (patch, timestep, pooled text, text) and the
# final layer (sd-scripts' emb_dims covers the same ones).
EMBEDDERS = ["pos_embed.proj", "time_text_embed.*", "context_embedder"]

FINAL_LAYER = ["norm_out.linear", "proj_out"]

# Shorthands accepted by --lora-targets (train and dpo).
TARGET_SETS = {
    "attention": ATTENTION_PROJECTIONS,
    "all-linears": ALL_BLOCK_LINEARS,
    "embedders": EMBEDDERS,
    "final-layer": FINAL_LAYER,
}


def expand_lora_targets(value: list[str]) -> list[str]:
    """--lora-targets with its shorthands (attention, all-linears, embedders, final-layer) expanded."""
    return [name for item in value for name in TARGET_SETS.get(item, [item])]
