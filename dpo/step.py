"""One Diffusion-DPO step's terms (dpo/loss.py) from the LoRA-adapted transformer: winner and loser
in one forward batch with a shared t and noise, the reference the same network with the adapter
off (dpo/reference.py), and the regularizers beside the DPO term (dpo/regularizers.py).
"""

from __future__ import annotations

from dataclasses import fields

import torch

from dpo.config import DPOConfig
from dpo.draws import Pairs, step_generator
from dpo.encode import EncodedPairs
from dpo.loss import DPOTerms, diffusion_dpo_loss, noise_equivalent, preference_score
from dpo.reference import adapter_off, recording, replaying
from dpo.regularizers import capturing, with_anchor, with_preservation
from model.conditioning import TextEncoding
from model.objective import flow_loss
from model.toolbox import draw_timesteps


def velocity_errors(transformer, latents, noise, t, text: TextEncoding) -> torch.Tensor:
    """[B] per-sample velocity MSE (model/objective.py), inputs cast to the frozen weights' dtype."""
    dtype = next(p for p in transformer.parameters() if not p.requires_grad).dtype
    return flow_loss(
        transformer, latents.to(dtype), text.to(dtype=dtype), t.to(dtype), noise.to(dtype)
    )


def dpo_terms(
    transformer,
    pairs: EncodedPairs,
    t,
    noise,
    config: DPOConfig,
    reference=None,
    preserve: TextEncoding | None = None,
) -> DPOTerms:
    """Winner and loser in one forward batch with shared t and noise; reference = adapter off,
    replaying the policy's input layers (dpo/reference.py), or a given copy. Errors enter the
    loss in the configured units (dpo/loss.py: noise-equivalent). PRESERVE: one caption per pair
    from --preserve-captions, whose prediction at the pair's noisy latents is anchored."""
    device = next(transformer.parameters()).device
    text = pairs.text.to(device)
    both = TextEncoding(
        **{f.name: torch.cat([getattr(text, f.name)] * 2) for f in fields(TextEncoding)}
    )
    latents = torch.cat([pairs.latents_w, pairs.latents_l]).to(device)
    times = torch.cat([t, t]).to(device)
    args = (latents, torch.cat([noise, noise]).to(device), times, both)
    base = getattr(transformer, "module", transformer)  # unwrap DistributedDataParallel
    stem: dict[str, torch.Tensor] = {}  # the input layers' outputs, the same for the reference
    with recording(base, stem), capturing(base) as policy_out:
        errors = velocity_errors(transformer, *args)
    with torch.no_grad():
        if reference is None:
            with adapter_off(base), replaying(base, stem), capturing(base) as ref_out:
                ref_errors = velocity_errors(base, *args)
        else:
            with capturing(reference) as ref_out:
                ref_errors = velocity_errors(reference, *args)
    if config.error_units == "noise":
        errors, ref_errors = noise_equivalent(errors, times), noise_equivalent(ref_errors, times)
    n = len(pairs)
    terms = diffusion_dpo_loss(
        errors[:n],
        errors[n:],
        ref_errors[:n],
        ref_errors[n:],
        config.beta,
        config.dpop_lambda,
        config.sft_weight,
    )
    terms = with_anchor(terms, policy_out[-1], ref_out[-1], times, config)  # dpo/regularizers.py
    if preserve is not None and config.preserve_weight:
        # other captions at the same noisy latents, winners and losers in turn
        mixed = torch.where((torch.arange(n) % 2 == 0).view(-1, 1, 1, 1), *latents.chunk(2))
        args = (mixed, noise.to(device), t.to(device), preserve.to(device))
        with capturing(base) as policy_out:
            velocity_errors(transformer, *args)
        with torch.no_grad(), adapter_off(base), capturing(base) as ref_out:
            velocity_errors(base, *args)
        terms = with_preservation(terms, policy_out[-1], ref_out[-1], args[2], config)
    return terms


@torch.no_grad()
def implicit_accuracy(
    transformer, pairs: Pairs, config: DPOConfig, shift: float, draws: int = 4
) -> float:
    """Fraction of (pair, t, noise) draws where the LoRA prefers the winner more than the reference
    does; a tie (margin exactly 0) counts one half, so a LoRA that changes nothing scores 0.5."""
    correct, total = 0.0, 0
    for d in range(draws):
        generator = step_generator(config.seed + 7919, d)
        for start in range(0, len(pairs), config.batch_size):
            chunk = pairs.select(list(range(start, min(start + config.batch_size, len(pairs)))))
            t = draw_timesteps(config, len(chunk), shift, generator)
            noise = torch.randn(chunk.latents_w.shape, generator=generator)
            margin = dpo_terms(transformer, chunk, t, noise, config).margin
            correct += preference_score(margin) * len(chunk)
            total += len(chunk)
    return correct / total
