"""`t2i make-prefs` + `t2i dpo` on demo-derived pairs: outputs, metrics, resume, and diffusers loading."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from curate.runtime import reasons
from curate.runtime.store import Manifest, load_rejected
from dpo.config import DPOConfig, IngestPrefsConfig
from dpo.trainer import run_dpo
from flows.cli import main as t2i
from model.toolbox import NonFiniteLossError

FAST = [
    "--lora-rank",
    "4",
    "--lora-alpha",
    "8",
    "--batch-size",
    "2",
    "--beta",
    "1000",
    "--lr",
    "1e-3",
]
FAST += ["--log-every", "2", "--heldout-fraction", "0.3", "--eval-seeds", "2", "--eval-steps", "4"]


@pytest.fixture(scope="module")
def pairs(demo_folder, tmp_path_factory):
    """Warm-tinted crop beats blue-tinted crop, for six demo images (two crops each) and one broken file."""
    source = tmp_path_factory.mktemp("source")
    for name in (
        "astronaut.jpg",
        "coffee.jpg",
        "chelsea.jpg",
        "china.jpg",
        "flower.jpg",
        "hopper.jpg",
        "bomb.png",
    ):
        for file in (demo_folder / name, (demo_folder / name).with_suffix(".txt")):
            (source / file.name).write_bytes(file.read_bytes())
    out = tmp_path_factory.mktemp("pairs") / "pairs"
    argv = [
        "make-prefs",
        str(out),
        "--source",
        str(source),
        "--strength",
        "0.4",
        "--pairs-per-image",
        "2",
    ]
    assert t2i(argv) == 0
    assert json.loads((out / "PAIRS.json").read_text())["skipped_sources"] == ["bomb.png"]
    # one planted tie-like pair: the same image on both sides must be rejected, not trained on
    (out / "zz-identical").mkdir()
    for role in ("winner", "loser"):
        (out / "zz-identical" / f"{role}.png").write_bytes(
            (out / "astronaut-00" / "winner.png").read_bytes()
        )
    (out / "zz-identical" / "caption.txt").write_text("same\n")
    return out


@pytest.fixture(scope="module")
def dpo_out(pairs, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "lora"
    argv = ["dpo", str(pairs), str(out), "--model", tiny_model_dir, "--max-steps", "4", *FAST]
    argv += ["--offtarget-captions", "a cold blue lake", "a grey stone"]
    assert t2i([*argv, "--scorer", "attribute:warm"]) == 0
    return out


def test_dpo_writes_a_diffusers_lora_metrics_and_a_held_out_accuracy(dpo_out):
    weights = load_file(str(dpo_out / "pytorch_lora_weights.safetensors"))
    assert weights and all(k.startswith("transformer.transformer_blocks.") for k in weights)
    assert {w.shape[0] for k, w in weights.items() if "lora_A" in k} == {4}
    rows = [json.loads(line) for line in (dpo_out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert set(rows[0]) >= {
        "loss",
        "implicit_acc",
        "reward_margin",
        "err_w",
        "err_l",
        "ref_err_w",
        "ref_err_l",
        "winner_drift",
        "saturated_frac",
    }
    summary = json.loads((dpo_out / "summary.json").read_text())
    # 12 pairs, warm crop beats cool crop: the LoRA ranks pairs it never trained on as labelled
    # (the reference itself scores 0: its margin is exactly 0)
    assert summary["heldout_pairs"] > 0 and summary["train_pairs"] + summary["heldout_pairs"] == 12
    assert summary["heldout_implicit_acc"] >= 0.75 and summary["train_implicit_acc"] >= 0.75
    assert set(summary["guard"]) >= {"winner_drift", "saturated_frac", "warning"}
    manifest = Manifest.read(dpo_out)
    assert manifest.stage == "dpo" and manifest.parameters["lora_rank"] == 4
    assert [r["reason"] for r in load_rejected(dpo_out)] == [reasons.IDENTICAL_PAIR]
    # checkpoints (model/checkpoint.py) hold the LoRA and the optimizer, never the frozen base
    (step,) = (dpo_out.parent / f".{dpo_out.name}.work").glob("*/checkpoints/step-*")
    lora = load_file(str(step / "lora.safetensors"))
    assert lora and all("lora_" in k for k in lora) and not (step / "model.safetensors").exists()


def test_the_report_shows_base_vs_lora_samples_and_the_scorers_win_rate(dpo_out):
    from PIL import Image

    from dpo.synthetic import attribute_score

    summary = json.loads((dpo_out / "summary.json").read_text())
    evaluation = summary["sample_eval"]
    assert evaluation["seeds"] == [0, 1] and evaluation["scorer"] == "attribute:warm"
    assert evaluation["captions"][-2:] == ["a cold blue lake", "a grey stone"]
    assert evaluation["roles"][-2:] == ["off-target"] * 2
    assert 1 <= evaluation["roles"].count("preference") <= 4
    assert len(evaluation["grids"]) == len(evaluation["captions"])
    grid = Image.open(dpo_out / evaluation["grids"][0])
    assert grid.size == (64 * 2 + 4, 64 * 2 + 4)  # base left, LoRA right, one row per seed
    left, right = grid.crop((0, 0, 64, 64)), grid.crop((68, 0, 132, 64))  # seed 0
    assert evaluation["base_scores"][0][0] == pytest.approx(attribute_score(left, "warm"), abs=1e-6)
    assert evaluation["lora_scores"][0][0] == pytest.approx(
        attribute_score(right, "warm"), abs=1e-6
    )
    pairs = [  # the win rate is the preference captions'
        (b, a)
        for bs, ls, role in zip(
            evaluation["base_scores"], evaluation["lora_scores"], evaluation["roles"]
        )
        if role == "preference"
        for b, a in zip(bs, ls)
    ]
    expected = sum(1.0 if a > b else 0.5 if a == b else 0.0 for b, a in pairs) / len(pairs)
    assert summary["sample_win_rate"] == pytest.approx(expected)
    report = (dpo_out / "report.md").read_text()
    assert report.index("Win rate of the LoRA over the base") < report.index("implicit accuracy")
    assert f"({evaluation['grids'][0]})" in report
    from flows.artifacts import stage_markdown  # what the Prefect UI shows for the stage

    shown = stage_markdown("dpo", dpo_out, Manifest.read(dpo_out), None)
    assert "Win rate of the LoRA over the base" in shown
    assert f"({evaluation['grids'][0]})" not in shown and "](data:image/jpeg;base64," in shown


def test_each_off_target_caption_is_reported_on_its_own_and_the_worst_one_named(dpo_out):
    summary = json.loads((dpo_out / "summary.json").read_text())
    evaluation = summary["sample_eval"]
    changes = {}
    for caption, b, a in zip(
        evaluation["captions"][-2:], evaluation["base_scores"][-2:], evaluation["lora_scores"][-2:]
    ):
        changes[caption] = sum(a) / len(a) - sum(b) / len(b)
    worst = min(changes, key=changes.get)
    assert summary["worst_off_target"]["caption"] == worst
    assert summary["worst_off_target"]["change"] == pytest.approx(changes[worst])
    report = (dpo_out / "report.md").read_text()
    assert f"**Worst off-target caption: {worst}," in report
    assert f"| {worst} **(worst off-target)** | off-target |" in report
    from flows.artifacts import stage_markdown

    assert "Worst off-target caption" in stage_markdown(
        "dpo", dpo_out, Manifest.read(dpo_out), None
    )


def test_an_off_target_caption_from_the_preference_set_is_a_one_line_error(
    pairs, tiny_model_dir, tmp_path, capsys
):
    caption = (pairs / "astronaut-00" / "caption.txt").read_text().strip()
    argv = ["dpo", str(pairs), str(tmp_path / "out"), "--model", tiny_model_dir, *FAST]
    assert t2i([*argv, "--max-steps", "1", "--offtarget-captions", caption]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a caption of the preference set" in err[0]
    assert not (tmp_path / "out").exists()


def test_an_interrupted_run_resumes_exactly_even_past_a_torn_metrics_line(
    pairs, tiny_model_dir, dpo_out, tmp_path
):
    out = tmp_path / "lora"
    assert (
        t2i(["dpo", str(pairs), str(out), "--model", tiny_model_dir, "--max-steps", "2", *FAST])
        == 0
    )
    # a kill mid-write leaves a torn last line in the run's metrics: resume must not trip on it
    (metrics,) = (tmp_path / ".lora.work").glob("*/metrics.jsonl")
    with metrics.open("a") as handle:
        handle.write('{"step": 3, "loss": 0.6')
    assert (
        t2i(["dpo", str(pairs), str(out), "--model", tiny_model_dir, "--max-steps", "4", *FAST])
        == 0
    )
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 2
    resumed = load_file(str(out / "pytorch_lora_weights.safetensors"))
    straight = load_file(str(dpo_out / "pytorch_lora_weights.safetensors"))
    assert all((resumed[k] == straight[k]).all() for k in straight)
    assert (out / "metrics.jsonl").read_text() == (dpo_out / "metrics.jsonl").read_text()


def test_a_non_finite_loss_stops_cleanly_without_writing_an_output(pairs, tiny_model_dir, tmp_path):
    config = DPOConfig(
        model=tiny_model_dir,
        lora_rank=4,
        lora_alpha=4,
        batch_size=2,
        max_steps=3,
        beta=float("inf"),
    )
    with pytest.raises(NonFiniteLossError, match="at step 1 .*lower --lr or --beta"):
        run_dpo(pairs, tmp_path / "lora", config)
    assert not (tmp_path / "lora").exists()


def test_the_lora_loads_through_stock_diffusers_in_a_fresh_process_and_changes_samples(
    dpo_out, tiny_model_dir
):
    script = textwrap.dedent(f"""
        import numpy as np, torch
        from diffusers import StableDiffusion3Pipeline
        def images(pipe):
            out = pipe("a red cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
            return out.images[0]
        pipe = StableDiffusion3Pipeline.from_pretrained({tiny_model_dir!r})
        pipe.set_progress_bar_config(disable=True)
        base = images(pipe)
        pipe.load_lora_weights({str(dpo_out)!r})
        print("max pixel change", float(np.abs(images(pipe) - base).max()))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    change = float(result.stdout.split("max pixel change")[-1])
    assert change > 0


def _lora_model_and_batch(model_dir, dtype=torch.float32):
    """The tiny transformer with a rank-4 LoRA, and two random pairs with real caption encodings."""
    from dpo.encode import EncodedPairs
    from dpo.lora import add_lora
    from dpo.trainer import load_transformer
    from model.encoders import encode_texts, read_config

    transformer = load_transformer(model_dir, "cpu", dtype)
    add_lora(transformer, 4, 4.0, ["attn.to_q", "attn.to_v", "ff.net.2"], seed=0)
    cfg = read_config(model_dir, "transformer")
    generator = torch.Generator().manual_seed(0)
    shape = (2, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
    text = encode_texts(model_dir, ["a red cat", "a blue dog"], t5_length=8, progress=False)
    pairs = EncodedPairs(
        ["a", "b"],
        torch.randn(shape, generator=generator),
        torch.randn(shape, generator=generator),
        text,
    )
    t, noise = torch.tensor([0.3, 0.7]), torch.randn(shape, generator=generator)
    for (
        name,
        parameter,
    ) in transformer.named_parameters():  # a trained-looking adapter (peft's B = 0)
        if "lora_B" in name:
            parameter.data = 0.1 * torch.randn(parameter.shape, generator=generator)
    return transformer, pairs, t, noise


def _loss_and_grads(transformer, pairs, t, noise):
    from dpo.lora import lora_parameters
    from dpo.trainer import dpo_terms

    terms = dpo_terms(transformer, pairs, t, noise, DPOConfig(model="-", beta=1000.0))
    terms.loss.backward()
    return terms, [p.grad.clone() for p in lora_parameters(transformer)]


def test_gradient_checkpointing_gives_the_same_dpo_loss_and_lora_gradients(tiny_model_dir):
    plain = _loss_and_grads(*_lora_model_and_batch(tiny_model_dir))
    transformer, *batch = _lora_model_and_batch(tiny_model_dir)
    transformer.enable_gradient_checkpointing()
    transformer.train()
    checkpointed = _loss_and_grads(transformer, *batch)
    assert transformer.gradient_checkpointing
    assert torch.allclose(plain[0].loss, checkpointed[0].loss, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in plain[1])
    assert all(
        torch.allclose(a, b, atol=1e-6) for a, b in zip(plain[1], checkpointed[1], strict=True)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_frozen_base_keeps_an_fp32_lora_that_trains(tiny_model_dir, dtype):
    from dpo.lora import lora_parameters

    reference = _loss_and_grads(*_lora_model_and_batch(tiny_model_dir))[0]
    transformer, *batch = _lora_model_and_batch(tiny_model_dir, dtype)
    terms, grads = _loss_and_grads(transformer, *batch)
    frozen = {p.dtype for p in transformer.parameters() if not p.requires_grad}
    assert frozen == {dtype} and {p.dtype for p in lora_parameters(transformer)} == {torch.float32}
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # the base's rounding moves the errors by about its precision, not more
    for ours, fp32 in ((terms.err_w, reference.err_w), (terms.ref_l, reference.ref_l)):
        assert torch.allclose(ours.float(), fp32, rtol=0.03)


# --- pairs on disk in the pre-encoding shard format, streamed; --init-lora ---------------------


def test_pairs_are_encoded_once_in_the_precompute_format_and_read_back_pair_by_pair(
    pairs, dpo_out, tiny_model_dir
):
    from dpo.encode import EncodedPairSet
    from model.encoded import EncodedDataset

    (encoded,) = (dpo_out.parent / f".{dpo_out.name}.work").glob("encoded-*/")
    assert Manifest.read(encoded).stage == "precompute"  # `t2i precompute`'s own layout
    assert sorted(p.name.split(".")[1] for p in (encoded / "shards").glob("00000.*")) == [
        "clip_g",
        "clip_l",
        "t5",
        "vae",
    ]
    images = EncodedDataset(encoded)
    pair_set = EncodedPairSet(encoded)
    assert len(images) == 2 * len(pair_set) == 2 * Manifest.read(dpo_out).counts["pairs"]
    batch = pair_set.select([1, 0])
    winner = images.sample(images.ids.index(batch.ids[0] + ".w"))
    loser = images.sample(images.ids.index(batch.ids[0] + ".l"))
    assert torch.equal(batch.latents_w[0], winner["latents"].float())
    assert torch.equal(batch.latents_l[0], loser["latents"].float())
    assert torch.equal(batch.text.t5[0], winner["text"].t5.float())
    assert batch.latents_w.dtype == torch.float32 and batch.text.t5_mask.dtype == torch.bool
    assert not list(encoded.parent.glob("encoded-*-images"))  # the bytes' copy is gone once encoded


def test_a_killed_encode_continues_where_it_stopped(pairs, tiny_model_dir, tmp_path, monkeypatch):
    import model.precompute_shards
    from dpo.encode import encode_pairs
    from dpo.ingest import run_prefs

    table = run_prefs(pairs, tmp_path / "prefs", IngestPrefsConfig())
    real = model.precompute_shards.Encoder

    def dies_at_t5(model_dir, name, **kwargs):
        if name == "t5":
            raise KeyboardInterrupt("killed while T5 loads")
        return real(model_dir, name, **kwargs)

    monkeypatch.setattr(model.precompute_shards, "Encoder", dies_at_t5)
    with pytest.raises(KeyboardInterrupt):
        encode_pairs(tiny_model_dir, table, tmp_path / "encoded", 32, 8, shard_size=4)
    assert not (tmp_path / "encoded").exists()
    monkeypatch.setattr(model.precompute_shards, "Encoder", real)
    pair_set = encode_pairs(tiny_model_dir, table, tmp_path / "encoded", 32, 8, shard_size=4)
    timings = Manifest.read(tmp_path / "encoded").extra["timings_s"]
    assert set(timings) == {"t5"}  # VAE and both CLIPs were kept from the killed run
    assert len(pair_set) == Manifest.read(table).counts["kept"]


@pytest.fixture(scope="module")
def old_lora(tiny_model_dir, tmp_path_factory):
    """(transformer with a trained-looking rank-4 alpha-8 LoRA, its diffusers folder, a kohya copy)."""
    from lora_kit import random_trained_lora

    root = tmp_path_factory.mktemp("old-lora")
    trained, folder = random_trained_lora(tiny_model_dir, root / "diffusers", 4, 8.0, 0.05, 1)
    kohya = root / "kohya.safetensors"
    assert (
        t2i(["lora-convert", str(folder), str(kohya), "--to", "kohya", "--save-dtype", "fp32"]) == 0
    )
    return trained, folder, kohya


@pytest.mark.parametrize("style", ["diffusers", "kohya"])
def test_init_lora_starts_where_the_old_lora_is_in_either_key_style(
    tiny_model_dir, old_lora, style
):
    from dpo.init_lora import add_init_lora
    from dpo.trainer import load_transformer

    trained, folder, kohya = old_lora
    fresh = load_transformer(tiny_model_dir, "cpu", torch.float32)
    config = add_init_lora(fresh, folder if style == "diffusers" else kohya, tiny_model_dir)
    assert config.r == 4
    generator = torch.Generator().manual_seed(0)
    cfg = fresh.config
    x = {
        "hidden_states": torch.randn(
            1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=generator
        ),
        "encoder_hidden_states": torch.randn(1, 9, cfg.joint_attention_dim, generator=generator),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([500.0]),
    }
    with torch.no_grad():
        assert torch.allclose(fresh(**x).sample, trained(**x).sample, atol=1e-5)
        fresh.disable_adapters()
        assert not torch.allclose(fresh(**x).sample, trained(**x).sample, atol=1e-3)


def test_dpo_init_lora_trains_on_from_the_old_adapter(pairs, tiny_model_dir, old_lora, tmp_path):
    _, folder, _ = old_lora
    out = tmp_path / "continued"
    argv = ["dpo", str(pairs), str(out), "--model", tiny_model_dir, "--max-steps", "2", *FAST]
    assert t2i([*argv, "--init-lora", str(folder), "--save-dtype", "fp32"]) == 0
    weights = load_file(str(out / "pytorch_lora_weights.safetensors"))
    old = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    assert weights.keys() == old.keys()  # the old adapter's layers, not --lora-targets
    assert {w.shape[0] for k, w in weights.items() if "lora_A" in k} == {
        4
    }  # its rank, not --lora-rank
    assert json.loads((out / "summary.json").read_text())["init_lora"] == str(folder)
    assert any(not torch.equal(weights[k], old[k].float()) for k in old)  # and it trained on


def test_an_init_lora_that_is_no_lora_is_a_one_line_error_before_any_work(
    pairs, tiny_model_dir, tmp_path, capsys
):
    from safetensors.torch import save_file

    odd = tmp_path / "odd.safetensors"
    save_file({"some.other.weight": torch.zeros(4, 8)}, str(odd))
    argv = ["dpo", str(pairs), str(tmp_path / "out"), "--model", tiny_model_dir, "--max-steps", "1"]
    assert t2i([*argv, *FAST, "--init-lora", str(odd)]) == 1
    assert "holds no SD3 transformer LoRA" in capsys.readouterr().err
    assert not (tmp_path / ".out.work").exists()


def test_two_processes_train_the_same_lora_as_one_process_with_their_global_batch(
    pairs, tiny_model_dir, tmp_path
):
    """DDP over gloo on the CPU (torchrun; accelerate reads its environment): 2 processes x 2 pairs
    draw the same global batch as 1 process x 4 pairs, and averaged gradients give the same LoRA."""
    import os
    import shutil

    common = [
        str(pairs),
        "--model",
        tiny_model_dir,
        "--max-steps",
        "3",
        "--lora-rank",
        "4",
        "--lora-alpha",
        "4",
        "--beta",
        "1000",
        "--lr",
        "1e-3",
        "--heldout-fraction",
        "0",
        "--save-dtype",
        "fp32",
    ]
    assert t2i(["dpo", common[0], str(tmp_path / "one"), *common[1:], "--batch-size", "4"]) == 0
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    result = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "-m",
            "flows.cli",
            "dpo",
            common[0],
            str(tmp_path / "two"),
            *common[1:],
            "--batch-size",
            "2",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    one = load_file(str(tmp_path / "one" / "pytorch_lora_weights.safetensors"))
    two = load_file(str(tmp_path / "two" / "pytorch_lora_weights.safetensors"))
    assert one.keys() == two.keys()
    assert all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)
    assert (
        max((one[k] - two[k]).abs().max() for k in one)
        < 1e-5
        < max(one[k].abs().max() for k in one)
    )
