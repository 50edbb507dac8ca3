"""Training throughput and model FLOPs utilisation (MFU) of the rectified-flow step.

MFU = (FLOPs of one training step, counted by torch's FlopCounterMode over forward + backward)
x steps/s / the machine's own measured matmul rate (a large fp32 GEMM timed in the same process
and thread count). On CPU both are timed in process CPU time, so other jobs on a shared machine
barely move the ratio; `--breakdown` adds where the step's time goes (GEMMs, attention, the rest). Peak memory: the process's peak RSS on CPU (each model runs in a fresh
process), torch.cuda.max_memory_allocated on GPU.

    python benchmarks/bench_train.py                        # tiny and d4 (hidden 256) at batch 8
    python benchmarks/bench_train.py --model d4 --steps 5   # one model, in this process
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.build import build_transformer  # noqa: E402
from model.conditioning import TextEncoding  # noqa: E402
from model.objective import FlowSettings, draw_noise_and_time, training_loss  # noqa: E402
from model.presets import SD3_TEXT_DIMS, mmdit_config, tiny_mmdit_config  # noqa: E402

# name -> (transformer config, latent side, T5 tokens, CLIP-L / CLIP-G widths and pooled widths)
MODELS = {
    "tiny": (tiny_mmdit_config(), 16, 77, 32, 48, 32, 48),
    "d4": (mmdit_config(4), 32, 256, SD3_TEXT_DIMS["clip_l"], SD3_TEXT_DIMS["clip_g"], 768, 1280),
}


def clock(device: torch.device):
    """This process's CPU time on CPU (steady on a shared machine: other jobs do not count), the
    wall clock on GPUs."""
    return time.process_time if device.type == "cpu" else time.perf_counter


def matmul_rate(device: torch.device, n: int = 1024, repeats: int = 20) -> float:
    """Measured fp32 FLOP/s of an n x n GEMM on this device."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    now = clock(device)
    start = now()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (now() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def synthetic_batch(name: str, batch: int, device: torch.device):
    config, side, t5_len, d_l, d_g, p_l, p_g = MODELS[name]
    generator = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=generator).to(device)  # noqa: E731
    text = TextEncoding(
        rand(batch, 77, d_l),
        rand(batch, p_l),
        rand(batch, 77, d_g),
        rand(batch, p_g),
        rand(batch, t5_len, config["joint_attention_dim"]),
        torch.ones(batch, t5_len, device=device),
    )
    return rand(batch, config["in_channels"], side, side), text


GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
ATTENTION_OPS = ("aten::_scaled_dot_product", "aten::_flash_attention")


def time_breakdown(step, j: int) -> dict:
    """Where a step's time goes (torch.profiler self time): GEMMs, attention, the rest; and the
    FLOP rate inside the GEMMs themselves (what the model's matrix shapes reach on this machine)."""
    from torch.profiler import profile

    with profile(with_flops=True) as prof:
        step(j)
    gemm_us = attention_us = total_us = 0.0
    gemm_flops = 0
    for event in prof.key_averages():
        total_us += event.self_cpu_time_total
        if event.key in GEMM_OPS:
            gemm_us += event.self_cpu_time_total
            gemm_flops += event.flops
        elif event.key.startswith(ATTENTION_OPS):
            attention_us += event.self_cpu_time_total
    return {
        "gemm_share": round(gemm_us / total_us, 3),
        "attention_share": round(attention_us / total_us, 3),
        "other_share": round(1 - (gemm_us + attention_us) / total_us, 3),
        "GFLOPs_inside_gemms": round(gemm_flops / (gemm_us * 1e-6) / 1e9, 2) if gemm_us else None,
    }


def bench(
    name: str, batch: int, steps: int, device: torch.device, breakdown_wanted: bool = False
) -> dict:
    torch.manual_seed(0)
    model = build_transformer(MODELS[name][0], device).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, eps=1e-15, fused=True
    )  # as the trainer
    latents, text = synthetic_batch(name, batch, device)
    settings = FlowSettings()

    def step(j: int) -> None:
        loss = training_loss(
            model, latents, text, draw_noise_and_time(latents, settings, 0, j), settings
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(0)  # warm-up
    counter = FlopCounterMode(display=False)
    with counter:
        loss = training_loss(
            model, latents, text, draw_noise_and_time(latents, settings, 0, 1), settings
        )
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    peak_rate = matmul_rate(device)
    sync(device)
    now = clock(device)
    start = now()
    for j in range(steps):
        step(j + 2)
    sync(device)
    seconds = (now() - start) / steps
    breakdown = time_breakdown(step, steps + 2) if breakdown_wanted else None
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device)
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "model": name,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "batch": batch,
        "tokens": (MODELS[name][1] // 2) ** 2 + 77 + MODELS[name][2],
        "step_s": round(seconds, 4),
        "steps_per_s": round(1 / seconds, 2),
        "train_GFLOP_per_step": round(flops / 1e9, 3),
        "achieved_GFLOPs": round(flops / seconds / 1e9, 2),
        "matmul_GFLOPs": round(peak_rate / 1e9, 2),
        "MFU": round(flops / seconds / peak_rate, 4),
        "peak_memory_MB": round(peak_mem / 2**20, 1),
        "device": str(device),
        "threads": torch.get_num_threads(),
        **({"breakdown": breakdown} if breakdown else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        choices=sorted(MODELS),
        help="one model in this process; default: each in its own",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="profile one more step: GEMM/attention/other shares",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        result = bench(
            args.model, args.batch, args.steps, torch.device(args.device), args.breakdown
        )
        print(json.dumps(result))
        return
    for name in ("tiny", "d4"):
        steps = args.steps if name == "d4" else args.steps * 10
        command = [
            sys.executable,
            __file__,
            "--model",
            name,
            "--batch",
            str(args.batch),
            "--steps",
            str(steps),
            "--device",
            args.device,
            "--threads",
            str(args.threads),
        ] + (["--breakdown"] if args.breakdown else [])
        print(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
