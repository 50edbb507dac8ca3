"""MMDiT joint attention with one projection GEMM per stream for training.

diffusers' SD3 attention projects each stream to queries, keys and values with three separate
linears (`to_q`/`to_k`/`to_v` for the image tokens, `add_q_proj`/`add_k_proj`/`add_v_proj` for the
text tokens). `StackedProjections` computes the same attention with the three weight matrices
stacked into one `[3 * inner, width]` matrix at every call, so each stream costs one larger GEMM
forward and two backward instead of three small ones; the stacking is differentiable, so the
parameters, their gradients, checkpoints, EMA and optimizer state keep diffusers' layout and
names, and nothing needs unfusing on save. (diffusers' own `fuse_qkv_projections` creates new
fused parameters instead, which suits inference, not a trainer that saves and resumes.)

Only attention modules whose six projections are plain `nn.Linear`s are switched; a LoRA-wrapped
layer keeps the stock processor. Sampling and export never see this processor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from torch import nn


def _stacked(layers: tuple[nn.Linear, nn.Linear, nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([layer.weight for layer in layers])
    if any(layer.bias is None for layer in layers):
        return weight, None
    return weight, torch.cat([layer.bias for layer in layers])


def _heads(attn: Attention, x: torch.Tensor, layers, norms) -> tuple[torch.Tensor, ...]:
    """Queries, keys and values of X as [batch, heads, tokens, head_dim], QK-normed if the model is."""
    weight, bias = _stacked(layers)
    batch, tokens = x.shape[0], x.shape[1]
    q, k, v = F.linear(x, weight, bias).view(batch, tokens, 3, attn.heads, -1).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    norm_q, norm_k = norms
    if norm_q is not None:
        q = norm_q(q)
    if norm_k is not None:
        k = norm_k(k)
    return q, k, v


class StackedProjections:
    """A drop-in processor for SD3/SD3.5 `Attention` modules (joint and image-only self-attention)."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:  # SD3 never passes one; keep the stock path exact if it does
            return JointAttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask)
        image_tokens = hidden_states.shape[1]
        q, k, v = _heads(
            attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k)
        )
        if encoder_hidden_states is not None:
            text = _heads(
                attn,
                encoder_hidden_states,
                (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                (attn.norm_added_q, attn.norm_added_k),
            )
            q, k, v = (torch.cat(pair, dim=2) for pair in zip((q, k, v), text))  # image, then text
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        image = attn.to_out[1](attn.to_out[0](out[:, :image_tokens]))
        if encoder_hidden_states is None:
            return image
        text_out = out[:, image_tokens:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return image, text_out


def _plain(*layers) -> bool:
    return all(type(layer) is nn.Linear for layer in layers)


def stack_projections(transformer: nn.Module) -> int:
    """Give every eligible attention module of TRANSFORMER the stacked processor; returns how many."""
    processor = StackedProjections()
    switched = 0
    for module in transformer.modules():
        if not isinstance(module, Attention) or not isinstance(
            module.processor, JointAttnProcessor2_0
        ):
            continue
        layers = [module.to_q, module.to_k, module.to_v]
        if getattr(module, "add_q_proj", None) is not None:
            layers += [module.add_q_proj, module.add_k_proj, module.add_v_proj]
        if not _plain(*layers):
            continue
        module.set_processor(processor)
        switched += 1
    return switched
