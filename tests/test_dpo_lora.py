"""LoRA on every linear layer of the MMDiT blocks, and its diffusers-format round trip (dpo/lora.py)."""

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from lora_kit import random_trained_lora

from dpo.lora import LORA_FILE, lora_parameters
from model.folders import load_pipeline

# fp32 on CPU: the reloaded transformer computes the same ops in the same order; allow for
# reordered additions only.
TOLERANCE = 1e-5


def inputs(transformer, seed=0):
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config
    size = config.sample_size
    return {
        "hidden_states": torch.randn(2, config.in_channels, size, size, generator=generator),
        "encoder_hidden_states": torch.randn(
            2, 90, config.joint_attention_dim, generator=generator
        ),
        "pooled_projections": torch.randn(2, config.pooled_projection_dim, generator=generator),
        "timestep": torch.tensor([250.0, 750.0]),
    }


@pytest.fixture(scope="module")
def trained_lora(tiny_model_dir, tmp_path_factory):
    """A rank-4, alpha-8 LoRA with non-zero B (as after training), exported to a folder."""
    return random_trained_lora(tiny_model_dir, tmp_path_factory.mktemp("lora"), 4, 8.0, 0.05, 1)


def test_lora_covers_attention_feed_forward_and_adaln_linears_of_both_streams(
    tiny_model_dir, trained_lora
):
    transformer, _ = trained_lora
    base = load_pipeline(tiny_model_dir).transformer
    adapted = {
        name.rsplit(".lora_A", 1)[0]
        for name, _ in transformer.named_parameters()
        if ".lora_A" in name
    }
    block0 = {
        name.removeprefix("transformer_blocks.0.")
        for name in adapted
        if name.startswith("transformer_blocks.0.")
    }
    assert {
        "attn.to_q",
        "attn.add_q_proj",
        "attn.to_out.0",
        "attn.to_add_out",
        "ff.net.2",
        "ff_context.net.2",
        "norm1.linear",
        "norm1_context.linear",
    } <= block0
    linears_in_blocks = {
        name
        for name, module in base.named_modules()
        if name.startswith("transformer_blocks.") and isinstance(module, torch.nn.Linear)
    }
    assert adapted == linears_in_blocks
    assert not any(
        name.startswith(("proj_out", "context_embedder", "time_text")) for name in adapted
    )
    assert all(p.requires_grad for p in lora_parameters(transformer))
    assert not any(p.requires_grad for n, p in transformer.named_parameters() if "lora_" not in n)


def test_disabled_adapter_is_bit_identical_to_the_base_model(tiny_model_dir, trained_lora):
    transformer, _ = trained_lora
    base = load_pipeline(tiny_model_dir).transformer
    x = inputs(base)
    with torch.no_grad():
        transformer.disable_adapters()
        reference = transformer(**x).sample
        transformer.enable_adapters()
        assert torch.equal(reference, base(**x).sample)
        assert not torch.allclose(transformer(**x).sample, reference, atol=1e-3)


def test_stock_diffusers_load_lora_weights_reproduces_the_trainers_outputs(
    tiny_model_dir, trained_lora
):
    transformer, folder = trained_lora
    assert (folder / LORA_FILE).is_file()
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir)
    base = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir).transformer
    pipe.load_lora_weights(str(folder), adapter_name="dpo")
    x = inputs(transformer, seed=3)
    with torch.no_grad():
        ours, loaded, plain = (
            transformer(**x).sample,
            pipe.transformer(**x).sample,
            base(**x).sample,
        )
        assert (ours - loaded).abs().max().item() < TOLERANCE  # alpha 8 != rank 4 survives the trip
        assert (loaded - plain).abs().max().item() > 1e-3
        pipe.set_adapters(["dpo"], adapter_weights=[0.0])
        assert (pipe.transformer(**x).sample - plain).abs().max().item() < TOLERANCE
