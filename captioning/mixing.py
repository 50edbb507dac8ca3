"""The caption-mixing policy: original or synthetic caption, per sample per step (SD3 Table 4).

SD3 trains on 50% original / 50% synthetic (VLM) captions. The choice is a pure function of
(seed, step, sample id), not a draw from a stateful generator, so it is reproducible, identical
across data-loader workers and processes, and a resumed run makes exactly the choices the
uninterrupted run would have made.
"""

from __future__ import annotations

from typing import Literal

from curate.runtime.seeds import seed_unit

Variant = Literal["original", "synthetic"]
SYNTHETIC_PROBABILITY = 0.5


def caption_variant(
    sample_id: str,
    step: int,
    seed: int = 0,
    p_synthetic: float = SYNTHETIC_PROBABILITY,
    has_synthetic: bool = True,
) -> Variant:
    """Which caption sample `sample_id` trains on at `step`: "synthetic" or "original".

    "synthetic" with probability p_synthetic, else "original"; always "original" when the
    sample has no synthetic caption (pass `has_synthetic=row["caption_synthetic"] is not None`:
    the caption stage leaves it null where captioning failed).
    """
    if not 0.0 <= p_synthetic <= 1.0:
        raise ValueError(f"p_synthetic must be in [0, 1], got {p_synthetic}")
    if not has_synthetic:
        return "original"
    uniform = seed_unit(seed, step, sample_id)
    return "synthetic" if uniform < p_synthetic else "original"
