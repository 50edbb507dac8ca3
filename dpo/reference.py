"""The Diffusion-DPO reference: the policy's own network with the LoRA switched off.

No second copy of the base weights is kept (a frozen copy of SD3-medium's MMDiT would be another
4 GB in bf16). The reference pass also does less than a copy would: it sees exactly the inputs
the policy's pass has just seen (the same x_t, t and text for winner and loser), and the
transformer's input layers (the patch embedding, the timestep + pooled-text embedding and the
projection of the text features to the model width) carry no LoRA, so their outputs are the same
in both passes. The policy's pass records them and the reference's pass replays them instead of
recomputing them. With SD3's 4096-wide T5 features the text projection alone is about a sixth
of a forward pass at 64 px (benchmarks/RESULTS.md has the measured step times).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# SD3Transformer2DModel's input layers, applied to the inputs before the first block.
STEM = ("pos_embed", "time_text_embed", "context_embedder")


def stem_modules(transformer: nn.Module) -> dict[str, nn.Module]:
    """The input layers of TRANSFORMER that hold no LoRA parameters (normally all three)."""
    stem = {}
    for name in STEM:
        module = getattr(transformer, name, None)
        if module is not None and not any("lora_" in key for key, _ in module.named_parameters()):
            stem[name] = module
    return stem


@contextmanager
def recording(transformer: nn.Module, outputs: dict[str, torch.Tensor]) -> Iterator[None]:
    """While inside, the stem layers' outputs of a forward pass land in OUTPUTS (detached)."""

    def keep(name: str):
        def hook(module, args, output):
            outputs[name] = output.detach()

        return hook

    handles = [
        module.register_forward_hook(keep(n)) for n, module in stem_modules(transformer).items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def replaying(transformer: nn.Module, outputs: dict[str, torch.Tensor]) -> Iterator[None]:
    """While inside, each stem layer recorded in OUTPUTS returns its recorded output unrun."""
    replayed = []  # (module, its own instance-level forward, e.g. a wrapper, or None)
    for name, module in stem_modules(transformer).items():
        if name in outputs:
            replayed.append((module, module.__dict__.get("forward")))
            module.forward = lambda *args, _output=outputs[name], **kwargs: _output
    try:
        yield
    finally:
        for module, own in replayed:
            if own is None:
                del module.forward  # the class's forward again
            else:
                module.forward = own


@contextmanager
def adapter_off(transformer: nn.Module) -> Iterator[None]:
    """TRANSFORMER (a peft-adapted model, not a DDP wrapper) with its LoRA disabled while inside."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()
