"""The in-memory LoRA every reader and writer of model/lora_formats.py goes through."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch


class LoraFormatError(ValueError):
    """A LoRA file that cannot be read, or does not fit the model it is meant for."""


@dataclass
class LoraModule:
    """The update alpha / rank * up @ down of one linear layer."""

    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [out, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up.float() @ self.down.float())


@dataclass
class LoraWeights:
    """A transformer LoRA keyed by diffusers module names, plus what a reader could not place."""

    modules: dict[str, LoraModule]
    styles: set[str] = field(default_factory=set)
    ignored: list[str] = field(default_factory=list)

    def ranks(self) -> Counter:
        return Counter(m.rank for m in self.modules.values())
