"""Peak memory of one `t2i dpo` step on CPU, per precision mode, extrapolated to SD3.5-M/-L.

Each mode runs in a fresh process: a random-weight MMDiT with SD3's real widths (hidden 64*d,
T5 4096, CLIP 768/1280) built in the base dtype, the default rank-128 LoRA on the attention
projections (dpo/config.py), then two DPO steps through the trainer's own `dpo_terms` (winner
and loser in one batch with the policy's gradients, the reference = the same network with the
adapter off, under no_grad), backward, clip, AdamW on the LoRA. Reported: peak RSS above the RSS
before the model was built, and the exact bytes of weights, LoRA gradients and AdamW moments;
"rest" = peak - those (activations of two images per pair, autocast copies, allocator slack).

    python benchmarks/bench_dpo_memory.py                   # d8, 512^2 latents, batch 1 pair
    python benchmarks/bench_dpo_memory.py --extrapolate benchmarks/dpo_memory_d8.jsonl
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_lora_memory import (  # noqa: E402
    build,
    random_text,
    released_counts,
    rss_bytes,
    tensor_bytes,
)

from dpo.config import TARGET_SETS, DPOConfig  # noqa: E402
from dpo.encode import EncodedPairs  # noqa: E402
from dpo.trainer import dpo_terms  # noqa: E402
from model.lora import add_lora, lora_parameters  # noqa: E402

# mode -> (base dtype, autocast, gradient checkpointing)
MODES = {
    "fp32 base, no autocast (the old default)": ("fp32", False, False),
    "bf16 base + bf16 autocast (default on a GPU)": ("bf16", True, False),
    "bf16 base + autocast + gradient checkpointing": ("bf16", True, True),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ATTENTION = TARGET_SETS["attention"]


def measure(mode: str, depth: int, side: int, batch: int, rank: int) -> dict:
    base, autocast, checkpointing = MODES[mode]
    generator = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    text = random_text(batch, generator)
    pairs = EncodedPairs(
        [str(i) for i in range(batch)],
        rand(batch, 16, side, side),
        rand(batch, 16, side, side),
        text,
    )
    config = DPOConfig(model=".", lora_rank=rank, lora_alpha=float(rank))
    before = rss_bytes()

    transformer = build(depth, DTYPES[base])
    transformer.requires_grad_(False)
    add_lora(transformer, rank, float(rank), ATTENTION, 0)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    trainable = lora_parameters(transformer)
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    for _ in range(2):
        t, noise = torch.rand(batch, generator=generator), rand(batch, 16, side, side)
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = dpo_terms(transformer, pairs, t, noise, config).loss
        loss.backward()
        grads = tensor_bytes(p.grad for p in trainable)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    weights = tensor_bytes(transformer.parameters())
    states = tensor_bytes(v for s in optimizer.state.values() for v in s.values())
    mb = lambda b: round(b / 2**20, 1)  # noqa: E731
    return {
        "mode": mode,
        "depth": depth,
        "tokens": batch * ((side // 2) ** 2 + 154),
        "params_M": round(
            sum(p.numel() for n, p in transformer.named_parameters() if "lora_" not in n) / 1e6, 2
        ),
        "trainable_M": round(sum(p.numel() for p in trainable) / 1e6, 3),
        "peak_MB": mb(peak),
        "weights_MB": mb(weights),
        "grads_MB": mb(grads),
        "optimizer_MB": mb(states),
        "activations_MB": mb(peak - weights - grads - states),
    }


# bytes per base parameter and per LoRA parameter held for a whole step: base weights; LoRA
# weights (fp32) + gradients (fp32) + AdamW's two fp32 moments. DPO keeps no EMA.
STATIC = {
    "fp32 base, no autocast (the old default)": (4, 16),
    "bf16 base + bf16 autocast (default on a GPU)": (2, 16),
    "bf16 base + autocast + gradient checkpointing": (2, 16),
}


def extrapolate(rows: list[dict], counts: dict, side: int, batches: tuple[int, ...]) -> str:
    """Markdown: bytes = a*P + b*Q + alpha * L * T * D per batch of pairs (T = the tokens of one
    pair's image + text; the winner and the loser of each pair make 2T in the forward), alpha
    fitted per mode on the measured run."""
    measured = rows[0]
    fit = measured["depth"] * measured["tokens"] * 64 * measured["depth"]
    tokens = (side // 2) ** 2 + 154
    heads = [f"{n} batch {b}" for n in counts for b in batches]
    lines = [
        "| mode | alpha (B) | static "
        + " | static ".join(counts)
        + " | "
        + " | ".join(heads)
        + " |",
        "| --- | --- | " + " | ".join("---" for _ in [*counts, *heads]) + " |",
    ]
    for row in rows:
        a, b = STATIC[row["mode"]]
        alpha = row["activations_MB"] * 2**20 / fit
        statics = [a * c["params"] + b * c["lora"] for c in counts.values()]
        totals = [
            static + alpha * c["depth"] * batch * tokens * c["hidden"]
            for static, c in zip(statics, counts.values(), strict=True)
            for batch in batches
        ]
        cells = [f"{s / 2**30:.1f}" for s in statics] + [f"{t / 2**30:.1f}" for t in totals]
        lines.append(f"| {row['mode']} | {alpha:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--side", type=int, default=64, help="latent side (64: 512^2 images)")
    parser.add_argument("--batch", type=int, default=1, help="preference pairs per step")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--mode", choices=list(MODES), help="one mode in this process")
    parser.add_argument("--extrapolate", help="JSON lines of a finished run: print the SD3.5 table")
    parser.add_argument(
        "--to-side", type=int, default=128, help="latent side of the table (128: 1024^2)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.extrapolate:
        lines = Path(args.extrapolate).read_text().splitlines()
        rows = [json.loads(line) for line in lines if '"mode"' in line]
        counts = next(json.loads(line) for line in lines if "SD3.5-medium" in line)
        print(extrapolate(rows, counts, args.to_side, (1, 2, 4)))
        return
    if args.mode:
        print(json.dumps(measure(args.mode, args.depth, args.side, args.batch, args.rank)))
        return
    print(json.dumps(released_counts(args.rank, ATTENTION)), flush=True)
    for mode in MODES:
        argv = [
            sys.executable,
            __file__,
            "--mode",
            mode,
            "--depth",
            str(args.depth),
            "--side",
            str(args.side),
            "--batch",
            str(args.batch),
            "--rank",
            str(args.rank),
        ]
        print(
            subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip(),
            flush=True,
        )


if __name__ == "__main__":
    main()
