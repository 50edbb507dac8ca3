"""The rectified-flow training objective on pre-encoded batches (SD3 sections 2-3).

`draw_noise_and_time` makes every random draw of a micro-batch a pure function of
(seed, micro-batch index), so resumed runs repeat them exactly and no RNG state needs saving.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from curate.runtime.seeds import seed_int
from model import rectified_flow as rf
from model.conditioning import TextEncoding, drop_encoders, joint_condition, sample_encoder_keep
from model.toolbox import draw_timesteps


@dataclass(frozen=True)
class FlowSettings:
    density: rf.Density = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0
    weighting: rf.Weighting = "none"
    encoder_drop: float = 0.464


@dataclass
class Draws:
    t: torch.Tensor  # [B] in (0, 1), shifted
    noise: torch.Tensor  # like the latents
    keep: torch.Tensor  # [B, 3] keep CLIP-L, CLIP-G, T5


def draw_noise_and_time(latents: torch.Tensor, settings: FlowSettings, seed: int, j: int) -> Draws:
    """Timesteps (the configured density, then the Eq. 23 shift), noise and encoder-drop masks
    for micro-batch j; drawn on the CPU so every device and resume sees the same numbers."""
    generator = torch.Generator().manual_seed(seed_int(seed, "draws", j))
    batch = latents.shape[0]
    t = draw_timesteps(settings, batch, settings.shift, generator)
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    keep = sample_encoder_keep(batch, settings.encoder_drop, generator=generator)
    device = latents.device
    return Draws(t.to(device), noise.to(device), keep.to(device))


def predict_velocity(
    transformer: torch.nn.Module, z_t: torch.Tensor, t: torch.Tensor, text: TextEncoding
) -> torch.Tensor:
    """The MMDiT's velocity for noisy latents z_t at times t (in [0, 1]) under the SD3 condition."""
    sequence, pooled = joint_condition(text)
    return transformer(
        hidden_states=z_t,
        encoder_hidden_states=sequence,
        pooled_projections=pooled,
        timestep=rf.model_timestep(t),
        return_dict=False,
    )[0]


def flow_loss(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    text: TextEncoding,
    t: torch.Tensor,
    noise: torch.Tensor,
    weighting: rf.Weighting = "none",
) -> torch.Tensor:
    """Per-sample weighted MSE between predicted and target velocity eps - x0 (Eq. 2-3), shape [B]."""
    z_t = rf.interpolate(latents, noise, t)
    prediction = predict_velocity(transformer, z_t, t, text).float()
    target = rf.velocity_target(latents, noise)
    mse = ((prediction - target) ** 2).flatten(1).mean(dim=1)
    return mse * rf.loss_weight(t, weighting)


def training_loss(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    text: TextEncoding,
    draws: Draws,
    settings: FlowSettings,
    empty: TextEncoding | None = None,
) -> torch.Tensor:
    """Mean loss of a micro-batch with its encoders dropped per sample (p = 0.464 each), to zeros
    or, given EMPTY, to the empty prompt's encoding (the unconditional input of sampling)."""
    text = drop_encoders(text, draws.keep, empty)
    return flow_loss(transformer, latents, text, draws.t, draws.noise, settings.weighting).mean()


@torch.no_grad()
def validation_loss(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    text: TextEncoding,
    ids: list[str],
    timesteps: list[float],
    seed: int = 0,
) -> torch.Tensor:
    """Loss at each fixed timestep of the grid, [len(timesteps)], with each sample's noise fixed by
    its id: the same numbers at every evaluation, so changes come from the weights alone."""
    noise = torch.stack(
        [
            torch.randn(
                latents.shape[1:], generator=torch.Generator().manual_seed(seed_int(seed, "val", i))
            )
            for i in ids
        ]
    ).to(latents.device)
    losses = []
    for value in timesteps:
        t = torch.full((latents.shape[0],), float(value), device=latents.device)
        losses.append(flow_loss(transformer, latents, text, t, noise).mean())
    return torch.stack(losses)
