"""`t2i dpo --init-lora`: continue training from an existing LoRA instead of a fresh one.

The file is read in any key style model/lora_formats.py knows (diffusers, kohya, ComfyUI,
OneTrainer, peft) and checked against --model's transformer before any work. The new adapter
takes the file's shape, its layers and rank (and its alpha when every layer shares one, else
alpha = rank), so --rank, --alpha and --target-modules do not apply; model.lora.init_lora_from
then sets it to the file's matrices, so step 0 of the run computes what the old LoRA computes.
"""

from __future__ import annotations

import os

from peft import LoraConfig

from model.lora import add_lora, init_lora_from, read_lora_for
from model.lora_formats import LoraFormatError, LoraWeights


def check_init_lora(path: str | os.PathLike, model_dir: str | os.PathLike) -> LoraWeights:
    """Read PATH and check that it fits MODEL_DIR's transformer; one-line errors otherwise."""
    weights = read_lora_for(path, model_dir)
    ranks = weights.ranks()
    if len(ranks) > 1:
        raise LoraFormatError(
            f"--init-lora {path} mixes ranks {dict(ranks)}; DPO trains one rank for every layer"
        )
    return weights


def add_init_lora(
    transformer, path: str | os.PathLike, model_dir: str | os.PathLike, seed: int = 0
) -> LoraConfig:
    """Attach a trainable fp32 LoRA shaped like the one at PATH and set to its weights."""
    weights = check_init_lora(path, model_dir)
    rank = next(iter(weights.ranks()))
    alphas = {module.alpha for module in weights.modules.values()}
    alpha = alphas.pop() if len(alphas) == 1 else float(rank)
    config = add_lora(transformer, rank, alpha, sorted(weights.modules), seed)
    init_lora_from(transformer, path)
    return config
