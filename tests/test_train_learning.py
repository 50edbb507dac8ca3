"""Proof of learning, light: a model trained from scratch follows the colour its caption names.

benchmarks/bench_learning.py runs the full version (four colours, shapes, a bigger model).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_learning.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_learning", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # two short trainings and three models sampled: ~1 min on 2 cores
def test_training_makes_samples_follow_the_caption_far_above_chance_and_the_untrained_model(
    tmp_path,
):
    result = load_bench().measure(
        preset="tiny",
        steps=120,
        n=32,
        batch=8,
        lr=5e-3,
        warmup=12,
        seeds=4,
        sample_steps=6,
        solid=True,
        colours=("red", "blue"),
        held_out=0,
        work=tmp_path,
        pipeline=True,
        blind_control=True,
    )
    assert result["chance"] == 0.5
    assert result["untrained_accuracy"] <= 0.75
    assert result["trained_accuracy"] >= 0.9
    assert result["trained_accuracy"] >= result["untrained_accuracy"] + 0.25
    # The exported folder through diffusers' stock StableDiffusion3Pipeline (its own encoders,
    # scheduler, guidance 4 against the empty prompt): every caption's samples take its colour,
    # so a model that paints one colour whatever the prompt (0.5 overall) cannot pass.
    per_caption = result["pipeline_trained_per_caption"]
    assert len(per_caption) == 4 and min(per_caption.values()) >= 0.75, per_caption
    assert result["pipeline_trained_accuracy"] >= 0.9
    # Controls, judged the same way: the base folder's untrained transformer, and the same run
    # with every text encoder always dropped (it never sees a caption), sit at chance.
    assert result["pipeline_untrained_accuracy"] <= 0.75
    assert result["pipeline_blind_accuracy"] <= 0.75, result["pipeline_blind_per_caption"]
