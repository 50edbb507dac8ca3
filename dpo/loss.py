"""Diffusion-DPO (Wallace et al. 2023, Eq. 14) on the rectified-flow velocity target.

Winner and loser share the timestep t and the noise eps. For each, err = mean over latent
elements of (v_pred - (eps - x0))^2 (model/objective.py:flow_loss), once with the LoRA (theta) and once without (ref). Then

    loss = -log sigmoid(-beta/2 * ((err_w - ref_w) - (err_l - ref_l)))

beta is in units of 1 / (per-element mean squared velocity error). The implicit reward of an
image is r = -beta/2 * (err - ref); the margin r_w - r_l is the argument of the sigmoid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DPOTerms:
    loss: torch.Tensor  # scalar, differentiable
    margin: torch.Tensor  # [B] r_w - r_l
    err_w: torch.Tensor
    err_l: torch.Tensor
    ref_w: torch.Tensor
    ref_l: torch.Tensor

    def metrics(self) -> dict[str, float]:
        return {
            "loss": self.loss.item(),
            "implicit_acc": (self.margin > 0).float().mean().item(),
            "reward_margin": self.margin.mean().item(),
            "err_w": self.err_w.mean().item(),
            "err_l": self.err_l.mean().item(),
            "ref_err_w": self.ref_w.mean().item(),
            "ref_err_l": self.ref_l.mean().item(),
        }


def diffusion_dpo_loss(
    err_w: torch.Tensor, err_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float
) -> DPOTerms:
    """Diffusion-DPO (Eq. 14) from per-sample errors of the model and the reference ([B] each)."""
    margin = -0.5 * beta * ((err_w - ref_w) - (err_l - ref_l))
    loss = -F.logsigmoid(margin).mean()
    return DPOTerms(
        loss, margin.detach(), err_w.detach(), err_l.detach(), ref_w.detach(), ref_l.detach()
    )
