"""What each `t2i dpo` step draws (pairs, timesteps, noise) and which pairs are held out: pure
functions of (seed, step) and the pair ids, so a resumed or multi-process run repeats them."""

from __future__ import annotations

import torch

from curate.runtime.seeds import seed_int
from dpo.config import DPOConfig
from dpo.encode import EncodedPairs, EncodedPairSet
from model.toolbox import draw_timesteps, heldout_split

Pairs = EncodedPairs | EncodedPairSet  # in memory (dpo/proof.py) or streamed from disk


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed_int(seed, "dpo-step", step))


def draw(
    pairs: Pairs,
    batch: int,
    generator: torch.Generator,
    config: DPOConfig,
    shift: float,
    rank: int = 0,
    world: int = 1,
):
    """One step's pairs, timesteps and noise for process RANK of WORLD: every process draws the
    same global batch of batch * world pairs from this step's generator and keeps its slice."""
    n, total = len(pairs), batch * world
    index = (
        torch.randperm(n, generator=generator)[:total]
        if n >= total
        else torch.randint(n, (total,), generator=generator)
    )
    mine = slice(rank * batch, (rank + 1) * batch)
    chosen = pairs.select(index[mine])
    t = draw_timesteps(config, total, shift, generator)[mine]
    noise = torch.randn((total, *chosen.latents_w.shape[1:]), generator=generator)[mine]
    return chosen, t, noise


def split_heldout(pairs: Pairs, fraction: float, seed: int) -> tuple[Pairs, Pairs | None]:
    """(train, held-out) pairs: the one held-out split of model/toolbox.py, over the pair ids."""
    train, held = heldout_split(pairs.ids, fraction, seed=seed)
    return pairs.subset(train), (pairs.subset(held) if held else None)
