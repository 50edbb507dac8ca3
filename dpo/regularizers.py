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

The preservation term is the same distance on other captions: each step, every pair's noisy
latents are also fed with one caption drawn from --preserve-captions (prompts outside the
preference set, e.g. a sample of the base's own training captions), and the LoRA is priced for
changing what the base predicts for them:

    loss += preserve_weight * beta/2 * mean over pairs of mean_elements (1 - t)^2 (v_theta - v_ref)^2

This is DreamBooth's prior preservation (Ruiz et al. 2023) with the base's own prediction as the
target instead of its samples: the preference may move what the preference captions produce,
not what other captions produce. The evaluation's off-target captions must not be among them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from model.conditioning import TextEncoding


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


def with_anchor(terms, policy: torch.Tensor, reference: torch.Tensor, t: torch.Tensor, config):
    """TERMS (dpo/loss.py) with the anchor distance recorded and, at --anchor-weight > 0, its
    penalty added to the loss."""
    distance = anchor_distance(policy, reference, t)
    terms.anchor = distance.detach()
    if config.anchor_weight:
        terms.loss = terms.loss + anchor_penalty(distance, config.anchor_weight, config.beta)
    return terms


def with_preservation(terms, policy: torch.Tensor, reference: torch.Tensor, t, config):
    """TERMS with the preservation distance recorded and its penalty added to the loss."""
    distance = anchor_distance(policy, reference, t)
    terms.preserve = distance.detach()
    terms.loss = terms.loss + anchor_penalty(distance, config.preserve_weight, config.beta)
    return terms


def preserve_texts(config, device) -> TextEncoding | None:
    """--preserve-captions encoded once with the model's text encoders; None without captions or
    at --preserve-weight 0 (nothing is preserved then: the report says so)."""
    if not (config.preserve_captions and config.preserve_weight):
        return None
    from model.encoders import encode_texts

    return encode_texts(
        config.model, config.preserve_captions, config.t5_length, device, progress=False
    )


def draw_preserve(pool: TextEncoding | None, n: int, generator) -> TextEncoding | None:
    """N captions of POOL for this step, drawn after the pairs from the step's generator."""
    if pool is None:
        return None
    index = torch.randint(len(pool.t5), (n,), generator=generator)
    return TextEncoding(**{k: v[index] for k, v in vars(pool).items()})
