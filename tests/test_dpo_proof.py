"""DPO moves a tiny model the right way, and swapped labels move it the other way (dpo/proof.py).

The lightest version of benchmarks/bench_dpo_proof.py: a 2-layer base fitted briefly to warm and
cool textures, 32 pairs (a quarter held out), 40 DPO steps with the true and with swapped labels.
"""

import pytest

from dpo.config import DPOConfig
from dpo.proof import run_proof


@pytest.fixture(scope="module")
def proof(tiny_model_dir, tmp_path_factory):
    dpo = DPOConfig(
        model=tiny_model_dir, beta=1000.0, lr=3e-3, rank=8, alpha=8, max_steps=40, batch_size=8
    )
    return run_proof(
        tiny_model_dir,
        tmp_path_factory.mktemp("proof"),
        base_steps=100,
        base_lr=4e-3,
        dpo=dpo,
        seeds=64,
    )


def test_dpo_raises_the_preferred_attributes_rate_in_samples_for_held_out_seeds(proof):
    assert proof.dpo_rate >= proof.base_rate + 0.2
    assert proof.dpo_warmth > proof.base_warmth + 0.2


def test_held_out_implicit_accuracy_is_above_chance(proof):
    assert proof.heldout_acc > 0.5


def test_swapped_labels_move_the_samples_the_other_way(proof):
    assert proof.swapped_rate <= proof.base_rate - 0.2
    assert proof.swapped_warmth < proof.base_warmth - 0.1
    assert proof.swapped_heldout_acc > 0.5  # it learns the swapped preference just as well
