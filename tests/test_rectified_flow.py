"""The rectified-flow math against the SD3 paper: densities (Eq. 19-22), shift (Eq. 23), objective."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from scipy import integrate, optimize, stats

from model import rectified_flow as rf
from model.objective import FlowSettings, draw_noise_and_time

N = 20_000


def draw(density: str, **kwargs) -> torch.Tensor:
    return rf.sample_timesteps(
        N, density, generator=torch.Generator().manual_seed(0), **kwargs
    ).double()


def logit_normal_cdf(t, m=0.0, s=1.0):
    return stats.norm.cdf((torch.logit(torch.as_tensor(t, dtype=torch.float64)).numpy() - m) / s)


def cosmap_cdf(t):
    # Inverse of Eq. 21: u = (2 / pi) atan(t / (1 - t)).
    return 2 / math.pi * torch.atan(torch.as_tensor(t) / (1 - torch.as_tensor(t))).numpy()


def paper_f_mode(u, s):
    """SD3 Eq. 20 written out again here (numpy), not taken from the module under test:
    f_mode(u; s) = 1 - u - s (cos^2(pi u / 2) - 1 + u)."""
    u = np.asarray(u, dtype=np.float64)
    return 1.0 - u - s * (np.cos(np.pi * u / 2.0) ** 2 - 1.0 + u)


def mode_cdf(t, s):
    # t = f_mode(u) with u ~ U(0, 1) and f_mode decreasing from 1 to 0, so P(T <= t) = 1 - u*(t)
    # where f_mode(u*) = t; u* by root finding on the independent formula.
    t = np.atleast_1d(np.asarray(t, dtype=np.float64))
    roots = [
        optimize.brentq(lambda u, x=x: paper_f_mode(u, s) - x, 0.0, 1.0, xtol=1e-13)
        if 0.0 < x < 1.0
        else (1.0 if x <= 0.0 else 0.0)
        for x in t
    ]
    return 1.0 - np.asarray(roots)


def mode_pdf(t, s):
    # Change of variables: pi(t) = 1 / |f_mode'(u*)|, f_mode'(u) = -1 - s (1 - (pi / 2) sin(pi u)).
    u = 1.0 - mode_cdf(t, s)
    return 1.0 / np.abs(-1.0 - s * (1.0 - np.pi / 2.0 * np.sin(np.pi * u)))


@pytest.mark.parametrize(
    ("density", "kwargs", "cdf"),
    [
        ("logit_normal", {}, logit_normal_cdf),
        ("logit_normal", {"m": 0.5, "s": 0.6}, lambda t: logit_normal_cdf(t, 0.5, 0.6)),
        ("mode", {"mode_scale": 1.29}, lambda t: mode_cdf(t, 1.29)),
        ("mode", {"mode_scale": -0.5}, lambda t: mode_cdf(t, -0.5)),
        ("cosmap", {}, cosmap_cdf),
        ("uniform", {}, lambda t: torch.as_tensor(t).numpy()),
    ],
)
def test_sampled_timesteps_follow_the_papers_density(density, kwargs, cdf):
    t = draw(density, **kwargs)
    assert t.min() > 0 and t.max() < 1
    assert stats.kstest(t.numpy(), cdf).pvalue > 0.01


def test_a_wrong_density_is_detected_by_the_same_test():
    assert stats.kstest(draw("logit_normal", m=0.3).numpy(), logit_normal_cdf).pvalue < 1e-6
    assert stats.kstest(draw("uniform").numpy(), cosmap_cdf).pvalue < 1e-6


@pytest.mark.parametrize(
    ("pdf", "cdf"), [(rf.logit_normal_pdf, logit_normal_cdf), (rf.cosmap_pdf, cosmap_cdf)]
)
def test_the_papers_pdfs_integrate_to_the_sampled_distributions(pdf, cdf):
    for upper in (0.1, 0.37, 0.5, 0.9):
        mass, _ = integrate.quad(
            lambda x: pdf(torch.tensor(x, dtype=torch.float64)).item(), 1e-9, upper
        )
        assert mass == pytest.approx(float(cdf(upper)), abs=1e-6)


@pytest.mark.parametrize("s", [1.29, -0.5, 0.0, 1.75])
def test_f_mode_is_the_papers_eq_20(s):
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert np.allclose(rf.f_mode(u, s).numpy(), paper_f_mode(u.numpy(), s), atol=1e-12)
    # By hand at u = 1/3: cos^2(pi / 6) = 3/4, so f = 2/3 - s (3/4 - 1 + 1/3) = 2/3 - s / 12.
    assert rf.f_mode(torch.tensor(1 / 3, dtype=torch.float64), s).item() == pytest.approx(
        2 / 3 - s / 12
    )


def test_the_mode_density_matches_its_change_of_variables_pdf():
    # Histogram of drawn timesteps against the pdf derived from Eq. 20 (s = 1.29 puts more mass mid-way).
    t = draw("mode", mode_scale=1.29).numpy()
    edges = np.linspace(0.0, 1.0, 11)
    counts, _ = np.histogram(t, edges)
    for lo, hi, count in zip(edges[:-1], edges[1:], counts, strict=True):
        mass, _ = integrate.quad(lambda x: mode_pdf(x, 1.29)[0], lo, hi)
        assert count / N == pytest.approx(mass, abs=4 * (mass / N) ** 0.5 + 1e-3)
    assert mode_pdf(0.5, 1.29)[0] > 1.4 > mode_pdf(0.05, 1.29)[0]


def test_the_resolution_shift_is_eq_23():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    alpha = rf.resolution_shift(1024 * 1024)  # sqrt(m / n) against 256^2
    assert alpha == 4.0
    assert torch.allclose(rf.shift_timesteps(t, alpha), alpha * t / (1 + (alpha - 1) * t))
    assert rf.shift_timesteps(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    # Eq. 23 keeps the signal-to-noise ratio of a resolution m pixels at t_m equal to that of
    # n pixels at t_n when the per-pixel noise is scaled by alpha: t_m / (1 - t_m) = alpha t_n / (1 - t_n).
    shifted = rf.shift_timesteps(t[1:-1], alpha)
    assert torch.allclose(shifted / (1 - shifted), alpha * t[1:-1] / (1 - t[1:-1]))


def test_shifted_timesteps_are_the_pushforward_of_the_density():
    alpha = 3.0
    t = draw("logit_normal", shift=alpha)
    inverse = lambda x: x / (alpha - (alpha - 1) * x)  # noqa: E731
    assert (
        stats.kstest(t.numpy(), lambda x: logit_normal_cdf(inverse(torch.as_tensor(x)))).pvalue
        > 0.01
    )
    assert t.median() > 0.7  # shifted towards noise


def test_the_shift_stored_in_the_scheduler_is_the_one_diffusers_samples_with():
    plain, shifted = (
        FlowMatchEulerDiscreteScheduler(shift=1.0),
        FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    # The scheduler's 1000 training sigmas, before set_timesteps picks an inference grid.
    assert torch.allclose(rf.shift_timesteps(plain.sigmas, 3.0), shifted.sigmas, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 4, 10, 28, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 4.0])
def test_our_sampling_grid_is_diffusers_set_timesteps_grid(steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    ours = rf.sampling_schedule(steps, shift=shift)
    assert ours.shape == scheduler.sigmas.shape
    assert torch.allclose(ours, scheduler.sigmas, atol=1e-6, rtol=0)
    # The schedule the stock pipeline passes to the transformer is 1000 x these times.
    assert torch.allclose(rf.model_timestep(ours[:-1]), scheduler.timesteps, atol=1e-3, rtol=0)


class TimestepProbe(torch.nn.Module):
    """Stands in for the MMDiT: records the timestep it is given, returns zeros."""

    def __init__(self):
        super().__init__()
        self.seen = None

    def forward(
        self, hidden_states, encoder_hidden_states, pooled_projections, timestep, return_dict
    ):
        self.seen = timestep.detach().clone()
        return (torch.zeros_like(hidden_states),)


def test_the_transformer_receives_1000_t_as_diffusers_trains_and_samples_it():
    from model.conditioning import TextEncoding
    from model.objective import flow_loss

    probe = TimestepProbe()
    text = TextEncoding(
        torch.zeros(2, 77, 4),
        torch.zeros(2, 4),
        torch.zeros(2, 77, 4),
        torch.zeros(2, 4),
        torch.zeros(2, 5, 8),
        torch.ones(2, 5),
    )
    t = torch.tensor([0.25, 0.9])
    flow_loss(probe, torch.zeros(2, 4, 2, 2), text, t, torch.zeros(2, 4, 2, 2))
    assert torch.equal(probe.seen, torch.tensor([250.0, 900.0]))
    # diffusers' scheduler hands the transformer sigma * num_train_timesteps (1000) as well.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(5)
    assert torch.allclose(scheduler.timesteps, scheduler.sigmas[:-1] * 1000)


def test_the_objective_interpolates_data_and_noise_and_targets_their_difference():
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0.0, 0.25, 1.0])
    z = rf.interpolate(x0, eps, t)
    assert torch.equal(z[0], x0[0]) and torch.equal(z[2], eps[2])
    assert torch.allclose(z[1], 0.75 * x0[1] + 0.25 * eps[1])
    # The target is dz/dt, so Euler with the exact velocity maps noise back to data.
    velocity = rf.velocity_target(x0, eps)
    assert torch.allclose(
        rf.euler_sample(lambda z, t: velocity, eps, steps=5, shift=3.0), x0, atol=1e-5
    )


def test_training_draws_repeat_exactly_for_the_same_micro_batch_and_differ_between_them():
    latents = torch.zeros(64, 4, 2, 2)
    settings = FlowSettings(shift=3.0)
    a, b, c = (draw_noise_and_time(latents, settings, seed=0, j=j) for j in (5, 5, 6))
    assert torch.equal(a.t, b.t) and torch.equal(a.noise, b.noise) and torch.equal(a.keep, b.keep)
    assert not torch.equal(a.t, c.t)


def test_encoder_drop_rate_is_0_464_per_encoder_and_independent():
    keep = draw_noise_and_time(torch.zeros(20_000, 1, 1, 1), FlowSettings(), seed=1, j=0).keep
    dropped = (~keep).double()
    assert dropped.mean(0) == pytest.approx(torch.full((3,), 0.464, dtype=torch.float64), abs=0.015)
    all_dropped = dropped.prod(1).mean().item()
    assert all_dropped == pytest.approx(0.464**3, abs=0.008)  # ~10% fully unconditional
