"""Regularizers beside the Diffusion-DPO term that keep the LoRA near its reference.

DPO-Positive and the SFT term (dpo/loss.py) act on the pair's errors. The anchor here acts on the
predictions themselves: for both halves of every pair (winner and loser, the same x_t, t and
text), the squared distance between the policy's and the reference's velocity, per element, in
the noise units of the DPO term ((1 - t)^2 x velocity; dpo/loss.py):

    anchor = mean over the 2B samples of mean_elements (1 - t)^2 (v_theta - v_ref)^2
    loss  += anchor_weight * beta/2 * anchor

The DPO term only sees differences of errors, so it can grow the model's change on both images
without bound (SimpleTuner's Flow-DPO adds an adapter-off anchor on both halves for this reason);
the anchor prices every change of the prediction, at the DPO term's scale (beta/2 per unit of
noise MSE), so anchor_weight is free of beta's units. Being quadratic in the change it costs
nothing at the start and grows as the LoRA moves.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def capturing(transformer: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While inside, each forward output (the velocity prediction) of TRANSFORMER is appended."""
    outputs: list[torch.Tensor] = []

    def keep(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output.sample)

    handle = transformer.register_forward_hook(keep)
    try:
        yield outputs
    finally:
        handle.remove()


def anchor_distance(policy: torch.Tensor, reference: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """[2B] per-sample mean of (1 - t)^2 (v_theta - v_ref)^2: the change of the implied noise
    prediction (dpo/loss.py), the reference detached."""
    diff = (policy.float() - reference.detach().float()) ** 2
    return (1.0 - t.float()) ** 2 * diff.flatten(1).mean(dim=1)


def anchor_penalty(distance: torch.Tensor, weight: float, beta: float) -> torch.Tensor:
    """The term added to the loss: weight * beta/2 * the mean anchor distance."""
    return weight * 0.5 * beta * distance.mean()
