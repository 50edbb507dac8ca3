"""Diffusion-DPO loss on per-sample velocity errors (dpo/loss.py)."""

import math

import pytest
import torch

from dpo.loss import diffusion_dpo_loss


def test_a_model_equal_to_its_reference_has_loss_log_2_and_zero_margin():
    err = torch.tensor([0.3, 0.7])
    terms = diffusion_dpo_loss(err, err + 0.1, err, err + 0.1, beta=5000.0)
    assert terms.loss.item() == pytest.approx(math.log(2))
    assert terms.margin.abs().max().item() == 0.0
    assert terms.metrics()["implicit_acc"] == 0.0


def test_loss_matches_the_formula_with_beta_over_two():
    err_w, err_l = torch.tensor([0.50]), torch.tensor([0.60])
    ref_w, ref_l = torch.tensor([0.52]), torch.tensor([0.58])
    beta = 100.0
    inside = -beta / 2 * ((0.50 - 0.52) - (0.60 - 0.58))
    terms = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, beta)
    assert terms.loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-inside))), rel=1e-5)
    assert terms.metrics()["reward_margin"] == pytest.approx(inside, rel=1e-5)
    assert terms.metrics()["implicit_acc"] == 1.0


def test_gradient_lowers_the_winner_error_and_raises_the_loser_error():
    err_w = torch.tensor([0.5], requires_grad=True)
    err_l = torch.tensor([0.5], requires_grad=True)
    diffusion_dpo_loss(
        err_w, err_l, torch.tensor([0.5]), torch.tensor([0.5]), beta=10.0
    ).loss.backward()
    assert err_w.grad.item() > 0  # descending the loss lowers err_w
    assert err_l.grad.item() < 0  # and raises err_l


def test_metrics_report_model_and_reference_errors_for_winners_and_losers():
    terms = diffusion_dpo_loss(
        torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0]), torch.tensor([4.0]), 1.0
    )
    metrics = terms.metrics()
    assert (metrics["err_w"], metrics["err_l"], metrics["ref_err_w"], metrics["ref_err_l"]) == (
        1.0,
        2.0,
        3.0,
        4.0,
    )
    assert set(metrics) >= {"loss", "implicit_acc", "reward_margin"}
