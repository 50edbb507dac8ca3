"""Checkpoint selection (dpo/selection.py): the documented rule, and `t2i dpo --select-every`
exporting the checkpoint it picks."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dpo.selection import Candidate, choose, stops


def _c(step, gain, worst):
    return Candidate(step, gain, None, "a blue car" if worst is not None else None, worst)


def test_the_rule_takes_the_largest_gain_among_checkpoints_that_keep_every_off_target_caption():
    candidates = [_c(100, 0.2, -0.01), _c(200, 0.5, -0.04), _c(300, 0.9, -0.30)]
    chosen, warning = choose(candidates, tolerance=0.05)
    assert chosen.step == 200 and warning is None  # 300 moved more but broke a caption
    chosen, _ = choose([_c(100, 0.5, 0.0), _c(200, 0.5, 0.0)], 0.05)
    assert chosen.step == 100  # a tie goes to the earlier checkpoint


def test_when_none_keeps_them_the_smallest_worst_drop_is_exported_with_a_warning():
    chosen, warning = choose([_c(100, 0.2, -0.2), _c(200, 0.5, -0.1), _c(300, 0.9, -0.3)], 0.05)
    assert chosen.step == 200 and "step 200" in warning and "'a blue car'" in warning
    with pytest.raises(ValueError):
        choose([], 0.05)


def test_evaluation_stops_fall_every_n_steps_and_at_the_end():
    assert stops(0, 10, 4) == [4, 8, 10]
    assert stops(4, 10, 4) == [8, 10]  # resumed at step 4
    assert stops(0, 8, 4) == [4, 8] and stops(0, 10, 0) == [10]


def test_t2i_dpo_select_every_exports_the_checkpoint_the_rule_picks(tiny_model_dir, tmp_path):
    from test_dpo_conventions import _folder_prefs

    from dpo.config import DPOConfig
    from dpo.trainer import run_dpo

    config = DPOConfig(
        model=tiny_model_dir,
        rank=4,
        alpha=4.0,
        batch_size=2,
        max_steps=4,
        lr=1e-2,
        beta=1000.0,
        heldout_fraction=0.0,
        eval_seeds=2,
        eval_steps=3,
        eval_captions=["a square 0"],
        offtarget_captions=["a blue lake"],
        scorer="attribute:warm",
        select_every=2,
        select_tolerance=1.0,
    )
    out = run_dpo(_folder_prefs(tmp_path / "prefs"), tmp_path / "out", config)
    selection = json.loads((out / "summary.json").read_text())["selection"]
    assert [c["step"] for c in selection["candidates"]] == [2, 4]
    expected, _ = choose([Candidate(**c) for c in selection["candidates"]], 1.0)
    assert selection["chosen_step"] == expected.step
    work = next((tmp_path / ".out.work").glob("*/selection"))
    picked = load_file(str(work / f"step-{expected.step:07d}" / "pytorch_lora_weights.safetensors"))
    other = 6 - expected.step
    unpicked = load_file(str(work / f"step-{other:07d}" / "pytorch_lora_weights.safetensors"))
    exported = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert exported.keys() == picked.keys()
    assert all(torch.allclose(exported[k].float(), picked[k], atol=1e-2) for k in picked)
    assert any(not torch.allclose(exported[k].float(), unpicked[k], atol=1e-3) for k in picked)
    report = (out / "report.md").read_text()
    assert f"Exported: **step {expected.step}**" in report and "| 2" in report


def test_select_every_without_a_scorer_is_a_one_line_error(tiny_model_dir, tmp_path, capsys):
    from test_dpo_conventions import _folder_prefs

    from flows.cli import main as t2i

    prefs = _folder_prefs(tmp_path / "prefs")
    argv = ["dpo", str(prefs), str(tmp_path / "out"), "--model", tiny_model_dir]
    assert t2i([*argv, "--select-every", "2", "--offtarget-captions", "a lake"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--select-every needs --scorer" in err[0]
