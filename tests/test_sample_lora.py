"""`t2i sample --lora DIR --lora-scale S`: base and LoRA images for the same seeds, side by side."""

import numpy as np
import pytest
from bad_corpus import tree_hash
from lora_kit import random_trained_lora
from PIL import Image

from flows.cli import main as t2i


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory):
    return random_trained_lora(tiny_model_dir, tmp_path_factory.mktemp("lora"), 4, 4.0, 0.2, 0)[1]


def sample(model, out, *extra):
    argv = [
        "sample",
        "--model",
        model,
        "--prompt",
        "a red cat",
        "--seed",
        "0",
        "1",
        "--steps",
        "2",
        "--out",
        str(out),
    ]
    assert t2i([*argv, *extra]) == 0
    return out


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_lora_sampling_writes_base_and_lora_pngs_for_the_same_seeds_and_a_grid(
    tiny_model_dir, lora_dir, tmp_path
):
    out = sample(tiny_model_dir, tmp_path / "s", "--lora", str(lora_dir))
    base, lora = sorted((out / "base").glob("*.png")), sorted((out / "lora").glob("*.png"))
    assert (
        [p.name for p in base]
        == [p.name for p in lora]
        == ["000-a-red-cat-seed0.png", "001-a-red-cat-seed1.png"]
    )
    assert any(np.abs(pixels(b) - pixels(lo)).max() > 0 for b, lo in zip(base, lora))
    plain = sample(tiny_model_dir, tmp_path / "plain")
    assert np.array_equal(
        pixels(plain / base[0].name), pixels(base[0])
    )  # base/ is the model without LoRA
    grid = Image.open(out / "grid.png")
    width, height = Image.open(base[0]).size
    assert grid.size == (2 * width + 4, 2 * height + 4)
    assert np.array_equal(
        np.asarray(grid.convert("RGB"))[:height, :width],
        np.asarray(Image.open(base[0]).convert("RGB")),
    )


def test_lora_scale_zero_gives_the_base_models_images(tiny_model_dir, lora_dir, tmp_path):
    out = sample(tiny_model_dir, tmp_path / "s", "--lora", str(lora_dir), "--lora-scale", "0")
    for base in (out / "base").glob("*.png"):
        assert np.array_equal(pixels(base), pixels(out / "lora" / base.name))


def test_a_folder_without_lora_weights_is_refused_with_what_to_pass(
    tiny_model_dir, tmp_path, capsys
):
    argv = [
        "sample",
        "--model",
        tiny_model_dir,
        "--prompt",
        "x",
        "--steps",
        "1",
        "--out",
        str(tmp_path / "s"),
    ]
    (tmp_path / "no-lora").mkdir()  # apart from OUT: the guard refuses an OUT inside a read
    assert t2i([*argv, "--lora", str(tmp_path / "no-lora")]) == 1
    assert "t2i dpo" in capsys.readouterr().err


@pytest.mark.parametrize("poison", ["nan", "inf", "rank"])
def test_a_damaged_lora_is_refused_in_one_line_before_any_image(
    tiny_model_dir, lora_dir, tmp_path, capsys, poison
):
    """Issue 24: a NaN/inf LoRA made black images and exit 0; a LoRA whose up and down ranks
    differ is damaged too. Each is one line, exit 1, and no output folder."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(lora_dir / "pytorch_lora_weights.safetensors"))
    up = next(k for k in sorted(tensors) if "lora_B" in k)
    if poison == "rank":
        tensors[up] = tensors[up][:, :-1].contiguous()
    else:
        tensors[up] = tensors[up].clone()
        tensors[up][0, 0] = float(poison)
    bad = tmp_path / "bad" / "pytorch_lora_weights.safetensors"
    bad.parent.mkdir()
    save_file(tensors, str(bad))
    out = tmp_path / "out"
    argv = ["sample", "--model", tiny_model_dir, "--prompt", "x", "--steps", "2", "--out", str(out)]
    capsys.readouterr()
    before = tree_hash(tmp_path)
    assert t2i([*argv, "--lora", str(bad.parent)]) == 1
    assert tree_hash(tmp_path) == before
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    expected = "not a linear" if poison == "rank" else "NaN or infinite"
    assert expected in err
    assert not out.exists()
