"""Peak memory of one training step: full fp32 fine-tuning vs the low-memory LoRA modes of
`t2i train` (model/lora_train.py), measured on CPU, then extrapolated to SD3.5-medium/-large.

Each mode runs in a fresh process: a random-weight MMDiT with SD3's real widths (hidden 64*d,
T5 4096, CLIP 768/1280) is built in its storage dtype (no fp32 detour), then two training steps
(the trainer's `training_loss`, backward, clip, optimizer step, EMA update) run on one synthetic
batch. Reported: the process's peak RSS above its RSS just before the model was built, and the
exact bytes of weights, gradients, optimizer states and EMA shadows (summed over the tensors),
so "activations and workspace" = peak - those.

    python benchmarks/bench_lora_memory.py                  # d8, 512^2 latents, batch 1, rank 64
    python benchmarks/bench_lora_memory.py --depth 12 --rank 128
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

from model.build import build_transformer  # noqa: E402
from model.conditioning import TextEncoding  # noqa: E402
from model.config import TrainConfig  # noqa: E402
from model.ema import EMA  # noqa: E402
from model.lora import add_lora  # noqa: E402
from model.lora_targets import LORA_BLOCK_LINEARS  # noqa: E402
from model.lora_train import make_optimizer  # noqa: E402
from model.objective import FlowSettings, draw_noise_and_time, training_loss  # noqa: E402
from model.presets import SD3_TEXT_DIMS, mmdit_config, released_config  # noqa: E402

# mode -> (LoRA?, base dtype, optimizer, gradient checkpointing)
MODES = {
    "full fp32 (AdamW + EMA)": (False, "fp32", "adamw", False),
    "LoRA, fp32 base": (True, "fp32", "adamw", False),
    "LoRA, bf16 base": (True, "bf16", "adamw", False),
    "LoRA, bf16 base, 8-bit AdamW": (True, "bf16", "adamw8bit", False),
    "LoRA, bf16 base, 8-bit AdamW, grad checkpointing": (True, "bf16", "adamw8bit", True),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RELEASED = ("SD3.5-medium", "SD3.5-large")


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def build(depth: int, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights allocated directly in DTYPE (normal(0, 0.02); norms and biases as built)."""
    transformer = build_transformer(mmdit_config(depth), "meta")
    transformer = transformer.to_empty(device="cpu").to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if parameter.ndim >= 2 or "pos_embed" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
            else:
                parameter.fill_(1.0 if "norm" in name else 0.0)
    return transformer


def measure(mode: str, depth: int, side: int, batch: int, rank: int) -> dict:
    lora, base, optimizer_name, checkpointing = MODES[mode]
    generator = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    text = random_text(batch, generator)
    latents = rand(batch, 16, side, side)
    settings = FlowSettings()
    before = rss_bytes()

    transformer = build(depth, DTYPES[base])
    if lora:
        add_lora(transformer, rank, float(rank), LORA_BLOCK_LINEARS)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    config = TrainConfig(model=".", optimizer=optimizer_name, lr=1e-4)
    optimizer = make_optimizer(trainable, config)
    ema = EMA(transformer, 0.999)
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=base == "bf16")
    for j in range(2):
        with autocast:
            loss = training_loss(
                transformer, latents, text, draw_noise_and_time(latents, settings, 0, j), settings
            )
        loss.backward()
        grads = tensor_bytes(p.grad for p in trainable)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(transformer)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    weights = tensor_bytes(transformer.parameters())
    states = tensor_bytes(v for s in optimizer.state.values() for v in s.values())
    shadows = tensor_bytes(ema.shadow.values())
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
        "ema_MB": mb(shadows),
        "activations_MB": mb(peak - weights - grads - states - shadows),
    }


def random_text(batch: int, generator: torch.Generator) -> TextEncoding:
    """BATCH random text encodings of SD3's widths (77 tokens per encoder)."""
    rand = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    return TextEncoding(
        rand(batch, 77, SD3_TEXT_DIMS["clip_l"]),
        rand(batch, 768),
        rand(batch, 77, SD3_TEXT_DIMS["clip_g"]),
        rand(batch, 1280),
        rand(batch, 77, SD3_TEXT_DIMS["t5"]),
        torch.ones(batch, 77),
    )


def released_counts(
    rank: int, targets: list[str] = LORA_BLOCK_LINEARS
) -> dict[str, dict[str, float]]:
    """Exact parameter counts of SD3.5-M/-L (on the meta device) and of a rank-R LoRA on the
    block linears named by TARGETS (default: every one)."""
    counts = {}
    for name in RELEASED:
        config = released_config(name)
        transformer = build_transformer(config, "meta")
        lora = sum(
            rank * (m.in_features + m.out_features)
            for n, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear)
            and n.startswith("transformer_blocks.")
            and any(n.endswith("." + s) for s in targets)
        )
        counts[name] = {
            "params": sum(p.numel() for p in transformer.parameters()),
            "lora": lora,
            "depth": config["num_layers"],
            "hidden": 64 * config["num_attention_heads"],
        }
    return counts


# Bytes per base parameter (P) and per LoRA parameter (Q) that sit in memory for a whole step:
# weights + gradients + optimizer states (AdamW: 2 fp32 moments; 8-bit: 2 bytes) + EMA shadow (fp32).
STATIC = {
    "full fp32 (AdamW + EMA)": (4 + 4 + 8 + 4, 0),
    "LoRA, fp32 base": (4, 4 + 4 + 8 + 4),
    "LoRA, bf16 base": (2, 4 + 4 + 8 + 4),
    "LoRA, bf16 base, 8-bit AdamW": (2, 4 + 4 + 2 + 4),
    "LoRA, bf16 base, 8-bit AdamW, grad checkpointing": (2, 4 + 4 + 2 + 4),
}


def extrapolate(rows: list[dict], counts: dict, side: int = 128, batch: int = 1) -> str:
    """Markdown: bytes = a*P + b*Q + alpha * L * T * D, alpha (activation bytes per layer, token and
    channel) fitted per mode on the measured run, T = batch * ((side/2)^2 + 154) tokens."""
    measured = rows[0]
    d = 64 * measured["depth"]
    fit = measured["depth"] * measured["tokens"] * d
    lines = [
        "| mode | alpha (B) | " + " | ".join(f"{n} static / total (GiB)" for n in counts) + " |",
        "| --- | --- | " + " | ".join("---" for _ in counts) + " |",
    ]
    for row in rows:
        a, b = STATIC[row["mode"]]
        alpha = row["activations_MB"] * 2**20 / fit
        cells = []
        for c in counts.values():
            static = a * c["params"] + b * c["lora"]
            activations = alpha * c["depth"] * batch * ((side // 2) ** 2 + 154) * c["hidden"]
            cells.append(f"{static / 2**30:.1f} / {(static + activations) / 2**30:.1f}")
        lines.append(f"| {row['mode']} | {alpha:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--side", type=int, default=64, help="latent side (64: 512^2 images)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--mode", choices=list(MODES), help="one mode in this process")
    parser.add_argument("--released", action="store_true", help="print SD3.5 parameter counts")
    parser.add_argument(
        "--extrapolate",
        help="JSON lines of a finished run: print the SD3.5 table (1024^2, batch 1)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.extrapolate:
        lines = Path(args.extrapolate).read_text().splitlines()
        rows = [json.loads(line) for line in lines if '"mode"' in line]
        counts = next(json.loads(line) for line in lines if "SD3.5-medium" in line)
        print(extrapolate(rows, counts))
        return
    if args.released:
        print(json.dumps(released_counts(args.rank)))
        return
    if args.mode:
        print(json.dumps(measure(args.mode, args.depth, args.side, args.batch, args.rank)))
        return
    for mode in MODES:
        command = [
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
        result = subprocess.run(command, check=True, capture_output=True, text=True)
        print(result.stdout.strip().splitlines()[-1], flush=True)
    command = [sys.executable, __file__, "--released", "--rank", str(args.rank)]
    print(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
