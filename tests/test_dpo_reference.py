"""The DPO reference: adapter off, replaying the policy's input layers, equal to a frozen copy."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig

from dpo.config import DPOConfig
from dpo.lora import add_lora
from dpo.reference import STEM, stem_modules
from dpo.trainer import dpo_terms, load_transformer
from tests.test_dpo_loss import _random_pairs


def _counting(transformer) -> dict[str, int]:
    """How often each input layer really computes (a counting wrapper as its instance forward)."""
    calls = dict.fromkeys(STEM, 0)
    for name in STEM:
        module = getattr(transformer, name)

        def counted(*args, _name=name, _forward=module.forward, **kwargs):
            calls[_name] += 1
            return _forward(*args, **kwargs)

        module.forward = counted
    return calls


def test_the_reference_equals_a_frozen_copy_without_running_the_input_layers_again(tiny_model_dir):
    transformer = load_transformer(tiny_model_dir, "cpu", torch.float32)
    copy_of_base = copy.deepcopy(transformer).requires_grad_(False)
    add_lora(transformer, 4, 4.0, ["attn.to_q", "attn.to_v", "ff.net.2"], seed=0)
    with torch.no_grad():  # a LoRA that is not zero yet, so policy and reference differ
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    pairs = _random_pairs(3).select([0, 1, 2])
    t, noise = torch.tensor([0.1, 0.5, 0.9]), torch.randn(3, 16, 8, 8)
    config = DPOConfig(model=tiny_model_dir, lora_rank=4, lora_alpha=4.0)
    calls = _counting(transformer)

    ours = dpo_terms(transformer, pairs, t, noise, config)
    assert all(count == 1 for count in calls.values()), calls  # the policy's pass only
    with_copy = dpo_terms(transformer, pairs, t, noise, config, reference=copy_of_base)

    assert torch.allclose(ours.ref_w, with_copy.ref_w, rtol=1e-6, atol=1e-7)
    assert torch.allclose(ours.ref_l, with_copy.ref_l, rtol=1e-6, atol=1e-7)
    assert torch.equal(ours.err_w, with_copy.err_w)
    assert not torch.allclose(ours.err_w, ours.ref_w)  # the adapter was really off for one of them
    # the layers run again afterwards: nothing of the replay is left behind
    grads = torch.autograd.grad(ours.loss, [p for p in transformer.parameters() if p.requires_grad])
    assert all(torch.isfinite(g).all() for g in grads)
    dpo_terms(transformer, pairs, t, noise * 2, config)
    assert all(count == 3 for count in calls.values()), calls


def test_an_input_layer_with_a_lora_of_its_own_is_run_for_the_reference(tiny_model_dir):
    transformer = load_transformer(tiny_model_dir, "cpu", torch.float32)
    transformer.requires_grad_(False)  # e.g. an --init-lora from another tool that trained it too
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["context_embedder", "attn.to_q"])
    )
    assert set(stem_modules(transformer)) == set(STEM) - {"context_embedder"}
    calls = _counting(transformer)
    pairs = _random_pairs(2).select([0, 1])
    dpo_terms(
        transformer,
        pairs,
        torch.tensor([0.3, 0.6]),
        torch.randn(2, 16, 8, 8),
        DPOConfig(model=tiny_model_dir, lora_rank=4, lora_alpha=4.0),
    )
    assert calls["context_embedder"] == 2 and calls["pos_embed"] == 1
