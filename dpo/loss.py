"""Diffusion-DPO (Wallace et al. 2023, Eq. 14) on a rectified-flow model, in noise-prediction units.

Winner and loser share the timestep t and the noise eps. The network predicts the velocity
v = eps - x0 from z_t = (1 - t) x0 + t eps, so its implied noise prediction is
eps_hat = z_t + (1 - t) v_hat and

    eps_hat - eps = (1 - t) (v_hat - v),   noise MSE = (1 - t)^2 * velocity MSE.

Each per-sample error err = mean over latent elements of the squared error is therefore taken
in noise units (`noise_equivalent`), the units of Diffusion-DPO's beta (their 5000 for SD1.5 and
SDXL multiplies a per-element-mean noise MSE). With the model (theta) and the reference (ref):

    margin = -beta/2 * ((err_w - ref_w) - (err_l - ref_l))
    loss   = -log sigmoid(margin)

The implicit reward of an image is r = -beta/2 * (err - ref); the margin is r_w - r_l.

DPO is satisfied as well by making losers worse as by making winners likelier; on its own it can
end with err_w above ref_w. Two published remedies, both off at 0:
  - DPO-Positive (Pal et al. 2024, "Smaug", Eq. 3): inside the sigmoid, the margin loses
    beta/2 * lambda * max(0, err_w - ref_w), so winners drifting away from the reference cost
    margin;
  - an SFT term on winners (as in RPO, Pang et al. 2024): + gamma * beta/2 * mean(err_w - ref_w),
    the winners' plain diffusion loss scaled into the DPO term's units (ref_w carries no gradient;
    it only makes the term 0 at the start, so the logged loss stays comparable to log 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# sigmoid(margin) above 0.99: the pair's gradient has fallen to 1% of its value at margin 0.
SATURATED_MARGIN = math.log(99.0)


def preference_score(margin: torch.Tensor) -> float:
    """Share of margins above 0, a tie (margin exactly 0, e.g. a LoRA still at its zero init)
    counting one half: 0.5 = no preference either way, as in the sample win rate."""
    return ((margin > 0).float() + 0.5 * (margin == 0).float()).mean().item()


def noise_equivalent(velocity_mse: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample noise-prediction MSE from per-sample velocity MSE at times t: (1 - t)^2 * mse."""
    return (1.0 - t.to(velocity_mse)) ** 2 * velocity_mse


@dataclass
class DPOTerms:
    loss: torch.Tensor  # scalar, differentiable
    margin: torch.Tensor  # [B] r_w - r_l (DPO-Positive's penalty not included)
    err_w: torch.Tensor
    err_l: torch.Tensor
    ref_w: torch.Tensor
    ref_l: torch.Tensor
    anchor: torch.Tensor | None = None  # [2B] policy-reference distance (dpo/regularizers.py)
    preserve: torch.Tensor | None = None  # [B] the same on --preserve-captions

    def metrics(self) -> dict[str, float]:
        """Per-step training diagnostics (means over the batch)."""
        anchor = {} if self.anchor is None else {"anchor": self.anchor.mean().item()}
        if self.preserve is not None:
            anchor["preserve"] = self.preserve.mean().item()
        return {
            **anchor,
            "loss": self.loss.item(),
            "implicit_acc": preference_score(self.margin),
            "reward_margin": self.margin.mean().item(),
            "saturated_frac": (self.margin > SATURATED_MARGIN).float().mean().item(),
            "winner_drift": (self.err_w - self.ref_w).mean().item(),
            "loser_drift": (self.err_l - self.ref_l).mean().item(),
            "err_w": self.err_w.mean().item(),
            "err_l": self.err_l.mean().item(),
            "ref_err_w": self.ref_w.mean().item(),
            "ref_err_l": self.ref_l.mean().item(),
        }


def diffusion_dpo_loss(
    err_w: torch.Tensor,
    err_l: torch.Tensor,
    ref_w: torch.Tensor,
    ref_l: torch.Tensor,
    beta: float,
    dpop_lambda: float = 0.0,
    sft_weight: float = 0.0,
) -> DPOTerms:
    """Diffusion-DPO (Eq. 14) from per-sample errors of the model and the reference ([B] each),
    with the optional DPO-Positive penalty and SFT term (both in the module docstring)."""
    margin = -0.5 * beta * ((err_w - ref_w) - (err_l - ref_l))
    inside = margin - 0.5 * beta * dpop_lambda * F.relu(err_w - ref_w)
    loss = -F.logsigmoid(inside).mean()
    if sft_weight:
        loss = loss + sft_weight * 0.5 * beta * (err_w - ref_w).mean()
    return DPOTerms(
        loss, margin.detach(), err_w.detach(), err_l.detach(), ref_w.detach(), ref_l.detach()
    )
