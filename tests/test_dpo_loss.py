"""Diffusion-DPO loss on per-sample velocity errors (dpo/loss.py)."""

import json
import math

import pytest
import torch

from dpo.loss import diffusion_dpo_loss, noise_equivalent


def test_a_model_equal_to_its_reference_has_loss_log_2_and_zero_margin():
    err = torch.tensor([0.3, 0.7])
    terms = diffusion_dpo_loss(err, err + 0.1, err, err + 0.1, beta=5000.0)
    assert terms.loss.item() == pytest.approx(math.log(2))
    assert terms.margin.abs().max().item() == 0.0
    assert terms.metrics()["implicit_acc"] == 0.5  # every pair a tie: neither won nor lost


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


# --- noise-equivalent units (dpo/loss.py) ---


def test_noise_equivalent_error_is_the_noise_prediction_mse_implied_by_a_velocity_prediction():
    from model import rectified_flow as rf

    generator = torch.Generator().manual_seed(0)
    x0, eps, v_hat = (torch.randn(3, 4, 8, 8, generator=generator) for _ in range(3))
    t = torch.tensor([0.1, 0.5, 0.9])
    z_t = rf.interpolate(x0, eps, t)
    eps_hat = z_t + (1 - t).view(-1, 1, 1, 1) * v_hat  # x0_hat = z_t - t v_hat, eps = x0 + v
    noise_mse = ((eps_hat - eps) ** 2).flatten(1).mean(1)
    velocity_mse = ((v_hat - rf.velocity_target(x0, eps)) ** 2).flatten(1).mean(1)
    assert torch.allclose(noise_equivalent(velocity_mse, t), noise_mse, rtol=1e-5)
    assert noise_equivalent(velocity_mse, t)[2] < velocity_mse[2] / 50  # t = 0.9: 100x smaller


def test_saturated_fraction_counts_pairs_whose_sigmoid_is_past_0_99():
    zero = torch.zeros(4)
    # margin = -beta/2 * (err_w - err_l) with ref = 0: beta 2 -> margin = err_l - err_w
    terms = diffusion_dpo_loss(zero, torch.tensor([1.0, 4.0, 5.0, 9.0]), zero, zero, beta=2.0)
    assert terms.metrics()["saturated_frac"] == 0.5  # margins 5 and 9 > log 99 = 4.595


# --- the guards against winners getting worse: DPO-Positive and an SFT term ---


def _grad_of_err_w(err_w: float, ref_w: float, **kwargs) -> tuple[float, float]:
    w = torch.tensor([err_w], requires_grad=True)
    terms = diffusion_dpo_loss(
        w, torch.tensor([0.9]), torch.tensor([ref_w]), torch.tensor([0.5]), beta=10.0, **kwargs
    )
    terms.loss.backward()
    return terms.loss.item(), w.grad.item()


def test_dpo_positive_penalises_only_winners_worse_than_the_reference():
    plain = _grad_of_err_w(0.4, 0.5)
    assert _grad_of_err_w(0.4, 0.5, dpop_lambda=50.0) == pytest.approx(
        plain
    )  # winner better: no change
    worse_plain = _grad_of_err_w(0.6, 0.5)
    worse_dpop = _grad_of_err_w(0.6, 0.5, dpop_lambda=50.0)
    assert worse_dpop[0] > worse_plain[0]  # the loss sees the drift
    assert worse_dpop[1] > 10 * worse_plain[1]  # and pushes err_w back down much harder


def test_sft_term_adds_a_constant_pull_on_winners_and_is_zero_at_the_reference():
    plain, plain_grad = _grad_of_err_w(0.5, 0.5)
    sft, sft_grad = _grad_of_err_w(0.5, 0.5, sft_weight=0.2)
    assert sft == pytest.approx(plain)  # err_w == ref_w: the term is 0
    assert sft_grad - plain_grad == pytest.approx(0.2 * 10.0 / 2)  # gamma * beta / 2, batch of 1


def test_metrics_report_winner_and_loser_drift_from_the_reference():
    terms = diffusion_dpo_loss(
        torch.tensor([0.6, 0.4]),
        torch.tensor([0.9, 0.9]),
        torch.tensor([0.5, 0.5]),
        torch.tensor([0.5, 0.7]),
        beta=1.0,
    )
    metrics = terms.metrics()
    assert metrics["winner_drift"] == pytest.approx(0.0, abs=1e-6)  # +0.1 and -0.1
    assert metrics["loser_drift"] == pytest.approx(0.3)


# --- dpo/guard.py: reading metrics.jsonl ---


def _rows(drifts, ref=0.5):
    return [
        {"step": 10 * (k + 1), "winner_drift": d, "ref_err_w": ref, "saturated_frac": 0.8}
        for k, d in enumerate(drifts)
    ]


def test_guard_warns_once_winners_are_worse_in_consecutive_windows():
    from dpo.guard import guard_summary, winner_drift_warning

    assert winner_drift_warning(_rows([0.001, -0.002, 0.004, -0.001])) is None  # noise around 0
    assert winner_drift_warning(_rows([0.02, -0.01, 0.03, -0.02])) is None  # never two in a row
    message = winner_drift_warning(_rows([-0.01, 0.02, 0.03, 0.04]))
    assert message is not None and "step 30" in message and "--dpop-lambda" in message
    summary = guard_summary(_rows([-0.01, 0.02, 0.03, 0.04]))
    assert summary["winner_drift"] == 0.04 and summary["worse_windows"] == 3
    assert summary["saturated_frac"] == 0.8 and summary["warning"] == message
    assert guard_summary([])["warning"] is None


# --- the trainer's use of them (dpo/trainer.py) ---


def _random_pairs(n: int, seed: int = 0):
    from dpo.encode import EncodedPairs
    from model.conditioning import TextEncoding

    g = torch.Generator().manual_seed(seed)
    text = TextEncoding(
        clip_l=torch.randn(n, 77, 32, generator=g),
        clip_l_pooled=torch.randn(n, 32, generator=g),
        clip_g=torch.randn(n, 77, 48, generator=g),
        clip_g_pooled=torch.randn(n, 48, generator=g),
        t5=torch.randn(n, 8, 96, generator=g),
        t5_mask=torch.ones(n, 8, dtype=torch.long),
    )
    latents = [torch.randn(n, 16, 8, 8, generator=g) for _ in range(2)]
    return EncodedPairs([f"p{i}" for i in range(n)], *latents, text)


def test_trainer_takes_errors_in_noise_units_and_averages_accumulated_micro_batches(
    tiny_model_dir, tmp_path
):
    from dpo.config import DPOConfig
    from dpo.lora import add_lora, lora_parameters
    from dpo.trainer import dpo_terms, draw, load_transformer, step_generator, train_lora

    transformer = load_transformer(tiny_model_dir, "cpu", torch.float32)
    add_lora(transformer, 4, 4.0, ["attn.to_q", "attn.to_v"], seed=0)
    pairs = _random_pairs(6)
    t, noise = torch.tensor([0.2, 0.9]), torch.randn(2, 16, 8, 8)
    chosen = pairs.select([0, 1])
    base = {"model": tiny_model_dir, "lora_rank": 4, "lora_alpha": 4.0}
    in_noise = dpo_terms(transformer, chosen, t, noise, DPOConfig(**base))
    in_velocity = dpo_terms(
        transformer, chosen, t, noise, DPOConfig(**base, error_units="velocity")
    )
    assert torch.allclose(in_noise.err_w, (1 - t) ** 2 * in_velocity.err_w)
    assert torch.allclose(in_noise.ref_l, (1 - t) ** 2 * in_velocity.ref_l)

    config = DPOConfig(
        **base, batch_size=2, grad_accum=2, max_steps=1, log_every=1, lr=1e-2, beta=100.0
    )
    expected = []
    for micro in range(2):  # step 0's two micro-batches, drawn before the update
        picked, t_m, noise_m = draw(pairs, 2, step_generator(config.seed, micro), config, 1.0)
        expected.append(dpo_terms(transformer, picked, t_m, noise_m, config).metrics()["err_w"])
    before = [p.detach().clone() for p in lora_parameters(transformer)]
    train_lora(transformer, pairs, config, tmp_path, shift=1.0)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1 and row["err_w"] == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert {"winner_drift", "saturated_frac", "loser_drift"} <= set(row)
    assert any(not torch.equal(a, b) for a, b in zip(before, lora_parameters(transformer)))
