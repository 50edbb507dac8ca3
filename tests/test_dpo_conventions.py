"""Conventions of the DPO step that a silent change would break, each checked against a value
computed here independently (issue 20 item 4): the per-element mean (a sum would change beta's
units), one noise and one t shared by winner and loser, the scheduler's shift, which half of the
batch is the winner, and ties counted as neither a win nor a loss."""

import pytest
import torch
from PIL import Image
from test_dpo_loss import _random_pairs

from dpo.config import DPOConfig
from dpo.encode import EncodedPairs
from dpo.lora import add_lora, lora_parameters
from dpo.reference import adapter_off
from model.objective import predict_velocity

TARGETS = ["attn.to_q", "attn.to_v", "attn.add_k_proj"]


def _lora_model(model_dir: str, nudge: float):
    from dpo.trainer import load_transformer

    transformer = load_transformer(model_dir, "cpu", torch.float32)
    add_lora(transformer, 4, 4.0, TARGETS, seed=0)
    if nudge:  # B starts at 0: move it so the policy differs from the reference
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in lora_parameters(transformer):
                p.add_(nudge * torch.randn(p.shape, generator=g))
    return transformer.eval()


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return _lora_model(tiny_model_dir, 0.2)


def _config(model_dir: str, **kw) -> DPOConfig:
    return DPOConfig(model=model_dir, lora_rank=4, lora_alpha=4.0, lora_targets=TARGETS, **kw)


@torch.no_grad()
def _noise_mse(transformer, x0, noise, t, text) -> torch.Tensor:
    """Per-sample noise-prediction MSE, written out: z_t = (1 - t) x0 + t eps, the model's
    velocity, its implied noise eps_hat = z_t + (1 - t) v_hat, mean over C x H x W elements."""
    tt = t.view(-1, 1, 1, 1)
    z = (1 - tt) * x0 + tt * noise
    eps_hat = z + (1 - tt) * predict_velocity(transformer, z, t, text)
    return ((eps_hat - noise) ** 2).mean(dim=(1, 2, 3))


def _draws(n: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([0.15, 0.5, 0.8][:n]), torch.randn(n, 16, 8, 8, generator=g)


def test_errors_are_per_element_mean_noise_mse_and_the_first_half_is_the_winner(
    policy, tiny_model_dir
):
    from dpo.trainer import dpo_terms

    pairs = _random_pairs(3, seed=5)
    t, noise = _draws(3)
    terms = dpo_terms(policy, pairs, t, noise, _config(tiny_model_dir))
    text = pairs.text
    expected_w = _noise_mse(policy, pairs.latents_w, noise, t, text)
    expected_l = _noise_mse(policy, pairs.latents_l, noise, t, text)
    with adapter_off(policy):
        ref_w = _noise_mse(policy, pairs.latents_w, noise, t, text)
        ref_l = _noise_mse(policy, pairs.latents_l, noise, t, text)
    # a sum over the 1,024 elements (or the velocity units) would be off by orders of magnitude;
    # swapped halves would put the losers' errors in err_w
    assert torch.allclose(terms.err_w, expected_w, rtol=1e-4)
    assert torch.allclose(terms.err_l, expected_l, rtol=1e-4)
    assert torch.allclose(terms.ref_w, ref_w, rtol=1e-4)
    assert torch.allclose(terms.ref_l, ref_l, rtol=1e-4)
    assert not torch.allclose(expected_w, expected_l, rtol=1e-2)  # the halves can be told apart
    beta = 5000.0
    margin = -beta / 2 * ((expected_w - ref_w) - (expected_l - ref_l))
    assert torch.allclose(terms.margin, margin, rtol=1e-3, atol=1e-3)


def test_winner_and_loser_share_one_noise_and_one_timestep(policy, tiny_model_dir):
    """With the same image on both sides, any difference between the halves' errors could only
    come from different noise or different t."""
    from dpo.trainer import dpo_terms

    pairs = _random_pairs(3, seed=6)
    same = EncodedPairs(pairs.ids, pairs.latents_w, pairs.latents_w.clone(), pairs.text)
    t, noise = _draws(3)
    terms = dpo_terms(policy, same, t, noise, _config(tiny_model_dir))
    assert torch.equal(terms.err_w, terms.err_l) and torch.equal(terms.ref_w, terms.ref_l)
    assert torch.count_nonzero(terms.margin) == 0
    assert not torch.equal(terms.err_w, terms.ref_w)  # the LoRA does change the errors


def test_the_winner_is_the_one_a_few_steps_make_likelier(tiny_model_dir, tmp_path):
    """End to end in seconds: after DPO on one pair the LoRA prefers its winner over its loser
    more than the reference does, on draws it never trained on."""
    from dpo.trainer import train_lora

    transformer = _lora_model(tiny_model_dir, 0.0)
    pairs = _random_pairs(2, seed=7).subset([0])
    config = _config(tiny_model_dir, lr=3e-3, beta=2000.0, batch_size=1, max_steps=12)
    train_lora(transformer, pairs, config, tmp_path, shift=1.0)
    g = torch.Generator().manual_seed(11)
    n = 8
    t, noise = torch.rand(n, generator=g) * 0.8 + 0.1, torch.randn(n, 16, 8, 8, generator=g)
    text = pairs.subset([0] * n).text
    win, lose = (pairs.latents_w.expand(n, -1, -1, -1), pairs.latents_l.expand(n, -1, -1, -1))
    gap = _noise_mse(transformer, win, noise, t, text) - _noise_mse(
        transformer, lose, noise, t, text
    )
    with adapter_off(transformer):
        ref_gap = _noise_mse(transformer, win, noise, t, text) - _noise_mse(
            transformer, lose, noise, t, text
        )
    assert ((gap - ref_gap) < 0).float().mean() >= 0.75  # the winner gained on the loser


def test_the_anchor_is_the_noise_unit_distance_of_both_halves_predictions(policy, tiny_model_dir):
    from dpo.trainer import dpo_terms

    pairs = _random_pairs(3, seed=8)
    t, noise = _draws(3)
    plain = dpo_terms(policy, pairs, t, noise, _config(tiny_model_dir))
    anchored = dpo_terms(policy, pairs, t, noise, _config(tiny_model_dir, anchor_weight=0.5))
    tt = torch.cat([t, t]).view(-1, 1, 1, 1)
    x0 = torch.cat([pairs.latents_w, pairs.latents_l])
    z = (1 - tt) * x0 + tt * torch.cat([noise, noise])
    both = pairs.subset([0, 1, 2, 0, 1, 2]).text
    with torch.no_grad():
        v = predict_velocity(policy, z, tt.flatten(), both)
        with adapter_off(policy):
            v_ref = predict_velocity(policy, z, tt.flatten(), both)
    distance = ((1 - tt) ** 2 * (v - v_ref) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(anchored.anchor, distance, rtol=1e-4)
    extra = anchored.loss - plain.loss
    assert extra.item() == pytest.approx(0.5 * 5000.0 / 2 * distance.mean().item(), rel=1e-3)


def test_an_untouched_lora_ties_every_pair_and_scores_one_half(tiny_model_dir):
    from dpo.trainer import implicit_accuracy

    transformer = _lora_model(tiny_model_dir, 0.0)
    config = _config(tiny_model_dir, batch_size=3)
    assert implicit_accuracy(transformer, _random_pairs(6), config, 3.0) == 0.5


def test_report_and_win_rate_count_ties_as_neither_win_nor_loss():
    from dpo.evaluate import report_markdown, tally, win_rate

    base, lora = [0.1, 0.2, 0.3, 0.4], [0.1, 0.5, 0.3, 0.0]
    assert tally(base, lora) == (1, 2, 1) and win_rate(base, lora) == 0.5
    assert win_rate([1.0, 2.0], [1.0, 2.0]) == 0.5  # no change at all is not a win
    evaluation = {
        "captions": ["x"],
        "seeds": [0, 1, 2, 3],
        "grids": ["g.png"],
        "scorer": "attribute:warm",
        "base_scores": [base],
        "lora_scores": [lora],
        "win_rate": 0.5,
    }
    text = report_markdown({"sample_eval": evaluation, "guard": {}})
    assert "| 1 / 2 / 1 |" in text


def _folder_prefs(root):
    """Four folder-layout pairs of 32 px images (warm beats cool)."""
    for k in range(4):
        pair = root / f"p{k}"
        pair.mkdir(parents=True)
        Image.new("RGB", (32, 32), (200, 40 + 10 * k, 40)).save(pair / "winner.png")
        Image.new("RGB", (32, 32), (40, 40 + 10 * k, 200)).save(pair / "loser.png")
        (pair / "caption.txt").write_text(f"a square {k}\n")
    return root


def test_t2i_dpo_draws_its_timesteps_with_the_models_scheduler_shift(
    tiny_model_dir, tmp_path, monkeypatch
):
    import dpo.trainer as trainer

    shift = trainer.scheduler_shift(tiny_model_dir)
    assert shift == 3.0  # the tiny kit's scheduler, as SD3's
    seen = []
    original = trainer.draw

    def spy(pairs, batch, generator, config, shift, *args):
        state = generator.get_state()
        chosen, t, noise = original(pairs, batch, generator, config, shift, *args)
        unshifted = original(pairs, batch, torch.Generator().set_state(state), config, 1.0)[1]
        seen.append((shift, t, unshifted))
        return chosen, t, noise

    monkeypatch.setattr(trainer, "draw", spy)
    config = _config(tiny_model_dir, max_steps=2, batch_size=2, eval_seeds=0, heldout_fraction=0.0)
    trainer.run_dpo(_folder_prefs(tmp_path / "prefs"), tmp_path / "out", config)
    assert len(seen) == 2
    for used, t, u in seen:
        assert used == shift
        assert torch.allclose(t, shift * u / (1 + (shift - 1) * u))  # SD3 Eq. 23, written out
        assert not torch.allclose(t, u)


def test_preservation_anchors_other_captions_at_the_pairs_noisy_latents(policy, tiny_model_dir):
    from dpo.regularizers import draw_preserve
    from dpo.trainer import dpo_terms

    pairs, other = _random_pairs(3, seed=9), _random_pairs(3, seed=10).text
    t, noise = _draws(3)
    config = _config(tiny_model_dir, preserve_weight=2.0)
    plain = dpo_terms(policy, pairs, t, noise, config)
    kept = dpo_terms(policy, pairs, t, noise, config, preserve=other)
    x0 = torch.stack([pairs.latents_w[0], pairs.latents_l[1], pairs.latents_w[2]])
    tt = t.view(-1, 1, 1, 1)
    z = (1 - tt) * x0 + tt * noise
    with torch.no_grad():
        v = predict_velocity(policy, z, t, other)
        with adapter_off(policy):
            v_ref = predict_velocity(policy, z, t, other)
    distance = ((1 - tt) ** 2 * (v - v_ref) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(kept.preserve, distance, rtol=1e-4)
    assert (kept.loss - plain.loss).item() == pytest.approx(
        2.0 * 2500 * distance.mean().item(), rel=1e-3
    )
    assert torch.equal(kept.margin, plain.margin)  # the DPO term itself is untouched
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    a, b = draw_preserve(other, 5, g1), draw_preserve(other, 5, g2)
    assert torch.equal(a.t5, b.t5) and a.t5.shape[0] == 5 and draw_preserve(None, 5, g1) is None
