"""The base trainer: output folder, exact resume after SIGKILL, non-finite stop, data plan, EMA."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file

from model.checkpoint import list_checkpoints
from model.config import TrainConfig
from model.ema import EMA
from model.toolbox import NonFiniteLossError, heldout_split
from model.train import run_train, train
from model.train_data import BatchPlan

ROOT = Path(__file__).resolve().parents[1]


def quick(model: str, **overrides) -> TrainConfig:
    base = dict(
        model=model,
        device="cpu",
        batch_size=4,
        max_steps=6,
        warmup_steps=2,
        lr=1e-3,
        log_every=2,
        val_every=0,
        sample_every=0,
        sample_count=2,
        sample_steps=3,
        checkpoint_every=0,
        val_fraction=0.2,
        ema_decay=0.9,
    )
    return TrainConfig(**{**base, **overrides})


def transformer_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")


REFERENCE = dict(
    max_steps=12,
    checkpoint_every=3,
    checkpoints_total_limit=2,
    grad_accum=2,
    batch_size=3,
    shift=2.5,
    sample_every=6,
)


def cli_flags(config: TrainConfig) -> list[str]:
    """`t2i train` flags for every option that differs from its default."""
    flags = []
    for name, value in config.model_dump(exclude_defaults=True).items():
        flag = "--" + name.replace("_", "-")
        flags += (
            ([flag] if value else ["--no-" + name.replace("_", "-")])
            if isinstance(value, bool)
            else [flag, str(value)]
        )
    return flags


@pytest.fixture(scope="module")
def reference(encoded, tiny_model_dir, tmp_path_factory) -> Path:
    """An uninterrupted run through `run_train` (the `t2i train` runner)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    return run_train(str(encoded), str(out), quick(tiny_model_dir, **REFERENCE))


def test_training_writes_a_loadable_sd3_folder_with_ema_weights_and_its_shift(
    reference, tiny_model_dir
):
    pipe = StableDiffusion3Pipeline.from_pretrained(reference, local_files_only=True)
    assert pipe.scheduler.config.shift == 2.5
    image = pipe(prompt="a red circle", num_inference_steps=2, height=32, width=32).images[0]
    assert image.size == (32, 32)
    trained, initial = transformer_weights(reference), transformer_weights(Path(tiny_model_dir))
    assert trained.keys() == initial.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)
    # EMA by default: the exported weights average the raw ones, so they differ from the last checkpoint's.
    checkpoints = list_checkpoints(reference / "training" / "checkpoints")
    assert [p.name for p in checkpoints] == ["step-00000009", "step-00000012"]  # retention limit 2
    raw = load_file(checkpoints[-1] / "model.safetensors")
    assert any(not torch.equal(raw[k], trained[k]) for k in trained)
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["stage"] == "train" and manifest["counts"] == {
        "train": 19,
        "validation": 5,
        "steps": 12,
    }
    assert sorted(p.name for p in (reference / "training" / "samples").glob("*.png")) == [
        "step-00000006.png",
        "step-00000012.png",
    ]
    assert list((reference / "training" / "logs").glob("events.out.tfevents.*"))


def test_a_run_killed_after_a_checkpoint_resumes_to_bit_identical_weights(
    tmp_path, encoded, reference, tiny_model_dir
):
    config = quick(tiny_model_dir, **REFERENCE)
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "train", str(encoded), str(killed), *cli_flags(config)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600  # start-up alone can take minutes on a loaded machine
    while not list_checkpoints(killed / "training" / "checkpoints") and time.time() < deadline:
        assert process.poll() is None, "`t2i train` exited before writing a checkpoint"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "model_index.json").exists(), "the run finished before it could be killed"
    assert list_checkpoints(killed / "training" / "checkpoints"), (
        "no checkpoint was written before the kill"
    )

    resumed = run_train(str(encoded), str(killed), config.model_copy(update={"resume": "latest"}))
    expected, got = transformer_weights(reference), transformer_weights(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    final = Path("training") / "checkpoints" / "step-00000012" / "model.safetensors"
    raw_expected, raw_got = load_file(reference / final), load_file(resumed / final)
    assert all(torch.equal(raw_expected[k], raw_got[k]) for k in raw_expected)


class PoisonedSet:
    """The stand-in set with one sample's latents replaced by NaN (a corrupted encoding)."""

    def __init__(self, reader, poisoned: int):
        self.reader, self.poisoned = reader, poisoned
        self.ids = reader.ids

    def __len__(self):
        return len(self.reader)

    def __getattr__(self, name):
        return getattr(self.reader, name)

    def sample(self, i, variant="original"):
        item = self.reader.sample(i, variant)
        if i == self.poisoned:
            item = {**item, "latents": torch.full_like(item["latents"], float("nan"))}
        return item


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(
    tmp_path, shapes, tiny_model_dir
):
    config = quick(tiny_model_dir, max_steps=20, checkpoint_every=1)
    train_idx, _ = heldout_split(
        shapes.ids, config.val_fraction, config.val_max_samples, config.seed
    )
    plan = BatchPlan.for_reader(shapes, train_idx, config.batch_size, config.seed)
    poisoned = plan.micro_batch(2)[0]  # first seen at step 3
    with pytest.raises(NonFiniteLossError, match="step 3") as error:
        train(PoisonedSet(shapes, poisoned), tmp_path / "run", config)
    saved = list_checkpoints(tmp_path / "run" / "training" / "checkpoints")
    assert [p.name for p in saved] == ["step-00000001", "step-00000002"]
    assert str(saved[-1]) in str(error.value)
    assert not (tmp_path / "run" / "model_index.json").exists()


def test_a_fresh_run_refuses_to_overwrite_an_earlier_runs_checkpoints(
    tmp_path, shapes, tiny_model_dir
):
    config = quick(
        tiny_model_dir, max_steps=2, checkpoint_every=1, val_fraction=0.0, sample_count=0
    )
    train(shapes, tmp_path / "run", config)
    with pytest.raises(FileExistsError, match="--resume latest"):
        train(shapes, tmp_path / "run", config)


def test_the_batch_plan_visits_every_training_sample_once_per_epoch_within_one_bucket():
    buckets = [(8, 8)] * 7 + [(8, 12)] * 5
    plan = BatchPlan(buckets, list(range(12)), batch_size=3, seed=1)
    assert plan.batches_per_epoch == 3 + 2
    for epoch in range(3):
        batches = [
            plan.micro_batch(epoch * plan.batches_per_epoch + k)
            for k in range(plan.batches_per_epoch)
        ]
        assert sorted(i for b in batches for i in b) == list(range(12))
        assert all(len({buckets[i] for i in b}) == 1 for b in batches)
    again = BatchPlan(buckets, list(range(12)), batch_size=3, seed=1)
    assert [again.micro_batch(j) for j in (7, 0, 12)] == [plan.micro_batch(j) for j in (7, 0, 12)]
    assert plan.epoch_batches(0) != plan.epoch_batches(1)


def test_the_validation_split_depends_on_ids_not_on_their_order():
    ids = [f"{k:064x}" for k in range(40)]
    train_idx, val_idx = heldout_split(ids, 0.1, 256)
    assert len(val_idx) == 4 and sorted(train_idx + val_idx) == list(range(40))
    _, val_reversed = heldout_split(ids[::-1], 0.1, 256)
    assert {ids[i] for i in val_idx} == {ids[::-1][i] for i in val_reversed}
    assert len(heldout_split(ids, 0.5, 3)[1]) == 3


def test_the_ema_warms_up_then_averages_with_the_configured_decay():
    module = torch.nn.Linear(2, 1, bias=False)
    ema = EMA(module, decay=0.5)
    with torch.no_grad():
        module.weight.fill_(1.0)
    start = ema.shadow["weight"].clone()
    ema.update(module)  # first update: decay min(0.5, 1/10) = 0.1
    assert torch.allclose(ema.shadow["weight"], 0.1 * start + 0.9)
    for _ in range(50):
        ema.update(module)
    assert ema.current_decay() == 0.5
    assert torch.allclose(ema.shadow["weight"], torch.ones(1, 2), atol=1e-6)


def test_training_refuses_an_encoded_set_made_for_other_encoders(tmp_path, shapes, tiny_model_dir):
    config = quick(tiny_model_dir, preset="tiny-d4")
    mismatched = PoisonedSet(shapes, -1)
    original_sample = shapes.sample

    def narrow(i, variant="original"):
        item = original_sample(i, variant)
        text = item["text"]
        return {**item, "text": type(text)(**{**vars(text), "t5": text.t5[..., :64]})}

    mismatched.sample = narrow
    with pytest.raises(ValueError, match="T5 width 64 != joint_attention_dim 96"):
        train(mismatched, tmp_path / "run", config)
