"""One full `t2i train` step at SD3-medium size on whatever device is present: s/step, tokens/s, MFU.

The step is the trainer's own: `training_loss` (logit-normal t, encoder drop, velocity MSE) under
bf16 autocast with fp32 master weights, backward, grad-norm clip, fused AdamW (eps 1e-15), the
foreach EMA update; TF32 for fp32 matmuls, PyTorch SDPA attention (flash on GPUs), optionally
torch.compile. Inputs are random pre-encoded tensors of SD3's widths (CLIP-L 768, CLIP-G 1280,
T5 4096, 16 latent channels, VAE factor 8), so no encoder or VAE is loaded.

MFU = FLOPs of one step (forward + backward, counted by torch's FlopCounterMode) x steps/s /
the device's own GEMM rate, measured in this process in the autocast dtype (bf16 on GPUs, fp32
on CPU). SD3 paper Table 7 reference: 568 ms/it at batch 32 per device for the 2B model at 256^2.

    python benchmarks/gpu_step.py                    # d24 at 256^2 batch 8 and 1024^2 batch 1
    python benchmarks/gpu_step.py --compile          # the same with torch.compile
    python benchmarks/gpu_step.py --smoke            # CPU-sized check of the script itself
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.build import build_transformer  # noqa: E402
from model.conditioning import TextEncoding  # noqa: E402
from model.ema import EMA  # noqa: E402
from model.objective import FlowSettings, draw_noise_and_time, training_loss  # noqa: E402
from model.presets import SD3_TEXT_DIMS, mmdit_config  # noqa: E402

SD3_TABLE7 = {"s_per_step": 0.568, "batch": 32, "resolution": 256, "params": "2B"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Measured FLOP/s of an n x n x n GEMM in DTYPE on DEVICE."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def random_batch(
    batch: int, latent: int, t5_tokens: int, channels: int, device: torch.device, dims: dict
):
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    text = TextEncoding(
        rand(batch, 77, dims["clip_l"]),
        rand(batch, dims["clip_l_pooled"]),
        rand(batch, 77, dims["clip_g"]),
        rand(batch, dims["clip_g_pooled"]),
        rand(batch, t5_tokens, dims["t5"]),
        torch.ones(batch, t5_tokens, device=device),
    )
    return rand(batch, channels, latent, latent), text


def measure(
    depth: int,
    resolution: int,
    batch: int,
    steps: int,
    device: torch.device,
    compile_model: bool,
    t5_tokens: int = 77,
    dims: dict | None = None,
    gemm_n: int = 8192,
) -> dict:
    dims = dims or {**SD3_TEXT_DIMS, "clip_l_pooled": 768, "clip_g_pooled": 1280}
    config = mmdit_config(
        depth,
        joint_attention_dim=dims["t5"],
        pooled_projection_dim=dims["clip_l_pooled"] + dims["clip_g_pooled"],
    )
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 outside autocast
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = build_transformer(config, device).train()  # fp32 master weights
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, eps=1e-15, fused=device.type in ("cuda", "cpu")
    )
    ema = EMA(model, 0.9999)
    latent = resolution // 8
    latents, text = random_batch(batch, latent, t5_tokens, config["in_channels"], device, dims)
    settings = FlowSettings()
    runner = torch.compile(model) if compile_model else model

    def loss_of(j: int) -> torch.Tensor:
        with torch.autocast(
            device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32
        ):
            return training_loss(
                runner, latents, text, draw_noise_and_time(latents, settings, 0, j), settings
            )

    def step(j: int) -> None:
        loss_of(j).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)

    started = time.perf_counter()
    for j in range(2):  # warm-up (and compilation)
        step(j)
    sync(device)
    warmup_s = time.perf_counter() - started
    counter = FlopCounterMode(display=False)
    with counter:
        loss_of(2).backward()
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    sync(device)
    start = time.perf_counter()
    for j in range(steps):
        step(j + 3)
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = gemm_rate(device, autocast_dtype, gemm_n, 20 if device.type == "cuda" else 3)
    tokens = batch * ((latent // 2) ** 2 + 77 + t5_tokens)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "depth": depth,
        "hidden": 64 * depth,
        "params_B": round(params / 1e9, 3),
        "resolution": resolution,
        "batch": batch,
        "tokens_per_sample": tokens // batch,
        "compile": compile_model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(autocast_dtype).removeprefix("torch."),
        "warmup_s": round(warmup_s, 2),
        "s_per_step": round(seconds, 4),
        "tokens_per_s": round(tokens / seconds, 1),
        "samples_per_s": round(batch / seconds, 2),
        "TFLOP_per_step": round(flops / 1e12, 4),
        "achieved_TFLOPs": round(flops / seconds / 1e12, 3),
        "gemm_TFLOPs": round(peak / 1e12, 3),
        "MFU": round(flops / seconds / peak, 4),
        "peak_memory_GiB": round(memory, 2) if memory else None,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--depth", type=int, default=24, help="MMDiT depth (24 = SD3-medium widths)"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    parser.add_argument(
        "--smoke", action="store_true", help="CPU-sized: depth 2, 64 px, 2 steps, small GEMM"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.smoke:
        settings = [
            dict(
                depth=2,
                resolution=64,
                batch=2,
                steps=2,
                gemm_n=256,
                t5_tokens=8,
                dims={
                    "clip_l": 32,
                    "clip_g": 48,
                    "t5": 96,
                    "clip_l_pooled": 32,
                    "clip_g_pooled": 48,
                },
            )
        ]
    else:
        settings = [
            dict(depth=args.depth, resolution=256, batch=8, steps=args.steps),
            dict(depth=args.depth, resolution=1024, batch=1, steps=args.steps),
        ]
    results = []
    for setting in settings:
        result = measure(device=device, compile_model=args.compile, **setting)
        if result["resolution"] == 256 and not args.smoke:
            # Table 7's batch 32 at this rate, if the step time scaled linearly with the batch.
            result["sd3_table7_s_per_step"] = SD3_TABLE7["s_per_step"]
            result["this_at_batch_32_s"] = round(result["s_per_step"] * 32 / result["batch"], 3)
        print(json.dumps(result), flush=True)
        results.append(result)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    main()
