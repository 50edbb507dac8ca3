"""The in-memory LoRA every reader and writer of model/lora_formats.py goes through, and whether
it fits a model."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


class LoraFormatError(ValueError):
    """A LoRA file that cannot be read, or does not fit the model it is meant for."""


@dataclass
class LoraModule:
    """The update alpha / rank * up @ down of one linear layer (or of a conv: down [rank, in, kh,
    kw] is a conv, up [out, rank, 1, 1] mixes its channels, as peft and sd-scripts store them)."""

    down: torch.Tensor  # [rank, in] (conv: [rank, in, kh, kw])
    up: torch.Tensor  # [out, rank] (conv: [out, rank, 1, 1])
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the weight this LoRA updates: (out, in), or (out, in, kh, kw) for a conv."""
        return (self.up.shape[0], *self.down.shape[1:])

    def delta(self) -> torch.Tensor:
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return self.scale * product.reshape(self.weight_shape)


@dataclass
class LoraWeights:
    """A transformer LoRA keyed by diffusers module names, plus what a reader could not place."""

    modules: dict[str, LoraModule]
    styles: set[str] = field(default_factory=set)
    ignored: list[str] = field(default_factory=list)

    def ranks(self) -> Counter:
        return Counter(m.rank for m in self.modules.values())


# ----------------------------------------------------------------------------- fitting a model


def check_fits(weights: LoraWeights, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Refuse a LoRA none of whose modules exist in the model, or whose shapes do not fit it.

    SHAPES: the weight shape of every nn.Linear and nn.Conv2d of the transformer, by module name.
    """
    matched = [n for n in weights.modules if n in shapes]
    if not matched:
        example = next(iter(weights.modules))
        raise LoraFormatError(
            f"LoRA {source} matches none of the model's modules (e.g. {example} is not in this "
            f"transformer, which has {sum(n.startswith('transformer_blocks.') for n in shapes)} block "
            "linears); it was made for another model"
        )
    missing = [n for n in weights.modules if n not in shapes]
    if missing:
        raise LoraFormatError(
            f"LoRA {source} has {len(missing)} of {len(weights.modules)} modules this model lacks "
            f"(e.g. {missing[0]}); it was made for another model (e.g. SD3.5 dual attention on SD3)"
        )
    for name, module in weights.modules.items():
        if module.weight_shape != tuple(shapes[name]):
            raise LoraFormatError(
                f"LoRA {source}: {name} updates a weight of shape {list(module.weight_shape)}, the "
                f"model's layer has {list(shapes[name])}; it was made for another model size"
            )


def linear_shapes(transformer: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Weight shape of every nn.Linear and nn.Conv2d in a transformer ((out, in) for a linear;
    peft-wrapped layers count by their base)."""
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    shapes = {}
    for name, module in transformer.named_modules():
        if isinstance(module, layers) and ".lora_" not in name and "base_layer" not in name:
            shapes[name] = tuple(module.weight.shape)
        base = getattr(module, "base_layer", None)
        if isinstance(base, layers):
            shapes[name] = tuple(base.weight.shape)
    return shapes
