"""`t2i make-prefs` + `t2i dpo` on demo-derived pairs: outputs, metrics, resume, and diffusers loading."""

import json
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file

from curate import reasons
from curate.store import Manifest, load_rejected
from dpo.config import DPOConfig
from dpo.trainer import NonFiniteLoss, run_dpo
from flows.cli import main as t2i

FAST = ["--rank", "4", "--alpha", "8", "--batch", "2", "--beta", "1000", "--lr", "1e-3"]
FAST += ["--log-every", "2", "--heldout-fraction", "0.3"]


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
    argv = ["dpo", str(pairs), str(out), "--model", tiny_model_dir, "--steps", "4", *FAST]
    assert t2i(argv) == 0
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
    }
    summary = json.loads((dpo_out / "summary.json").read_text())
    assert summary["heldout_pairs"] > 0 and 0.0 <= summary["heldout_implicit_acc"] <= 1.0
    manifest = Manifest.read(dpo_out)
    assert manifest.stage == "dpo" and manifest.parameters["rank"] == 4
    assert [r["reason"] for r in load_rejected(dpo_out)] == [reasons.IDENTICAL_PAIR]


def test_an_interrupted_run_resumes_to_exactly_the_uninterrupted_result(
    pairs, tiny_model_dir, dpo_out, tmp_path
):
    out = tmp_path / "lora"
    assert t2i(["dpo", str(pairs), str(out), "--model", tiny_model_dir, "--steps", "2", *FAST]) == 0
    assert t2i(["dpo", str(pairs), str(out), "--model", tiny_model_dir, "--steps", "4", *FAST]) == 0
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 2
    resumed = load_file(str(out / "pytorch_lora_weights.safetensors"))
    straight = load_file(str(dpo_out / "pytorch_lora_weights.safetensors"))
    assert all((resumed[k] == straight[k]).all() for k in straight)
    assert (out / "metrics.jsonl").read_text() == (dpo_out / "metrics.jsonl").read_text()


def test_a_non_finite_loss_stops_cleanly_without_writing_an_output(pairs, tiny_model_dir, tmp_path):
    config = DPOConfig(model=tiny_model_dir, rank=4, alpha=4, batch=2, steps=3, beta=float("inf"))
    with pytest.raises(NonFiniteLoss, match="at step 1 .*lower --lr or --beta"):
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
