"""At its shipped defaults (only the steps scaled down), `t2i dpo`'s loop moves samples toward the
preferred images, swapped labels move them the other way, and prompts outside the preference set
keep their behaviour (dpo/proof.py).

The light version of `benchmarks/bench_dpo_proof.py proof`: a base fitted for 300 steps instead
of 1,500, 150 DPO steps, 48 held-out sampling seeds.
"""

import pytest

from dpo.config import DPOConfig
from dpo.proof import build_base, run_proof

DPO_STEPS = 150


@pytest.fixture(scope="module")
def proof(tmp_path_factory):
    model, data = build_base(tmp_path_factory.mktemp("base"), "tiny-d4", steps=300, lr=4e-3)
    assert data.classifier_accuracy >= 0.9  # the colour classifier itself is trustworthy
    config = DPOConfig(model=str(model), max_steps=DPO_STEPS, eval_seeds=0)
    return run_proof(model, data, config, tmp_path_factory.mktemp("proof"), seeds=48)


def test_the_base_mixes_red_and_blue_for_the_generic_caption(proof):
    assert 0.2 <= proof.base.preferred_rate <= 0.8  # room to move either way


def test_dpo_raises_the_preferred_colours_share_of_samples_for_held_out_seeds(proof):
    assert proof.rise >= 0.2, proof.as_dict()


def test_swapped_labels_lower_it(proof):
    assert proof.control_fall >= 0.2, proof.as_dict()


def test_prompts_outside_the_preference_set_keep_their_colour_accuracy(proof):
    assert abs(proof.other_prompts_change) <= 0.05, proof.as_dict()


def test_training_diagnostics_agree_but_are_not_the_evidence(proof):
    assert proof.dpo.heldout_implicit_acc > 0.5 and proof.swapped.heldout_implicit_acc > 0.5
    assert proof.dpo.guard["winner_drift"] is not None and proof.dpo.guard["warning"] is None
