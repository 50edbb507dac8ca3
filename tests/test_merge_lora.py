"""`t2i merge-lora`: base + LoRA merged into a new diffusers folder (DPO's SFT reference)."""

from __future__ import annotations

import json

import torch
from bad_corpus import tree_hash
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from lora_kit import random_trained_lora
from safetensors.torch import load_file

from flows.cli import main as t2i
from model.interop_config import MergeLoraConfig
from model.lora_formats import LoraModule, LoraWeights, read_lora, save_lora
from model.merge_lora import run_merge_lora


def inputs(config, seed=3):
    generator = torch.Generator().manual_seed(seed)
    size = config.sample_size
    return {
        "hidden_states": torch.randn(2, config.in_channels, size, size, generator=generator),
        "encoder_hidden_states": torch.randn(
            2, 90, config.joint_attention_dim, generator=generator
        ),
        "pooled_projections": torch.randn(2, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([250.0, 750.0]),
    }


def test_the_merged_folder_computes_what_base_plus_lora_computes(tiny_model_dir, tmp_path):
    # alpha 8 != rank 4: the merge must apply alpha / rank, as diffusers' loader does
    _, lora = random_trained_lora(tiny_model_dir, tmp_path / "lora", 4, 8.0, 0.05, seed=1)
    before = tree_hash(tmp_path / "lora"), tree_hash(tiny_model_dir)
    out = run_merge_lora(tiny_model_dir, str(lora), str(tmp_path / "merged"), MergeLoraConfig())
    assert (tree_hash(tmp_path / "lora"), tree_hash(tiny_model_dir)) == before  # inputs untouched

    # the reference: stock diffusers loading the LoRA file into the base pipeline
    stock = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir)
    plain = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir).transformer
    stock.load_lora_weights(str(lora), adapter_name="sft")
    merged = StableDiffusion3Pipeline.from_pretrained(str(out))  # a whole pipeline folder
    assert not getattr(merged.transformer, "peft_config", None)  # plain weights, no adapter
    x = inputs(plain.config)
    with torch.no_grad():
        expected, got, base = (
            stock.transformer(**x).sample,
            merged.transformer(**x).sample,
            plain(**x).sample,
        )
    assert (got - expected).abs().max().item() < 1e-5
    assert (got - base).abs().max().item() > 1e-3  # the LoRA is not a no-op
    # the same update as a kohya file that keeps alpha (2 x rank) apart from up (halved)
    modules = {
        n: LoraModule(m.down, m.up / 2, 2 * m.alpha) for n, m in read_lora(lora).modules.items()
    }
    kohya = save_lora(LoraWeights(modules), tmp_path / "kohya.safetensors", "kohya", "fp32")
    again = run_merge_lora(tiny_model_dir, str(kohya), str(tmp_path / "m2"), MergeLoraConfig())
    with torch.no_grad():
        other = SD3Transformer2DModel.from_pretrained(again / "transformer")(**x).sample
    assert (other - expected).abs().max().item() < 1e-5
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "merge-lora" and manifest["counts"]["layers_merged"] > 0


def test_merge_lora_cli_skips_a_finished_output_and_refuses_a_lora_for_another_model(
    tiny_model_dir, tiny64_model_dir, tmp_path, capsys
):
    _, lora = random_trained_lora(tiny_model_dir, tmp_path / "lora", 4, 4.0, 0.05, seed=2)
    out = tmp_path / "merged"
    assert t2i(["merge-lora", tiny_model_dir, str(lora), str(out), "--save-dtype", "bf16"]) == 0
    files = sorted((out / "transformer").glob("*.safetensors"))
    assert files and {t.dtype for f in files for t in load_file(f).values()} == {torch.bfloat16}
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert t2i(["merge-lora", tiny_model_dir, str(lora), str(out), "--save-dtype", "bf16"]) == 0
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    assert "skipped" in capsys.readouterr().err

    status = t2i(["merge-lora", tiny64_model_dir, str(lora), str(tmp_path / "other")])
    err = capsys.readouterr().err
    assert status != 0 and "Traceback" not in err and str(lora) in err
    assert not (tmp_path / "other" / "model_index.json").exists()
    before = tree_hash(tiny_model_dir)
    status = t2i(["merge-lora", tiny_model_dir, str(lora), f"{tiny_model_dir}/merged"])
    err = capsys.readouterr().err
    assert status != 0 and "Traceback" not in err and tree_hash(tiny_model_dir) == before
