"""Every deterministic choice as a pure function of (seed, parts...).

Which caption variant a sample trains on at a step, which pairs are held out, which noise a
micro-batch draws: each is a number derived from the run's seed and the names of the choice
(step, sample id, "noise", ...), never from call order, so a resumed or sharded run makes the
same choices as one that ran straight through.
"""

from __future__ import annotations

import hashlib


def _digest(parts: tuple[object, ...]) -> int:
    text = ":".join(map(str, parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def seed_int(*parts: object) -> int:
    """A 63-bit integer (a valid torch/numpy seed) from any parts, e.g. (seed, "noise", step)."""
    return _digest(parts) >> 1


def seed_unit(*parts: object) -> float:
    """A number in [0, 1) from any parts, e.g. (seed, step, sample_id) for a coin flip."""
    return _digest(parts) / 2**64
