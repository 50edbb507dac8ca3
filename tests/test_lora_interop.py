"""LoRA files as other trainers write them (sd-scripts' own layout, built in tests/sd_scripts_kit.py),
on the tiny-d2-64 kit: the smallest model whose widths sd-scripts and ComfyUI accept."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from sd_scripts_kit import save_sd_scripts_lora

from flows.cli import main as t2i
from model.lora_formats import read_lora


def transformer_config(model_dir) -> dict:
    with open(f"{model_dir}/transformer/config.json") as handle:
        return json.load(handle)


def test_the_tiny_d2_64_preset_has_the_widths_sd_scripts_and_comfyui_infer(tiny64_model_dir):
    config = transformer_config(tiny64_model_dir)
    depth = config["num_layers"]
    assert config["attention_head_dim"] == 64 and config["num_attention_heads"] == depth
    weights = load_file(f"{tiny64_model_dir}/transformer/diffusion_pytorch_model.safetensors")
    # both tools read the depth off the patch embedder: width // 64
    assert weights["pos_embed.proj.weight"].shape[0] // 64 == depth


@pytest.mark.parametrize("source, save", [("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32")])
def test_lora_convert_splits_an_sd_scripts_file_with_shared_qkv_downs(
    source, save, tiny64_model_dir, tmp_path, capsys
):
    """sd-scripts trains one down matrix per fused qkv; split into q, k and v they share it, and the
    written file must hold three copies (safetensors refuses tensors that share memory)."""
    config = transformer_config(tiny64_model_dir)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[source]
    file = save_sd_scripts_lora(tmp_path / "sd.safetensors", config, 4, 2.0, dtype)
    out = tmp_path / "diffusers"
    code = t2i(["lora-convert", str(file), str(out), "--to", "diffusers", "--save-dtype", save])
    assert code == 0, capsys.readouterr().err
    written = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert {t.dtype for t in written.values()} == {torch.float32 if save == "fp32" else dtype}

    original = load_file(str(file))
    h = config["num_attention_heads"] * config["attention_head_dim"]
    exact = source == save == "fp32"
    for i in range(config["num_layers"]):
        stem = f"lora_unet_joint_blocks_{i}_x_block_attn_qkv"
        down, up = (
            original[f"{stem}.lora_down.weight"].float(),
            original[f"{stem}.lora_up.weight"].float(),
        )
        fused = original[f"{stem}.alpha"].float() / down.shape[0] * up @ down
        for part, name in enumerate(("to_q", "to_k", "to_v")):
            key = f"transformer.transformer_blocks.{i}.attn.{name}"
            a, b = written[f"{key}.lora_A.weight"].float(), written[f"{key}.lora_B.weight"].float()
            expected = fused[part * h : (part + 1) * h]
            tolerance = 1e-6 if exact else 2e-2 * expected.abs().max().item()
            assert torch.allclose(b @ a, expected, atol=tolerance), key
    back = read_lora(out)
    assert len(back.modules) == len(read_lora(file).modules)
