"""--report-to: `t2i train` and `t2i dpo` log through accelerate's trackers (model/trackers.py).

TensorBoard files are read back with TensorBoard's own EventAccumulator; Weights & Biases runs
offline (WANDB_MODE=offline) when the package is installed, and its absence is a one-line error.
"""

from __future__ import annotations

import json
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train import quick

from flows.artifacts import read_scalars
from flows.cli import main as t2i
from model.train import train

GUARD = ["loss", "implicit_acc", "reward_margin", "winner_drift", "loser_drift", "saturated_frac"]


def events(folder) -> EventAccumulator:
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file in {folder}"
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def dpo(pairs, model, out, *extra):
    argv = [
        "dpo",
        str(pairs),
        str(out),
        "--model",
        model,
        "--max-steps",
        "4",
        "--batch-size",
        "2",
        "--lora-rank",
        "4",
        "--lora-alpha",
        "4",
        "--lr",
        "1e-3",
        "--log-every",
        "2",
        "--heldout-fraction",
        "0.3",
        "--eval-seeds",
        "1",
        "--eval-steps",
        "2",
    ]
    return t2i([*argv, *extra])


def test_dpo_logs_its_guard_metrics_accuracy_and_eval_grids_to_tensorboard(
    dpo_pairs, tiny_model_dir, tmp_path
):
    out = tmp_path / "dpo"
    assert dpo(dpo_pairs, tiny_model_dir, out) == 0
    logged = events(out / "logs")
    scalars = set(logged.Tags()["scalars"])
    assert {f"dpo/{name}" for name in GUARD} | {"dpo/heldout_implicit_acc"} <= scalars
    assert [e.step for e in logged.Scalars("dpo/winner_drift")] == [2, 4]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in logged.Scalars("dpo/loss")] == pytest.approx(
        [row["loss"] for row in metrics]
    )
    summary = json.loads((out / "summary.json").read_text())
    grids = summary["sample_eval"]["grids"]  # base | LoRA side by side, one per caption
    assert grids and set(logged.Tags()["images"]) == {g.split("/")[-1][:-4] for g in grids}
    # the Prefect artifact reads the TensorBoard copy of the rows, not metrics.jsonl a second time
    series = read_scalars(out)
    assert "dpo/loss" in series and "loss" not in series


def test_train_logs_loss_validation_and_sample_grids_through_the_trackers(
    encoded, tiny_model_dir, tmp_path
):
    out = train(
        _reader(encoded),
        tmp_path / "run",
        quick(tiny_model_dir, max_steps=4, val_every=2, sample_every=2),
    )
    logged = events(out / "training" / "logs")
    assert {"train/loss", "train/lr", "train/steps_per_s", "val/loss"} <= set(
        logged.Tags()["scalars"]
    )
    assert [e.step for e in logged.Scalars("train/loss")] == [2, 4]
    assert [e.step for e in logged.Images("samples")] == [2, 4]


def test_report_to_none_writes_no_logs(dpo_pairs, tiny_model_dir, tmp_path):
    out = tmp_path / "quiet"
    assert dpo(dpo_pairs, tiny_model_dir, out, "--report-to", "none", "--eval-seeds", "0") == 0
    assert not (out / "logs").exists() and (out / "metrics.jsonl").is_file()


def test_wandb_without_the_package_is_a_one_line_error_before_any_work(
    dpo_pairs, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    out = tmp_path / "out"
    assert dpo(dpo_pairs, tiny_model_dir, out, "--report-to", "wandb") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install wandb" in err, err
    assert not out.exists() and not (tmp_path / ".out.work").exists()


def test_dpo_runs_offline_with_wandb_and_keeps_the_run_for_wandb_sync(
    dpo_pairs, tiny_model_dir, tmp_path, monkeypatch
):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    assert dpo(dpo_pairs, tiny_model_dir, out, "--report-to", "all") == 0
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (log,) = runs[0].glob("run-*.wandb")  # what `wandb sync` uploads: protobuf records, whose
    records = log.read_bytes()  # string fields (history keys, config) are stored as plain UTF-8
    for name in [*GUARD, "heldout_implicit_acc"]:
        assert f"dpo/{name}".encode() in records, name
    assert list((runs[0] / "files" / "media" / "images").glob("grid-00-*.png"))
    assert (out / "logs").is_dir()  # and TensorBoard beside it


def _reader(encoded):
    from model.encoded import EncodedDataset

    return EncodedDataset(encoded)
