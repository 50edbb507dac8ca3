"""`make demo`: the whole chain on the offline tiny kit, printing where each output is.

Runs `t2i run-all OUT` (the end_to_end Prefect flow in ephemeral mode): demo data -> curate ->
caption (tiny VLM) -> precompute -> train (few steps) -> synthetic preference pairs -> DPO LoRA
-> samples with and without the LoRA (loaded through StableDiffusion3Pipeline.load_lora_weights),
leaving out stages that are not installed. Rerunning skips every finished stage.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from flows.cli import main as t2i


def lora_effect(samples: Path) -> str | None:
    """Mean absolute pixel difference between samples with and without the LoRA (same seeds)."""
    pairs = []
    for base in sorted(samples.rglob("base")):
        lora = base.parent / "lora"
        pairs += [
            (p, lora / p.name) for p in sorted(base.glob("*.png")) if (lora / p.name).is_file()
        ]
    if not pairs:
        return None
    diffs = [
        np.abs(np.asarray(Image.open(a), np.float32) - np.asarray(Image.open(b), np.float32)).mean()
        for a, b in pairs
    ]
    return f"{len(pairs)} image pairs, mean |base - lora| = {np.mean(diffs):.2f} / 255"


def run(out: Path) -> None:
    start = time.monotonic()
    argv = ["run-all", str(out), "--kit", "tiny"]
    print(f"== t2i {' '.join(argv)}", flush=True)
    if t2i(argv) != 0:
        raise SystemExit("demo failed: see the messages above")
    effect = lora_effect(out / "samples")
    if effect:
        print(f"\nLoRA (loaded with load_lora_weights) vs base, same seeds: {effect}")
    print(f"\ndemo finished in {time.monotonic() - start:.0f} s; outputs under {out.resolve()}")


if __name__ == "__main__":
    run(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-out"))
