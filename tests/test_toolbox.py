"""The training toolbox (model/toolbox.py): each idea `t2i train` and `t2i dpo` share exists once."""

from __future__ import annotations

import json

import pytest
import torch

from dpo.config import DPOConfig
from dpo.encode import EncodedPairs
from dpo.trainer import draw, split_heldout
from model.conditioning import TextEncoding
from model.config import TrainConfig
from model.objective import FlowSettings, draw_noise_and_time
from model.toolbox import (
    NonFiniteGuard,
    accelerator_released,
    draw_timesteps,
    heldout_split,
    make_accelerator,
    nonfinite,
    scheduler_shift,
)


def pairs(ids: list[str]) -> EncodedPairs:
    n = len(ids)
    text = TextEncoding(
        clip_l=torch.zeros(n, 2, 4),
        clip_l_pooled=torch.zeros(n, 4),
        clip_g=torch.zeros(n, 2, 4),
        clip_g_pooled=torch.zeros(n, 4),
        t5=torch.zeros(n, 3, 4),
        t5_mask=torch.ones(n, 3, dtype=torch.long),
    )
    latents = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1)
    return EncodedPairs(list(ids), latents, latents.clone(), text)


def test_the_held_out_split_is_the_same_for_train_and_dpo_and_hangs_on_ids_and_seed():
    ids = [f"sample-{k:03d}" for k in range(50)]
    train_idx, held_idx = heldout_split(ids, 0.2, seed=3)
    assert len(held_idx) == 10 and sorted(train_idx + held_idx) == list(range(50))
    assert heldout_split(ids, 0.2, seed=3) == (train_idx, held_idx)  # deterministic
    assert heldout_split(ids, 0.2, seed=4)[1] != held_idx  # the seed picks the set
    shuffled = ids[::3] + ids[1::3] + ids[2::3]
    assert {shuffled[i] for i in heldout_split(shuffled, 0.2, seed=3)[1]} == {
        ids[i] for i in held_idx
    }
    # `t2i dpo` holds out the very pairs `t2i train` would hold out of the same ids and seed
    train_pairs, held_pairs = split_heldout(pairs(ids), 0.2, seed=3)
    assert held_pairs.ids == [ids[i] for i in held_idx]
    assert train_pairs.ids == [ids[i] for i in train_idx]
    # train's validation split, with --val-max-samples as the cap, is the same ranking cut shorter
    capped = heldout_split(ids, 0.2, 4, seed=3)[1]
    assert len(capped) == 4 and set(capped) < set(held_idx)


def test_the_held_out_split_always_leaves_one_sample_to_train_on_and_refuses_an_empty_set():
    assert heldout_split(["a", "b"], 0.99)[0] != []
    _, held = split_heldout(pairs(["a"]), 0.5, seed=0)
    assert held is None
    assert heldout_split(["a", "b", "c"], 0.0) == ([0, 1, 2], [])
    with pytest.raises(ValueError, match="empty"):
        heldout_split([], 0.1)


def test_the_scheduler_shift_is_the_one_the_folder_samples_with(tmp_path):
    assert scheduler_shift(tmp_path) == 1.0  # no scheduler folder
    config = tmp_path / "scheduler" / "scheduler_config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler"}))
    assert scheduler_shift(tmp_path) == 1.0  # FlowMatchEulerDiscreteScheduler's default
    config.write_text(json.dumps({"shift": 3}))
    assert scheduler_shift(tmp_path) == 3.0


def test_train_and_dpo_draw_timesteps_through_one_path():
    train = TrainConfig(model="m", density="mode", mode_scale=0.5)
    dpo = DPOConfig(model="m", density="mode", mode_scale=0.5)
    settings = FlowSettings(train.density, train.logit_mean, train.logit_std, train.mode_scale, 3.0)
    from curate.runtime.seeds import seed_int

    drawn = draw_noise_and_time(torch.zeros(5, 1, 2, 2), settings, seed=7, j=2).t
    generator = torch.Generator().manual_seed(seed_int(7, "draws", 2))
    assert torch.equal(drawn, draw_timesteps(dpo, 5, 3.0, generator))
    # dpo's step draw takes its timesteps from the same function, after the pair indices
    generator = torch.Generator().manual_seed(11)
    _, t, _ = draw(pairs([f"p{i}" for i in range(6)]), 4, generator, dpo, 3.0)
    again = torch.Generator().manual_seed(11)
    torch.randperm(6, generator=again)
    assert torch.equal(t, draw_timesteps(dpo, 4, 3.0, again))
    shifted = draw_timesteps(dpo, 1000, 3.0, torch.Generator().manual_seed(0))
    plain = draw_timesteps(dpo, 1000, 1.0, torch.Generator().manual_seed(0))
    assert bool((shifted >= plain).all()) and shifted.mean() > plain.mean()  # Eq. 23 moves t up


def test_the_non_finite_check_flags_nan_and_inf_and_the_guard_keeps_the_first_step():
    assert not nonfinite(torch.tensor(1.0), torch.tensor([2.0, 3.0]))
    assert nonfinite(torch.tensor(1.0), torch.tensor([2.0, float("nan")]))
    assert nonfinite(torch.tensor(float("inf")))
    guard = NonFiniteGuard("cpu")
    assert guard.first_bad_step() is None
    guard.record(torch.tensor(False), 1)
    guard.record(torch.tensor(True), 2)
    guard.record(torch.tensor(True), 3)
    assert guard.first_bad_step() == 2


def test_the_accelerator_honours_cpu_and_its_state_is_released_after_a_run():
    from accelerate.state import AcceleratorState

    with accelerator_released():
        accelerator = make_accelerator("cpu", "auto", grad_accum=3)
        assert accelerator.device.type == "cpu" and accelerator.mixed_precision == "no"
        assert accelerator.gradient_accumulation_steps == 3
        assert AcceleratorState._shared_state != {}
    assert AcceleratorState._shared_state == {}
    with pytest.raises(RuntimeError), accelerator_released():
        make_accelerator("cpu")
        raise RuntimeError("a failed run")
    assert AcceleratorState._shared_state == {}
