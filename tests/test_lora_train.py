"""`t2i train --lora-rank`: a LoRA on the frozen base, exact resume in every mode, 8-bit AdamW,
gradient checkpointing, and the result loading in stock diffusers (model/lora_train.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file
from train_sets import shapes_encoded

from flows.cli import main as t2i
from model.checkpoint import list_checkpoints
from model.config import TrainConfig
from model.folders import load_pipeline
from model.lora import add_lora
from model.lora_formats import LORA_FILE
from model.lora_train import make_optimizer
from model.train import run_train


@pytest.fixture(scope="module")
def encoded(tiny_model_dir, tmp_path_factory) -> Path:
    return shapes_encoded(tiny_model_dir, tmp_path_factory.mktemp("shapes"), 16)[0]


def lora_config(model: str, **overrides) -> TrainConfig:
    base = dict(
        model=model,
        device="cpu",
        batch_size=4,
        max_steps=6,
        warmup_steps=2,
        lr=3e-3,
        log_every=3,
        val_every=0,
        sample_every=0,
        sample_count=0,
        checkpoint_every=3,
        val_fraction=0.2,
        ema_decay=0.5,
        lora_rank=4,
        lora_alpha=8.0,
        save_dtype="fp32",
        mixed_precision="no",
    )
    return TrainConfig(**{**base, **overrides})


MODES = {
    "adamw": {},
    "adamw8bit+checkpointing": {"optimizer": "adamw8bit", "gradient_checkpointing": True},
    "bf16-base": {"mixed_precision": "bf16"},  # autocast bf16 on CPU; the base stored in bf16
}


@pytest.mark.parametrize("mode", list(MODES))
def test_a_lora_run_resumed_from_its_checkpoint_ends_bit_identical(
    mode, encoded, tiny_model_dir, tmp_path
):
    config = lora_config(tiny_model_dir, **MODES[mode])
    straight = run_train(str(encoded), str(tmp_path / "straight"), config)
    lora = load_file(str(straight / LORA_FILE))
    assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora)
    assert not (straight / "transformer").exists()  # the LoRA, not a copy of the base
    checkpoints = list_checkpoints(straight / "training" / "checkpoints")
    assert [p.name for p in checkpoints] == ["step-00000003", "step-00000006"]
    saved = load_file(str(checkpoints[0] / "model.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # the frozen base stays out of checkpoints
    # The export is the EMA's LoRA (decay 0.5 here), alpha / rank = 2 folded into B.
    ema = load_file(str(checkpoints[-1] / "ema.safetensors"))
    raw_final = load_file(str(checkpoints[-1] / "model.safetensors"))
    for key, value in lora.items():
        param = key.removeprefix("transformer.").replace(".weight", ".default.weight")
        (shadow,) = [v for k, v in ema.items() if k.endswith(param)]
        expected = shadow * 2.0 if ".lora_B." in key else shadow
        assert torch.equal(value, expected), key
    b_key = next(k for k in raw_final if ".lora_B." in k)
    assert not torch.equal(
        raw_final[b_key] * 2.0, lora["transformer." + b_key.replace(".default", "")]
    )

    # A run killed right after its step-3 checkpoint: the same folder without what came later.
    killed = tmp_path / "killed"
    shutil.copytree(straight, killed)
    shutil.rmtree(killed / "training" / "checkpoints" / "step-00000006")
    for name in (LORA_FILE, "manifest.json"):
        (killed / name).unlink()
    resumed = run_train(str(encoded), str(killed), config.model_copy(update={"resume": "latest"}))
    again = load_file(str(resumed / LORA_FILE))
    assert all(torch.equal(lora[k], again[k]) for k in lora), mode
    final = Path("training") / "checkpoints" / "step-00000006" / "model.safetensors"
    raw, raw_again = load_file(str(straight / final)), load_file(str(killed / final))
    assert all(torch.equal(raw[k], raw_again[k]) for k in raw)


def test_cli_lora_training_loads_in_stock_diffusers_and_changes_samples(
    encoded, tiny_model_dir, tmp_path
):
    out = tmp_path / "lora-run"
    argv = [
        "train",
        str(encoded),
        str(out),
        "--model",
        tiny_model_dir,
        "--lora-rank",
        "4",
        "--lora-alpha",
        "2",
        "--lora-targets",
        "attn.to_q",
        "attn.to_v",
        "ff.net.2",
        "--max-steps",
        "4",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--warmup-steps",
        "1",
        "--val-every",
        "0",
        "--sample-every",
        "0",
        "--sample-count",
        "0",
        "--checkpoint-every",
        "0",
        "--no-export-ema",
        "--device",
        "cpu",
    ]
    assert t2i(argv) == 0
    weights = load_file(str(out / LORA_FILE))
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}  # --save-dtype default
    assert {k.split(".")[-3] for k in weights} == {"to_q", "to_v", "2"}

    def image(pipe):
        generator = torch.Generator().manual_seed(0)
        result = pipe(
            "a red circle", num_inference_steps=2, height=32, width=32, generator=generator
        )
        return np.asarray(result.images[0], dtype=np.int16)

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir)
    base = image(pipe)
    pipe.load_lora_weights(str(out))
    assert np.abs(image(pipe) - base).max() > 0


def test_8bit_adamw_keeps_8_bit_states_and_follows_adamw(tiny_model_dir):
    torch.manual_seed(0)
    layers = {}
    for name in ("adamw", "adamw8bit"):
        torch.manual_seed(0)
        layer = torch.nn.Linear(
            128, 128
        )  # 16k weights: above bitsandbytes' 4096 minimum for 8 bits
        config = lora_config(tiny_model_dir, optimizer=name, lr=1e-3)
        optimizer = make_optimizer(layer.parameters(), config)
        for step in range(5):
            x = torch.randn(16, 128, generator=torch.Generator().manual_seed(step))
            layer(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        layers[name] = (layer, optimizer)
    state = layers["adamw8bit"][1].state[layers["adamw8bit"][0].weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    torch.manual_seed(0)
    start = torch.nn.Linear(128, 128).weight.detach()
    moved = layers["adamw"][0].weight.detach() - start
    moved_8bit = layers["adamw8bit"][0].weight.detach() - start
    assert moved.abs().max() > 4e-3  # 5 steps of lr 1e-3
    # 8-bit moments move the weights like fp32 ones, up to their quantisation
    assert (moved_8bit - moved).norm() < 0.1 * moved.norm()


def test_gradient_checkpointing_gives_the_loras_gradients_unchanged(tiny_model_dir):
    from model.lora_targets import LORA_BLOCK_LINEARS

    grads = []
    for checkpointing in (False, True):
        transformer = load_pipeline(tiny_model_dir).transformer
        add_lora(transformer, 4, 8.0, LORA_BLOCK_LINEARS)
        with torch.no_grad():
            for name, parameter in transformer.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        g = torch.Generator().manual_seed(0)
        config = transformer.config
        out = transformer(
            hidden_states=torch.randn(2, config.in_channels, 16, 16, generator=g),
            encoder_hidden_states=torch.randn(2, 9, config.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=g),
            timestep=torch.tensor([100.0, 900.0]),
        ).sample
        out.square().mean().backward()
        grads.append(
            {n: p.grad.clone() for n, p in transformer.named_parameters() if p.requires_grad}
        )
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    unused = "transformer_blocks.1.attn.add_q_proj"  # the last block discards its text queries
    assert all(grads[1][n].abs().sum() > 0 for n in grads[1] if "lora_A" in n and unused not in n)
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])


def test_a_16_bit_base_without_16_bit_autocast_is_refused_in_one_line(
    encoded, tiny_model_dir, tmp_path, capsys
):
    argv = [
        "train",
        str(encoded),
        str(tmp_path / "x"),
        "--model",
        tiny_model_dir,
        "--lora-rank",
        "2",
        "--lora-base-dtype",
        "fp16",
        "--mixed-precision",
        "no",
        "--max-steps",
        "1",
        "--device",
        "cpu",
    ]
    assert t2i(argv) == 1
    assert "--mixed-precision fp16" in capsys.readouterr().err
