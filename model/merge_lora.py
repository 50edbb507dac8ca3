"""`t2i merge-lora BASE LORA OUT`: a diffusers SD3 folder whose transformer is BASE's plus the LoRA.

Each adapted weight becomes W + alpha / rank * up @ down (`LoraModule.delta`, in fp32), the
update `load_lora_weights` + `fuse_lora` would apply, without loading the text encoders. The other
components and the scheduler are BASE's, copied as they are. end_to_end runs it between a LoRA
fine-tune and DPO, so DPO's reference (its network with the adapter off) is the fine-tuned model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from model.lora_types import LoraWeights

STAGE = "merge-lora"


def merge_into(transformer: torch.nn.Module, weights: LoraWeights) -> int:
    """Add each LoRA module's update to TRANSFORMER's weight in place; returns how many."""
    modules = dict(transformer.named_modules())
    with torch.no_grad():
        for name, module in weights.modules.items():
            weight = modules[name].weight
            weight.copy_((weight.float() + module.delta().to(weight.device)).to(weight.dtype))
    return len(weights.modules)


def run_merge_lora(base: str, lora: str, output: str, config) -> Path:
    """`t2i merge-lora BASE LORA OUTPUT`: see model/interop_config.py MergeLoraConfig."""
    from curate.runtime.stage_runtime import StageRun
    from model.export import export_pipeline
    from model.folders import load_transformer, parse_dtype
    from model.lora import read_lora_for

    reads = {"base": base, "lora": lora}
    with StageRun(output, STAGE, config, reads, accounting=False) as run:
        if run.finished:
            return run.skip()
        weights = read_lora_for(lora, base)  # a LoRA for another model fails here, in one line
        transformer = load_transformer(base, config.variant)
        merged = merge_into(transformer, weights)
        dtype = parse_dtype(config.save_dtype)
        for tensor in (*transformer.parameters(), *transformer.buffers()):
            if tensor.is_floating_point():  # (module.to() warns about fp32-kept modules)
                tensor.data = tensor.data.to(dtype)
        with run.writer(tables=False) as writer:
            export_pipeline(Path(base), transformer, writer.path, None, config.variant)
            writer.counts["layers_merged"] = merged
        print(f"{STAGE}: {merged} LoRA layers merged into {base}'s transformer", file=sys.stderr)
    return run.output
