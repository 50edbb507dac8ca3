"""Conventions of `t2i train` pinned by tests: safe resume, caption variants, EMA validation,
the shift and T5 length of a continued model, and the memory-mapped batch path."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import pytest
import torch

from model.checkpoint import CheckpointError, list_checkpoints
from model.config import SampleConfig, TrainConfig
from model.sampling import trained_t5_length
from model.toolbox import heldout_split
from model.train import run_train, train
from model.train_data import BatchPlan, MappedShards, load_batch
from model.train_report import evaluate


def quick(model: str, **overrides) -> TrainConfig:
    base = dict(
        model=model,
        device="cpu",
        batch_size=4,
        max_steps=4,
        warmup_steps=2,
        lr=1e-3,
        log_every=2,
        val_every=0,
        sample_every=0,
        sample_count=0,
        checkpoint_every=0,
        val_fraction=0.2,
        ema_decay=0.9,
    )
    return TrainConfig(**{**base, **overrides})


# ----------------------------------------------------------------------------- safe resume

CANARY = Path("/tmp") / "t2i-train-planted-pickle-ran"


class Planted:
    """Unpickling this runs code: it creates CANARY."""

    def __reduce__(self):
        return (Path.touch, (CANARY,))


def plant(folder: Path) -> None:
    for name in (
        "optimizer.bin",
        "scheduler.bin",
        "custom_checkpoint_0.pkl",
        "random_states_0.pkl",
        "pytorch_model.bin",
    ):
        (folder / name).write_bytes(pickle.dumps(Planted()))


def test_resume_reads_only_safetensors_and_json_and_refuses_checkpoints_it_did_not_write(
    tmp_path, shapes, tiny_model_dir
):
    CANARY.unlink(missing_ok=True)
    config = quick(tiny_model_dir, checkpoint_every=2)
    out = tmp_path / "run"
    train(shapes, out, config)
    saved = list_checkpoints(out / "training" / "checkpoints")
    assert saved and {p.suffix for p in saved[-1].iterdir()} == {".safetensors", ".json"}

    # Pickles planted beside our files are never opened: resume works and nothing ran.
    plant(saved[-1])
    resumed = config.model_copy(update={"resume": str(saved[-1]), "max_steps": 6})
    train(shapes, out, resumed)
    assert not CANARY.exists()

    # A checkpoint in accelerate's pickle format (no trainer state of ours) is refused, unopened.
    foreign = tmp_path / "foreign" / "step-00000002"
    foreign.mkdir(parents=True)
    plant(foreign)
    (foreign / "trainer_state.json").write_text(json.dumps({"step": 2}))
    with pytest.raises(CheckpointError, match="not written by this trainer"):
        train(shapes, tmp_path / "other", config.model_copy(update={"resume": str(foreign)}))
    assert not CANARY.exists()


# ----------------------------------------------------------------------------- caption variants


def test_trainer_batches_hold_both_caption_variants_at_half_and_half(shapes):
    config = TrainConfig(model="-")
    train_idx, _ = heldout_split(shapes.ids, 0.0, 0, config.seed)
    plan = BatchPlan.for_reader(shapes, train_idx, 4, config.seed)
    counts = {"original": 0, "synthetic": 0}
    for j in range(300):
        batch = load_batch(shapes, plan.micro_batch(j), j, config.seed, config.synthetic_caption_p)
        for k, (i, variant) in enumerate(zip(plan.micro_batch(j), batch.variants, strict=True)):
            if shapes.has_synthetic(i):
                counts[variant] += 1
                # the batch carries that variant's encoding, not the other one's
                expected = shapes.sample(i, variant)["text"].t5.float()
                assert torch.equal(batch.text.t5[k], expected)
            else:
                assert variant == "original"
    n = sum(counts.values())
    share = counts["synthetic"] / n
    assert n > 500 and abs(share - 0.5) < 4 * (0.25 / n) ** 0.5, counts  # 4 sigma


def test_the_memory_mapped_batches_equal_sample_by_sample_batches(shapes):
    class Plain:  # the same set through the generic reader protocol
        ids = shapes.ids

        def __len__(self):
            return len(shapes)

        def __getattr__(self, name):
            return getattr(shapes, name)

    assert MappedShards.of(shapes) is not None and MappedShards.of(Plain()) is None
    for j, indices in enumerate(([3, 0, 7, 1], [5], list(range(len(shapes))))):
        fast, slow = load_batch(shapes, indices, j, 0, 0.5), load_batch(Plain(), indices, j, 0, 0.5)
        assert fast.ids == slow.ids and fast.variants == slow.variants
        assert torch.equal(fast.latents, slow.latents)
        for name, value in vars(fast.text).items():
            assert torch.equal(value, getattr(slow.text, name)), name


# ----------------------------------------------------------------------------- EMA validation


def logged_validation(text: str) -> tuple[str, float]:
    found = re.findall(r"validation loss \((EMA|raw) weights\) ([0-9.]+)", text)
    assert found, text
    return found[-1][0], float(found[-1][1])


@pytest.mark.parametrize("val_ema", [True, False])
def test_val_ema_validates_on_the_ema_weights(val_ema, tmp_path, shapes, tiny_model_dir, capsys):
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    config = quick(tiny_model_dir, max_steps=6, val_ema=val_ema, checkpoint_every=6, ema_decay=0.5)
    out = train(shapes, tmp_path / "run", config)
    kind, logged = logged_validation(capsys.readouterr().out)
    assert kind == ("EMA" if val_ema else "raw")
    _, val_idx = heldout_split(shapes.ids, config.val_fraction, config.val_max_samples, config.seed)
    ema_model = SD3Transformer2DModel.from_pretrained(out / "transformer").eval()  # EMA export
    raw_model = SD3Transformer2DModel.from_pretrained(out / "transformer").eval()
    raw_model.load_state_dict(
        load_file(out / "training" / "checkpoints" / "step-00000006" / "model.safetensors")
    )
    on_ema = evaluate(ema_model, shapes, val_idx, config, "cpu").mean().item()
    on_raw = evaluate(raw_model, shapes, val_idx, config, "cpu").mean().item()
    assert abs(on_ema - on_raw) > 1e-3  # the two weight sets are distinguishable here
    assert logged == pytest.approx(on_ema if val_ema else on_raw, abs=1e-4)


# ----------------------------------------------------------------------------- shift and T5 length


def test_continuing_a_pretrained_model_keeps_its_scheduler_shift_and_records_the_t5_length(
    tmp_path, encoded, shapes, tiny_model_dir
):
    base_scheduler = Path(tiny_model_dir) / "scheduler" / "scheduler_config.json"
    assert json.loads(base_scheduler.read_text())["shift"] == 3.0
    out = run_train(str(encoded), str(tmp_path / "continued"), quick(tiny_model_dir))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extra"]["shift"] == 3.0  # not sqrt(32^2 / 256^2) -> 1.0
    assert (out / "scheduler" / "scheduler_config.json").read_bytes() == base_scheduler.read_bytes()
    assert manifest["extra"]["t5_length"] == shapes.info["t5_length"] == 32
    assert trained_t5_length(out) == 32 and trained_t5_length(tiny_model_dir) is None

    fresh = run_train(str(encoded), str(tmp_path / "fresh"), quick(tiny_model_dir, preset="tiny"))
    assert json.loads((fresh / "manifest.json").read_text())["extra"]["shift"] == 1.0
    scheduler = json.loads((fresh / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["shift"] == 1.0


def test_sample_uses_the_t5_length_and_unconditional_input_the_model_was_trained_with(
    tmp_path, encoded, tiny_model_dir, monkeypatch
):
    import model.sampling as sampling

    out = run_train(str(encoded), str(tmp_path / "run"), quick(tiny_model_dir, max_steps=2))
    zeros = run_train(
        str(encoded),
        str(tmp_path / "zeros"),
        quick(tiny_model_dir, max_steps=2, unconditional="zeros"),
    )
    seen = []
    real = sampling.generate

    def spy(pipe, prompts, seeds, *options):
        seen.append(options[-2:])
        return real(pipe, prompts, seeds, *options)

    monkeypatch.setattr(sampling, "generate", spy)
    config = SampleConfig(
        model=str(out),
        prompt=["a red circle"],
        steps=1,
        height=32,
        width=32,
        out=str(tmp_path / "samples"),
    )
    sampling.run_sample(config.out, config)
    sampling.run_sample(config.out, config.model_copy(update={"t5_length": 20}))
    sampling.run_sample(config.out, config.model_copy(update={"model": tiny_model_dir}))
    sampling.run_sample(config.out, config.model_copy(update={"model": str(zeros)}))
    assert seen == [(32, False), (20, False), (256, False), (32, True)]
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1


def test_rerunning_the_original_command_after_a_resumed_run_finishes_skips_it(
    tmp_path, encoded, tiny_model_dir, capsys
):
    config = quick(tiny_model_dir, max_steps=2, checkpoint_every=1)
    out = tmp_path / "run"
    run_train(str(encoded), str(out), config.model_copy(update={"resume": "latest"}))
    capsys.readouterr()
    assert run_train(str(encoded), str(out), config) == out  # no FileExistsError
    assert "already finished" in capsys.readouterr().err
