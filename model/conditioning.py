"""SD3's text conditioning, assembled from pre-encoded CLIP-L, CLIP-G and T5 outputs (paper section 3).

The sequence condition is [CLIP-L ++ CLIP-G (channels), zero-padded to the T5 width ; T5] along
the tokens (77 + T5 length tokens); the vector condition is pooled CLIP-L ++ pooled CLIP-G. This
is exactly what `StableDiffusion3Pipeline.encode_prompt` builds at sampling time.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

# Each encoder is dropped independently with p = 0.464, so all three are dropped ~10% of the
# time (0.464^3 = 0.0999): classifier-free guidance with any subset of encoders (section 5.3.1).
ENCODER_DROP_PROB = 0.464


@dataclass
class TextEncoding:
    """One caption's (or a batch's) encoder outputs; leading dims are batch dims."""

    clip_l: torch.Tensor  # [..., 77, d_clip_l] penultimate hidden states
    clip_l_pooled: torch.Tensor  # [..., p_clip_l] projected pooled output
    clip_g: torch.Tensor  # [..., 77, d_clip_g]
    clip_g_pooled: torch.Tensor  # [..., p_clip_g]
    t5: torch.Tensor  # [..., L, d_t5] last hidden states
    t5_mask: torch.Tensor  # [..., L] 1 for real tokens

    def to(self, *args, **kwargs) -> TextEncoding:
        return TextEncoding(
            **{f.name: getattr(self, f.name).to(*args, **kwargs) for f in fields(self)}
        )

    @classmethod
    def stack(cls, items: list[TextEncoding]) -> TextEncoding:
        return cls(
            **{f.name: torch.stack([getattr(i, f.name) for i in items]) for f in fields(cls)}
        )


def joint_condition(text: TextEncoding) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder_hidden_states [B, 77 + L, d_t5], pooled_projections [B, p_l + p_g])."""
    clip = torch.cat([text.clip_l, text.clip_g], dim=-1)
    width = text.t5.shape[-1]
    if clip.shape[-1] > width:
        raise ValueError(
            f"CLIP-L + CLIP-G width {clip.shape[-1]} exceeds the T5 width {width}; SD3 pads CLIP "
            "up to T5, so the encoders do not belong to one SD3 model"
        )
    clip = F.pad(clip, (0, width - clip.shape[-1]))
    sequence = torch.cat([clip, text.t5.to(clip.dtype)], dim=-2)
    pooled = torch.cat([text.clip_l_pooled, text.clip_g_pooled], dim=-1)
    return sequence, pooled


def sample_encoder_keep(
    batch: int,
    p_drop: float = ENCODER_DROP_PROB,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """[batch, 3] booleans: keep CLIP-L, CLIP-G, T5 for each sample (each dropped with p_drop)."""
    return torch.rand(batch, 3, generator=generator, device=device) >= p_drop


def drop_encoders(
    text: TextEncoding, keep: torch.Tensor, empty: TextEncoding | None = None
) -> TextEncoding:
    """Replace each dropped encoder's outputs, sample by sample (keep: [B, 3] for CLIP-L, CLIP-G,
    T5), with zeros, or with EMPTY (that encoder's encoding of the empty prompt, unbatched): the
    unconditional input classifier-free guidance then contrasts with at sampling time."""

    def mask(name: str, column: int) -> torch.Tensor:
        x = getattr(text, name)
        kept = keep[:, column].view(-1, *([1] * (x.ndim - 1)))
        if empty is None:
            return x * kept.to(x.dtype)
        return torch.where(kept, x, getattr(empty, name).to(x.device, x.dtype))

    return TextEncoding(
        clip_l=mask("clip_l", 0),
        clip_l_pooled=mask("clip_l_pooled", 0),
        clip_g=mask("clip_g", 1),
        clip_g_pooled=mask("clip_g_pooled", 1),
        t5=mask("t5", 2),
        t5_mask=text.t5_mask,
    )
