"""Which samples change colour when a DPO LoRA moves a prompt's colour accuracy (issue 20)?

Trains one arm of the shapes proof (dpo/shapes_proof.py) at the DPOConfig defaults, then samples
every class prompt on the same seeds with the base and with the LoRA, and prints, per prompt, the
samples that lost the named colour ("down") or gained it ("up"), each as
base colour (the reader's probability of the named colour) -> LoRA colour (its probability).

    PYTHONPATH=. python benchmarks/bench_dpo_flips.py --cache DIR --task weak --swapped
    PYTHONPATH=. python benchmarks/bench_dpo_flips.py --cache DIR --task strong \\
        --preserve-weight 3 --seeds sweep
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from dpo.config import DPOConfig
from dpo.shapes_proof import (
    PROOF_SEEDS,
    SWEEP_SEEDS,
    Sampling,
    preserve_pool,
    sample_prompt,
    start_arm,
    training_shift,
)
from dpo.shapes_task import BASE_STEPS, COLOURS, build_task, class_prompts, colour_features


def sample_colours(model, task, seeds) -> dict[str, tuple[list[str], list[float]]]:
    """Per class prompt: each sample's colour and the reader's probability of the named one."""
    out = {}
    for row, (caption, colour, _) in enumerate(class_prompts()):
        latents = sample_prompt(model, task, row, seeds, Sampling())
        proba = task.colour_classifier.predict_proba(colour_features(latents))
        k = list(COLOURS).index(colour)
        out[caption] = (task.colour_of(latents), [float(p[k]) for p in proba])
    return out


def trained_lora(model_dir, task, config: DPOConfig, swapped: bool):
    """One arm of the proof trained to config.max_steps, as run_arm trains it."""
    from dpo.trainer import train_lora

    model, train, _ = start_arm(model_dir, task, config, swapped)
    pool = preserve_pool(task) if config.preserve_weight else None
    with tempfile.TemporaryDirectory() as tmp:
        train_lora(model, train, config, Path(tmp), training_shift(config), 0, None, preserve=pool)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cache", required=True, help="where bench_dpo_proof.py shapes caches bases"
    )
    parser.add_argument("--task", choices=list(BASE_STEPS), required=True)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--preserve-weight", type=float, default=None, help="default: DPOConfig's")
    parser.add_argument("--swapped", action="store_true", help="the swapped-label control")
    parser.add_argument("--seeds", choices=["proof", "sweep"], default="proof")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from dpo.trainer import load_transformer

    model_dir, task = build_task(args.cache, args.task, BASE_STEPS[args.task])
    seeds = (PROOF_SEEDS if args.seeds == "proof" else SWEEP_SEEDS)[:48]
    extra = {} if args.preserve_weight is None else {"preserve_weight": args.preserve_weight}
    config = DPOConfig(model=str(model_dir), max_steps=args.steps, eval_seeds=0, **extra)
    base = sample_colours(load_transformer(model_dir, "cpu", torch.float32), task, seeds)
    lora = sample_colours(trained_lora(model_dir, task, config, args.swapped), task, seeds)
    for caption, colour, _ in class_prompts():
        (b, bp), (c, cp) = base[caption], lora[caption]
        changed = [i for i in range(len(seeds)) if (b[i] == colour) != (c[i] == colour)]
        moves = {"down": [], "up": []}
        for i in changed:
            moves["down" if b[i] == colour else "up"].append(
                f"{b[i]}({bp[i]:.2f})->{c[i]}({cp[i]:.2f})"
            )
        before, after = (sum(x == colour for x in xs) / len(seeds) for xs in (b, c))
        print(
            f"{caption:18s} base {before:.3f} LoRA {after:.3f}  down {len(moves['down'])}: "
            f"{', '.join(moves['down'])}  up {len(moves['up'])}: {', '.join(moves['up'])}",
            flush=True,
        )


if __name__ == "__main__":
    main()
