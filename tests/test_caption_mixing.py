import pytest

from captioning.mixing import caption_variant


def _draws(seed, n=10_000, p=0.5):
    return [
        caption_variant(f"id-{i % 500}", step=i // 500, seed=seed, p_synthetic=p) for i in range(n)
    ]


def test_synthetic_fraction_is_half_and_reproducible():
    first, second = _draws(seed=7), _draws(seed=7)
    fraction = first.count("synthetic") / len(first)
    assert abs(fraction - 0.5) <= 0.02
    assert first == second


def test_different_seeds_and_steps_choose_differently():
    assert _draws(seed=1) != _draws(seed=2)
    per_step = [caption_variant("same-id", step=s) for s in range(200)]
    assert 60 < per_step.count("synthetic") < 140


@pytest.mark.parametrize("p", [0.0, 0.2, 1.0])
def test_probability_is_respected(p):
    fraction = _draws(seed=3, n=5000, p=p).count("synthetic") / 5000
    assert abs(fraction - p) <= 0.02


def test_rows_without_a_synthetic_caption_fall_back_to_the_original():
    assert {caption_variant(f"x{i}", 0, has_synthetic=False) for i in range(100)} == {"original"}


def test_invalid_probability_is_rejected():
    with pytest.raises(ValueError, match="p_synthetic"):
        caption_variant("x", 0, p_synthetic=1.5)
