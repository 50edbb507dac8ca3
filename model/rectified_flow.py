"""Rectified flow as SD3 trains it (arXiv 2403.03206, sections 2-3 and 5.3.2).

Time runs from data (t = 0) to noise (t = 1). The network predicts the velocity eps - x0; diffusers'
SD3 transformer takes the timestep as 1000 * t, which `model_timestep` converts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

Density = Literal["logit_normal", "mode", "cosmap", "uniform"]
Weighting = Literal["none", "sigma_sqrt", "cosmap"]
DENSITIES: tuple[str, ...] = ("logit_normal", "mode", "cosmap", "uniform")


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t = (1 - t) x0 + t eps  (Eq. 2 with a_t = 1 - t, b_t = t)."""
    t = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow regression target eps - x0."""
    return noise - x0


def shift_timesteps(t: torch.Tensor, alpha: float) -> torch.Tensor:
    """Resolution shift t' = alpha t / (1 + (alpha - 1) t)  (Eq. 23), alpha = sqrt(m / n)."""
    return alpha * t / (1 + (alpha - 1) * t)


def resolution_shift(target_pixels: int, base_pixels: int = 256 * 256) -> float:
    """alpha = sqrt(m / n) for m target pixels against the n the schedule was made for."""
    return math.sqrt(target_pixels / base_pixels)


def f_mode(u: torch.Tensor, s: float) -> torch.Tensor:
    """f_mode(u; s) = 1 - u - s (cos^2(pi u / 2) - 1 + u)  (Eq. 20); monotone for -1 <= s <= 2/(pi-2)."""
    return 1 - u - s * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)


def f_cosmap(u: torch.Tensor) -> torch.Tensor:
    """t = 1 - 1 / (tan(pi u / 2) + 1)  (Eq. 21)."""
    return 1 - 1 / (torch.tan(math.pi / 2 * u) + 1)


def sample_timesteps(
    n: int,
    density: Density = "logit_normal",
    *,
    m: float = 0.0,
    s: float = 1.0,
    mode_scale: float = 1.29,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Training timesteps t in (0, 1) from one of the paper's densities, then shifted (Eq. 23).

    logit_normal(m, s): t = sigmoid(u), u ~ N(m, s)    (Eq. 19; the paper's default m=0, s=1)
    mode(s):            t = f_mode(u; s), u ~ U(0, 1)  (Eq. 20; mode_scale is the paper's s)
    cosmap:             t = f_cosmap(u), u ~ U(0, 1)   (Eq. 21)
    uniform:            t ~ U(0, 1)
    """
    if density == "logit_normal":
        u = torch.randn(n, generator=generator, device=device) * s + m
        t = torch.sigmoid(u)
    else:
        u = torch.rand(n, generator=generator, device=device)
        if density == "mode":
            if not -1 <= mode_scale <= 2 / (math.pi - 2):
                raise ValueError(f"mode(s) needs -1 <= s <= 2/(pi-2) ~ 1.75, got {mode_scale}")
            t = f_mode(u, mode_scale)
        elif density == "cosmap":
            t = f_cosmap(u)
        elif density == "uniform":
            t = u
        else:
            raise ValueError(
                f"unknown timestep density {density!r}; choose one of {', '.join(DENSITIES)}"
            )
    return shift_timesteps(t, shift) if shift != 1.0 else t


def logit_normal_pdf(t: torch.Tensor, m: float = 0.0, s: float = 1.0) -> torch.Tensor:
    """pi_ln(t; m, s) = 1 / (s sqrt(2 pi)) * 1 / (t (1 - t)) * exp(-(logit(t) - m)^2 / (2 s^2))  (Eq. 19)."""
    logit = torch.log(t / (1 - t))
    return torch.exp(-((logit - m) ** 2) / (2 * s**2)) / (s * math.sqrt(2 * math.pi) * t * (1 - t))


def cosmap_pdf(t: torch.Tensor) -> torch.Tensor:
    """pi_CosMap(t) = 2 / (pi - 2 pi t + 2 pi t^2)  (Eq. 22)."""
    return 2 / (math.pi - 2 * math.pi * t + 2 * math.pi * t**2)


def loss_weight(t: torch.Tensor, weighting: Weighting = "none") -> torch.Tensor:
    """Extra per-sample weight on the velocity MSE; "none" is SD3's choice (the density does the weighting)."""
    if weighting == "none":
        return torch.ones_like(t)
    if weighting == "sigma_sqrt":
        return t.clamp_min(1e-4) ** -2.0
    if weighting == "cosmap":
        return cosmap_pdf(t)
    raise ValueError(f"unknown loss weighting {weighting!r}; choose none, sigma_sqrt or cosmap")


def model_timestep(t: torch.Tensor) -> torch.Tensor:
    """diffusers' SD3 transformer (and its scheduler) count time in 1000ths."""
    return t * 1000.0


def sampling_schedule(steps: int, shift: float = 3.0, train_timesteps: int = 1000) -> torch.Tensor:
    """steps + 1 times from 1 (noise) to 0 (data), shifted as in training (Eq. 23).

    The grid of SD3's reference sampler and of diffusers' FlowMatchEulerDiscreteScheduler: steps
    points evenly spaced from t = 1 down to the smallest training time (the shifted 1 /
    train_timesteps), each shifted, then a final 0."""
    smallest = shift_timesteps(torch.tensor(1.0 / train_timesteps, dtype=torch.float64), shift)
    grid = torch.linspace(1.0, float(smallest), steps, dtype=torch.float64)
    return torch.cat([shift_timesteps(grid, shift), torch.zeros(1, dtype=torch.float64)]).float()


@torch.no_grad()
def euler_sample(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    steps: int = 28,
    shift: float = 3.0,
) -> torch.Tensor:
    """Integrate dz/dt = v(z, t) from noise (t = 1) to data (t = 0) with Euler steps."""
    times = sampling_schedule(steps, shift).to(noise.device)
    z = noise
    for t, t_next in zip(times[:-1], times[1:]):
        z = z + (t_next - t) * velocity(z, t.expand(z.shape[0]))
    return z
