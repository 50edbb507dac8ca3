"""LoRA files as other trainers write them (sd-scripts' own layout, built in tests/sd_scripts_kit.py),
on the tiny-d2-64 kit: the smallest model whose widths sd-scripts and ComfyUI accept."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from lora_kit import outputs
from safetensors.torch import load_file
from sd_scripts_kit import merged_like_comfyui, save_sd_scripts_lora

from dpo.trainer import load_transformer
from flows.cli import main as t2i
from model.lora import load_into_pipeline
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


# ----------------------------------------------------------------------------- emb_dims, --init-lora


EMBEDDER_MODULES = {
    "pos_embed.proj",
    "context_embedder",
    "proj_out",
    "norm_out.linear",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    "time_text_embed.text_embedder.linear_1",
    "time_text_embed.text_embedder.linear_2",
}


def test_an_sd_scripts_lora_with_emb_dims_continues_as_sd_scripts_merges_it(
    tiny64_model_dir, tmp_path, capsys
):
    """Blocks at rank 4, the embedders and the final layer at rank 2 (emb_dims), the patch embedder
    a conv LoRA: --init-lora's adapter computes what merging the file into Stability-named weights
    computes (the way sd-scripts and ComfyUI apply it), and says it trains the extra layers."""
    from dpo.init_lora import add_init_lora

    config = transformer_config(tiny64_model_dir)
    file = save_sd_scripts_lora(tmp_path / "emb.safetensors", config, 4, 2.0, emb_rank=2)
    weights = read_lora(file)
    assert not weights.ignored
    assert set(weights.modules) >= EMBEDDER_MODULES
    assert weights.modules["pos_embed.proj"].down.ndim == 4

    base = load_transformer(tiny64_model_dir, "cpu", torch.float32).eval()
    expected = outputs(merged_like_comfyui(base, file))
    adapted = load_transformer(tiny64_model_dir, "cpu", torch.float32).eval()
    capsys.readouterr()
    lora_config = add_init_lora(adapted, file, tiny64_model_dir)
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "also trains its 8 layers outside" in message
    assert lora_config.r == 4 and set(lora_config.rank_pattern.values()) == {2}
    assert (outputs(adapted) - expected).abs().max() < 1e-5
    assert (outputs(base) - expected).abs().max() > 1e-3
    trainable = {n.split(".lora_")[0] for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable >= EMBEDDER_MODULES


def dpo(pairs, model, out, *extra):
    argv = [
        "dpo",
        str(pairs),
        str(out),
        "--model",
        model,
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--heldout-fraction",
        "0",
        "--eval-seeds",
        "0",
        "--save-dtype",
        "fp32",
    ]
    return t2i([*argv, *extra])


def test_dpo_trains_an_emb_dims_lora_from_sd_scripts_past_the_blocks(
    dpo_pairs, tiny64_model_dir, tmp_path
):
    config = transformer_config(tiny64_model_dir)
    file = save_sd_scripts_lora(tmp_path / "emb.safetensors", config, 4, 2.0, emb_rank=2)
    assert dpo(dpo_pairs, tiny64_model_dir, tmp_path / "out", "--init-lora", str(file)) == 0
    trained = read_lora(tmp_path / "out")
    start = read_lora(file)
    assert trained.modules.keys() == start.modules.keys()
    for name in EMBEDDER_MODULES:  # every layer outside the blocks trained on from the file's
        assert trained.modules[name].rank == 2, name
        assert not torch.allclose(trained.modules[name].delta(), start.modules[name].delta()), name


def test_dpo_lora_targets_reach_the_embedders_and_the_final_layer(
    dpo_pairs, tiny64_model_dir, tmp_path
):
    targets = ["attn.to_q", "embedders", "final-layer"]
    assert dpo(dpo_pairs, tiny64_model_dir, tmp_path / "out", "--lora-targets", *targets) == 0
    modules = set(read_lora(tmp_path / "out").modules)
    assert modules == EMBEDDER_MODULES | {f"transformer_blocks.{i}.attn.to_q" for i in (0, 1)}
    # and the file travels: kohya keys for them, back to the same modules
    kohya = tmp_path / "k.safetensors"
    assert (
        t2i(
            [
                "lora-convert",
                str(tmp_path / "out"),
                str(kohya),
                "--to",
                "kohya",
                "--save-dtype",
                "fp32",
            ]
        )
        == 0
    )
    keys = {k.split(".")[0] for k in load_file(str(kohya))}
    assert {
        "lora_unet_x_embedder_proj",
        "lora_unet_final_layer_linear",
        "lora_unet_t_embedder_mlp_0",
        "lora_unet_y_embedder_mlp_2",
    } <= keys
    assert set(read_lora(kohya).modules) == modules
    # diffusers' own loader takes the conv LoRA of the patch embedder too, and means the same
    ours, stock = (StableDiffusion3Pipeline.from_pretrained(tiny64_model_dir) for _ in range(2))
    load_into_pipeline(ours, kohya, "ours", 1.0)
    stock.load_lora_weights(str(tmp_path / "out"), adapter_name="stock")
    expected = outputs(ours.transformer.eval())
    assert (outputs(stock.transformer.eval()) - expected).abs().max() < 1e-5
    assert (
        outputs(load_transformer(tiny64_model_dir, "cpu", torch.float32)) - expected
    ).abs().max() > 1e-4


def test_diffusers_own_loader_applies_nothing_from_a_kohya_file_which_t2i_sample_converts(
    tiny64_model_dir, tmp_path
):
    """The trap docs/lora.md warns about: StableDiffusion3Pipeline.load_lora_weights finds no
    transformer keys in a kohya file, adds no adapter and changes nothing, without an error;
    `t2i sample --lora` (load_into_pipeline) converts the same file and applies it."""
    config = transformer_config(tiny64_model_dir)
    file = save_sd_scripts_lora(tmp_path / "k.safetensors", config, 4, 2.0)
    stock = StableDiffusion3Pipeline.from_pretrained(tiny64_model_dir)
    base = outputs(stock.transformer.eval())
    stock.load_lora_weights(str(file), adapter_name="k")
    assert stock.get_list_adapters() == {}
    assert torch.equal(outputs(stock.transformer), base)
    ours = StableDiffusion3Pipeline.from_pretrained(tiny64_model_dir)
    load_into_pipeline(ours, file, "k", 1.0)
    assert (outputs(ours.transformer.eval()) - base).abs().max() > 1e-3
