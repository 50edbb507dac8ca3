"""`t2i dpo --init-lora`: continue training from an existing LoRA instead of a fresh one.

The file is read in any key style model/lora_formats.py knows (diffusers, kohya, ComfyUI,
OneTrainer, peft) and checked against --model's transformer before any work. The new adapter
takes the file's shape: its layers, each layer's rank and alpha (the most common ones as the
defaults, the others as peft's per-layer patterns), so --lora-rank, --lora-alpha and --lora-targets do not
apply; model.lora.init_lora_from then sets it to the file's matrices, so step 0 of the run
computes what the old LoRA computes. Layers outside the transformer blocks (sd-scripts' emb_dims:
the patch, timestep, pooled-text and text embedders, the final layer) train like the rest; the
DPO reference still switches them off with the adapter (dpo/reference.py replays only input
layers that carry no LoRA).
"""

from __future__ import annotations

import os
import sys
from collections import Counter

from peft import LoraConfig

from model.lora import BLOCKS, add_lora, init_lora_from, read_lora_for
from model.lora_formats import LoraWeights


def check_init_lora(path: str | os.PathLike, model_dir: str | os.PathLike) -> LoraWeights:
    """Read PATH and check that it fits MODEL_DIR's transformer; one-line errors otherwise."""
    return read_lora_for(path, model_dir)


def add_init_lora(
    transformer, path: str | os.PathLike, model_dir: str | os.PathLike, seed: int = 0
) -> LoraConfig:
    """Attach a trainable fp32 LoRA shaped like the one at PATH and set to its weights."""
    weights = check_init_lora(path, model_dir)
    rank = weights.ranks().most_common(1)[0][0]
    alpha = Counter(m.alpha for m in weights.modules.values()).most_common(1)[0][0]
    ranks = {n: m.rank for n, m in weights.modules.items() if m.rank != rank}
    alphas = {n: m.alpha for n, m in weights.modules.items() if m.alpha != alpha}
    outside = sorted(n for n in weights.modules if not n.startswith(BLOCKS))
    if outside:
        print(
            f"--init-lora {path}: also trains its {len(outside)} layers outside the transformer "
            f"blocks ({', '.join(outside)})",
            file=sys.stderr,
        )
    config = add_lora(transformer, rank, alpha, sorted(weights.modules), seed, ranks, alphas)
    init_lora_from(transformer, path)
    return config
