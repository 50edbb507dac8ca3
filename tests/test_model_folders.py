"""SD3 model folders as users have them: fp16 variants, T5-less folders, Stability single files.

Each kind is made from the tiny kit (tests/model_folders.py) and run through the commands that
load a model; every load failure is one line that names the folder and what was expected.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from model_folders import fp16_folder, stability_file, t5_less_folder
from PIL import Image
from train_sets import write_store

from curate.runtime.store import Manifest
from dpo.config import DPOConfig
from dpo.trainer import run_dpo
from flows.cli import main as cli_main
from model.build import build_transformer
from model.conditioning import TextEncoding, joint_condition
from model.config import PrecomputeConfig, TrainConfig
from model.encoded import EncodedDataset
from model.encoders import encode_texts
from model.folders import load_pipeline, load_transformer
from model.precompute import run_precompute
from model.train import run_train
from model.train_model import build_or_load_transformer

CAPTIONS = ["a red square", "a blue circle", "a green triangle", "a white cross"]


@dataclass
class Result:
    returncode: int
    stderr: str


@pytest.fixture
def t2i(capfd):
    """`t2i ARGS...` in this process (the CLI's own main): its exit code and what it printed."""

    def run(*args: str) -> Result:
        capfd.readouterr()
        code = cli_main(list(args))
        return Result(code, capfd.readouterr().err)

    return run


def one_line_error(result: Result, *needles: str) -> str:
    """The command failed with exactly one `t2i ...: error:` line holding every needle."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, result.stderr
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def kinds(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    tiny = Path(tiny_model_dir)
    fp16 = fp16_folder(tiny, root / "fp16")
    t5_less = t5_less_folder(tiny, root / "t5-less")
    both = fp16_folder(t5_less, root / "t5-less-fp16")
    transformer = SD3Transformer2DModel.from_pretrained(tiny, subfolder="transformer")
    single = stability_file(transformer, root / "sd3_tiny.safetensors")
    return {"tiny": tiny, "fp16": fp16, "t5_less": t5_less, "t5_less_fp16": both, "single": single}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in CAPTIONS]
    synthetic = [f"{c} on a plain background" for c in CAPTIONS]
    return write_store(tmp_path_factory.mktemp("store") / "store", images, CAPTIONS, synthetic)


def precompute(store: Path, model: Path, out: Path, **options) -> Path:
    config = PrecomputeConfig(model=str(model), resolution=32, t5_length=16, **options)
    return run_precompute(store, out, config)


def train(encoded: Path, model: Path, out: Path, **options) -> Path:
    config = TrainConfig(
        model=str(model),
        device="cpu",
        batch_size=2,
        max_steps=2,
        warmup_steps=1,
        val_fraction=0.0,
        val_every=0,
        sample_every=0,
        sample_count=0,
        checkpoint_every=0,
        **options,
    )
    return run_train(encoded, out, config)


def sample_pixels(t2i, model: Path, out: Path, *flags: str) -> np.ndarray:
    result = t2i(
        "sample",
        "--model",
        str(model),
        "--prompt",
        "a red square",
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--out",
        str(out),
        *flags,
    )
    assert result.returncode == 0, result.stderr
    (png,) = sorted(out.glob("*.png"))
    return np.asarray(Image.open(png))


# --- fp16 variant folders ------------------------------------------------------------------


def test_an_fp16_folder_needs_variant_and_then_runs_every_command(kinds, store, tmp_path, t2i):
    fp16 = kinds["fp16"]
    weights = sorted(p.name for p in (fp16 / "transformer").iterdir() if "safetensors" in p.name)
    assert weights == ["diffusion_pytorch_model.fp16.safetensors"]
    one_line_error(
        t2i("sample", "--model", str(fp16), "--prompt", "x"), str(fp16), "--variant fp16"
    )
    one_line_error(
        t2i(
            "precompute", str(store), str(tmp_path / "e"), "--model", str(fp16), "--variant", "bf16"
        ),
        str(fp16),
        "no bf16 weights",
    )

    encoded = precompute(store, fp16, tmp_path / "encoded", variant="fp16")
    full = EncodedDataset(precompute(store, kinds["tiny"], tmp_path / "encoded-fp32"))
    half = EncodedDataset(encoded)
    # the same model rounded to fp16: the same encodings to fp16 precision
    a, b = (
        full.sample(0)["text"].to(dtype=torch.float32),
        half.sample(0)["text"].to(dtype=torch.float32),
    )
    torch.testing.assert_close(joint_condition(b)[0], joint_condition(a)[0], atol=2e-2, rtol=2e-2)

    trained = train(encoded, fp16, tmp_path / "trained", variant="fp16")
    # the export holds plain weight files only, so it loads without --variant
    assert not list(trained.rglob("*.fp16.*"))
    assert sample_pixels(t2i, trained, tmp_path / "s").shape == (32, 32, 3)
    assert sample_pixels(t2i, fp16, tmp_path / "s16", "--variant", "fp16").shape == (32, 32, 3)


# --- T5-less folders -----------------------------------------------------------------------


def test_a_t5_less_folder_encodes_zeros_for_t5_exactly_as_the_pipeline(kinds, store, tmp_path):
    t5_less = kinds["t5_less"]
    assert json.loads((t5_less / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    encoded = precompute(store, t5_less, tmp_path / "encoded")
    info = Manifest.read(encoded).extra["info"]
    assert info["t5_encoder"].startswith("absent") and info["t5"] == 96  # joint_attention_dim
    ds = EncodedDataset(encoded)
    text = ds.sample(1)["text"].to(dtype=torch.float32)
    assert text.t5.shape == (16, 96) and not text.t5.any() and not text.t5_mask.any()
    # CLIP parts equal the full folder's; the joint condition equals the stock pipeline's
    full = encode_texts(kinds["tiny"], [CAPTIONS[1]], t5_length=16, progress=False)
    torch.testing.assert_close(text.clip_g, full.clip_g[0], atol=2e-3, rtol=2e-3)
    pipe = load_pipeline(t5_less)
    assert pipe.text_encoder_3 is None
    for caption, encoding in ((CAPTIONS[1], text), ("", ds.empty_text().to(dtype=torch.float32))):
        want, _, want_pooled, _ = pipe.encode_prompt(
            caption, None, None, do_classifier_free_guidance=False, max_sequence_length=16
        )
        got, got_pooled = joint_condition(TextEncoding.stack([encoding]))
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(got_pooled, want_pooled, atol=2e-3, rtol=2e-3)


def test_a_t5_less_folder_trains_and_samples(kinds, store, tmp_path, t2i):
    t5_less = kinds["t5_less"]
    encoded = precompute(store, t5_less, tmp_path / "encoded")
    trained = train(encoded, t5_less, tmp_path / "trained")
    assert json.loads((trained / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    fresh = train(encoded, t5_less, tmp_path / "fresh", preset="tiny")  # widths from the folder
    for model in (t5_less, trained, fresh):
        # never OUT = the model folder: the output guard refuses writing over what is read
        assert sample_pixels(t2i, model, tmp_path / f"samples-{model.name}").std() > 0


def test_dpo_runs_on_a_t5_less_fp16_folder(kinds, demo_folder, tmp_path, t2i):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("astronaut.jpg", "coffee.jpg", "chelsea.jpg"):
        shutil.copy(demo_folder / name, source / name)
    pairs = tmp_path / "pairs"
    assert t2i("make-prefs", str(pairs), "--source", str(source)).returncode == 0
    model = kinds["t5_less_fp16"]
    config = DPOConfig(
        model=str(model),
        variant="fp16",
        lora_rank=2,
        lora_alpha=2,
        batch_size=2,
        max_steps=2,
        resolution=32,
        heldout_fraction=0.0,
        log_every=1,
    )
    out = run_dpo(pairs, tmp_path / "lora", config)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    one_line_error(
        t2i("dpo", str(pairs), str(tmp_path / "no"), "--model", str(model), "--max-steps", "1"),
        str(model),
        "--variant fp16",
    )


# --- Stability single-file transformers ----------------------------------------------------


@pytest.mark.parametrize("dual_attention", [(), (0,)], ids=["sd3", "sd3.5-dual-attention"])
def test_a_stability_single_file_loads_through_diffusers_to_the_same_weights(
    kinds, tmp_path, dual_attention
):
    folder = tmp_path / "config-folder"
    shutil.copytree(kinds["tiny"], folder)
    config = {
        k: v
        for k, v in json.loads((folder / "transformer" / "config.json").read_text()).items()
        if not k.startswith("_")
    }
    torch.manual_seed(1)
    original = build_transformer({**config, "dual_attention_layers": dual_attention})
    original.save_pretrained(folder / "transformer")
    # an all-in-one file also holds the VAE (first_stage_model.*): the transformer load skips it
    extra = {"first_stage_model.encoder.conv_in.weight": torch.ones(4, 3, 3, 3)}
    file = stability_file(original, tmp_path / "sd3_file.safetensors", extra)
    loaded = load_transformer(folder, transformer_file=file)
    want, got = original.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_single_file_transformer_samples_and_trains_like_the_folder(kinds, store, tmp_path, t2i):
    tiny, single = kinds["tiny"], kinds["single"]
    from_folder = sample_pixels(t2i, tiny, tmp_path / "folder")
    from_file = sample_pixels(t2i, tiny, tmp_path / "file", "--transformer-file", str(single))
    assert np.array_equal(from_folder, from_file)
    config = TrainConfig(model=str(tiny), transformer_file=str(single))
    reference = SD3Transformer2DModel.from_pretrained(tiny, subfolder="transformer").state_dict()
    started = build_or_load_transformer(config).state_dict()
    assert all(torch.equal(reference[k], started[k]) for k in reference)


def test_single_files_that_do_not_fit_are_one_line_errors(kinds, tmp_path, t2i):
    tiny = kinds["tiny"]
    diffusers_file = tiny / "transformer" / "diffusion_pytorch_model.safetensors"
    one_line_error(
        t2i(
            "sample",
            "--model",
            str(tiny),
            "--prompt",
            "x",
            "--transformer-file",
            str(diffusers_file),
        ),
        str(diffusers_file),
        "not a Stability SD3/SD3.5 checkpoint",
    )
    config = {
        k: v
        for k, v in json.loads((tiny / "transformer" / "config.json").read_text()).items()
        if not k.startswith("_")
    }
    bigger = stability_file(
        build_transformer({**config, "num_layers": 3}), tmp_path / "big.safetensors"
    )
    one_line_error(
        t2i("sample", "--model", str(tiny), "--prompt", "x", "--transformer-file", str(bigger)),
        str(bigger),
        "does not fit",
    )


# --- broken folders ------------------------------------------------------------------------


def test_broken_folders_are_one_line_errors_naming_the_folder_and_the_need(kinds, tmp_path, t2i):
    no_vae = tmp_path / "no-vae"
    shutil.copytree(kinds["tiny"], no_vae)
    shutil.rmtree(no_vae / "vae")
    one_line_error(
        t2i("sample", "--model", str(no_vae), "--prompt", "x"), str(no_vae / "vae"), "missing"
    )

    other = tmp_path / "sdxl"
    shutil.copytree(kinds["tiny"], other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(
        json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"})
    )
    (tmp_path / "in").mkdir()  # apart from OUT: the output guard refuses an OUT inside a read
    one_line_error(
        t2i("precompute", str(tmp_path / "in"), str(tmp_path / "e"), "--model", str(other)),
        str(other),
        "StableDiffusionXLPipeline",
        "expected an SD3/SD3.5 folder",
    )

    no_weights = tmp_path / "no-weights"
    shutil.copytree(kinds["tiny"], no_weights)
    (no_weights / "text_encoder" / "model.safetensors").unlink()
    one_line_error(
        t2i("sample", "--model", str(no_weights), "--prompt", "x"),
        str(no_weights / "text_encoder"),
        "no weights",
    )
