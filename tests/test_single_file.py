"""`t2i export-single-file`: a trained transformer in Stability's single-file layout (model/single_file.py),
read back through diffusers' own single-file loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lora_kit import outputs
from PIL import Image
from safetensors.torch import load_file
from sd_scripts_kit import stability_checkpoint

from flows.cli import main as t2i
from model.build import build_transformer
from model.folders import load_transformer
from model.presets import tiny_mmdit_config
from model.single_file import PREFIX, stability_state_dict


def export(model, out, *extra):
    return t2i(["export-single-file", str(model), str(out), "--save-dtype", "fp32", *extra])


def test_the_file_loads_back_through_diffusers_single_file_loader_to_the_same_model(
    tiny64_model_dir, tmp_path
):
    file = tmp_path / "model.safetensors"
    assert export(tiny64_model_dir, file) == 0
    tensors = load_file(str(file))
    assert all(k.startswith(PREFIX) for k in tensors)
    # what ComfyUI and sd-scripts read the architecture from: depth = patch-embedder width / 64
    depth = tensors[PREFIX + "x_embedder.proj.weight"].shape[0] // 64
    assert depth == 2 and f"{PREFIX}joint_blocks.{depth - 1}.x_block.attn.qkv.weight" in tensors
    assert f"{PREFIX}joint_blocks.{depth}.x_block.attn.qkv.weight" not in tensors
    original = load_transformer(tiny64_model_dir).eval()
    back = load_transformer(tiny64_model_dir, transformer_file=file).eval()  # from_single_file
    assert torch.equal(outputs(back), outputs(original))


def test_the_layout_matches_the_mmdit_reference_names_with_dual_attention_and_qk_norms():
    """Against the layout written out by hand in tests/sd_scripts_kit.py (itself checked against
    diffusers' converter): SD3.5-medium-style attn2 blocks, RMS q/k norms, swapped modulations."""
    config = tiny_mmdit_config(num_layers=3)
    config.update(dual_attention_layers=(0, 1))
    torch.manual_seed(0)
    state = build_transformer(config).state_dict()
    ours, spec = stability_state_dict(state), stability_checkpoint(state, 3)
    assert ours.keys() == spec.keys()
    assert all(torch.equal(ours[k], spec[k]) for k in spec)


def test_bad_outputs_and_models_are_one_line_errors(tiny64_model_dir, tmp_path, capsys):
    cases = {
        "not a .safetensors path": (tiny64_model_dir, tmp_path / "model.ckpt"),
        "inside the model": (tiny64_model_dir, f"{tiny64_model_dir}/x.safetensors"),
        "no model": (tmp_path / "missing", tmp_path / "m.safetensors"),
    }
    for case, (model, out) in cases.items():
        assert export(model, out) == 1, case
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "export-single-file" in err, (case, err)
    assert not list(tmp_path.rglob("*.safetensors*"))


def test_t2i_sample_with_the_file_as_transformer_draws_the_same_images(tiny64_model_dir, tmp_path):
    file = tmp_path / "model.safetensors"
    assert export(tiny64_model_dir, file) == 0
    common = ["sample", "--model", tiny64_model_dir, "--prompt", "a red cat", "--steps", "2"]
    assert t2i([*common, "--out", str(tmp_path / "folder")]) == 0
    assert t2i([*common, "--out", str(tmp_path / "file"), "--transformer-file", str(file)]) == 0
    (a,), (b,) = (sorted((tmp_path / k).rglob("*.png")) for k in ("folder", "file"))
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_save_dtype_sets_the_weights_dtype(tiny64_model_dir, tmp_path, dtype):
    file = tmp_path / f"{dtype}.safetensors"
    assert t2i(["export-single-file", tiny64_model_dir, str(file), "--save-dtype", dtype]) == 0
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert {t.dtype for t in load_file(str(file)).values()} == {want}
