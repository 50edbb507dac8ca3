"""At its shipped defaults (only the steps scaled down), `t2i dpo`'s loop moves samples toward the
preferred images, swapped labels move them the other way, and no single prompt outside the
preference set loses more than 0.05 of its colour accuracy (issue 20; dpo/shapes_task.py,
dpo/shapes_proof.py).

The light version of `benchmarks/bench_dpo_proof.py shapes`: the weaker of its two bases (500
steps of `t2i train`'s loop on 4 shapes x 4 colours at 64 px; the leak is larger on it), 400 DPO
steps instead of 4,000, 48 held-out sampling seeds per prompt, one thread (the benchmark's
setting, so the figures are the ones in benchmarks/RESULTS.md). --preserve-captions are the circle and square
prompts; the verdict reads the triangle and cross prompts, which no part of training shows.
"""

import os

import pytest
import torch

from dpo.config import DPOConfig
from dpo.shapes_proof import PROOF_SEEDS, Sampling, run_proof
from dpo.shapes_task import BASE_STEPS, build_task

pytestmark = pytest.mark.slow
DPO_STEPS = 400
SEEDS = 48


@pytest.fixture(scope="module")
def proof(tmp_path_factory):
    # T2I_DPO_PROOF_CACHE: a folder where benchmarks/bench_dpo_proof.py shapes cached its bases
    cache = os.environ.get("T2I_DPO_PROOF_CACHE") or tmp_path_factory.mktemp("base")
    model, task = build_task(cache, "weak", BASE_STEPS["weak"])
    assert task.classifier_accuracy["colour"] >= 0.95  # the colour classifier itself is trustworthy
    config = DPOConfig(model=str(model), max_steps=DPO_STEPS, eval_seeds=0)
    work = tmp_path_factory.mktemp("proof")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_proof(model, task, config, work, PROOF_SEEDS[:SEEDS], Sampling())
    finally:
        torch.set_num_threads(threads)


def test_the_base_mixes_red_with_other_colours_for_the_generic_caption(proof):
    assert 0.2 <= proof["base"]["preferred_rate"] <= 0.8  # room to move either way


def test_dpo_raises_the_preferred_colours_share_of_samples_for_held_out_seeds(proof):
    assert proof["judged"]["dpo"]["rise"] >= 0.2, proof["judged"]


def test_swapped_labels_lower_it(proof):
    assert proof["judged"]["swapped"]["rise"] <= -0.2, proof["judged"]


def test_no_single_prompt_outside_the_preference_set_loses_its_colour(proof):
    judged = proof["judged"]["dpo"]
    assert judged["worst_colour_change"] >= -0.05, judged  # the worst prompt, not the mean


@pytest.mark.xfail(
    strict=True,
    reason="issue 20: the swapped-label control's worst held-out prompt falls 0.062 (3 of 48 "
    "seeds, each sample already ambiguous to the colour reader; benchmarks/RESULTS.md)",
)
def test_the_control_keeps_every_prompt_outside_the_preference_set_too(proof):
    judged = proof["judged"]["swapped"]
    assert judged["worst_colour_change"] >= -0.05, judged
