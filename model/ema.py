"""Exponential moving average of a model's weights, checkpointable with accelerate."""

from __future__ import annotations

from typing import Any

import torch


class EMA:
    """Shadow copies (fp32) of a module's floating-point parameters.

    decay_n = min(decay, (1 + n) / (10 + n)) after n updates, so short runs average over what
    they have seen instead of over the random initialisation.
    """

    def __init__(self, module: torch.nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.shadow = {
            name: p.detach().to(torch.float32).clone()
            for name, p in module.named_parameters()
            if p.requires_grad
        }
        self._cached_for: int | None = None
        self._cache: tuple[list[torch.Tensor], list[torch.Tensor], bool] = ([], [], True)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    def _pairs(
        self, module: torch.nn.Module
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], bool]:
        """(shadows, parameters, all fp32 on the shadows' device), cached per module: no
        per-step name lookups."""
        key = id(module)
        if self._cached_for != key:
            found = dict(module.named_parameters())
            names = [n for n in self.shadow if n in found]
            shadows, params = [self.shadow[n] for n in names], [found[n] for n in names]
            direct = all(
                p.dtype == torch.float32 and p.device == s.device for s, p in zip(shadows, params)
            )
            self._cache = (shadows, params, direct)
            self._cached_for = key
        return self._cache

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """shadow <- shadow + (1 - decay) (param - shadow), for all tensors in one foreach call."""
        shadows, params, direct = self._pairs(module)
        weight = 1.0 - self.current_decay()
        if direct:
            torch._foreach_lerp_(shadows, [p.detach() for p in params], weight)
        else:  # 16-bit or sharded weights: convert each on the shadow's device
            converted = [p.detach().to(s.device, torch.float32) for s, p in zip(shadows, params)]
            torch._foreach_lerp_(shadows, converted, weight)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for name, p in module.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(
                f"EMA checkpoint lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}"
            )
        self.decay = state["decay"]
        self.updates = int(state["updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
