"""DPO step time and peak memory: adapter-disabled reference vs a separate frozen copy (issue 7, item 8).

Both modes run the same LoRA Diffusion-DPO step (dpo.trainer.dpo_terms, backward, AdamW) on the
same MMDiT (depth d of the SD3 family, SD3's text widths) and batch of random pre-encoded pairs;
only the reference differs (ours, dpo/reference.py, also replays the policy's input layers;
`--attribution` adds ours without that replay). Each mode runs in its own process so peak memory is its own:
CUDA reports torch.cuda.max_memory_allocated, CPU the process's peak resident set size above
what it held after the imports (the model, the step's activations and the optimizer state).

    python benchmarks/bench_dpo.py --depth 8 --latent 32 --batch 2 --steps 5 [--device cuda]
        [--repeats 4] [--targets attention|all-linears] [--attribution]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time

import torch


def resident_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def one_mode(args: argparse.Namespace) -> dict:
    from dpo.config import TARGET_SETS, DPOConfig
    from dpo.encode import EncodedPairs
    from dpo.lora import add_lora, lora_parameters
    from dpo.trainer import dpo_terms
    from model.build import build_transformer
    from model.conditioning import TextEncoding
    from model.presets import SD3_TEXT_DIMS, mmdit_config

    if args.mode == "adapter-disabled-no-replay":  # attribution: the reference reruns every layer
        import dpo.reference

        dpo.reference.STEM = ()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    baseline_mb = resident_mb()  # torch, diffusers and peft imported, nothing built yet
    device = torch.device(args.device)
    config = mmdit_config(args.depth)
    transformer = build_transformer(config, device).eval()
    reference = None
    if args.mode == "frozen-copy":
        reference = copy.deepcopy(transformer).requires_grad_(False)
    add_lora(transformer, args.rank, args.rank, TARGET_SETS[args.targets])
    optimizer = torch.optim.AdamW(lora_parameters(transformer), lr=1e-5)
    b, c, s, t5 = args.batch, config["in_channels"], args.latent, args.t5_tokens
    dims = SD3_TEXT_DIMS
    text = TextEncoding(
        torch.randn(b, 77, dims["clip_l"]),
        torch.randn(b, dims["clip_l"]),
        torch.randn(b, 77, dims["clip_g"]),
        torch.randn(b, dims["clip_g"]),
        torch.randn(b, t5, dims["t5"]),
        torch.ones(b, t5),
    )
    pairs = EncodedPairs(
        [str(i) for i in range(b)], torch.randn(b, c, s, s), torch.randn(b, c, s, s), text
    )
    dpo = DPOConfig(model="-")
    times, cpu_times = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        terms = dpo_terms(
            transformer, pairs, torch.rand(b), torch.randn(b, c, s, s), dpo, reference
        )
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step > 0:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline_mb
    params = sum(p.numel() for n, p in transformer.named_parameters() if "lora_" not in n)
    return {
        "mode": args.mode,
        "step_s_median": sorted(times)[len(times) // 2],
        "step_s_all": [round(t, 3) for t in times],
        "cpu_step_s_median": sorted(cpu_times)[len(cpu_times) // 2],
        "peak_mb": round(peak_mb, 1),
        "base_params_m": round(params / 1e6, 2),
        "lora_params_m": round(sum(p.numel() for p in lora_parameters(transformer)) / 1e6, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depth", type=int, default=8, help="MMDiT depth d (hidden 64 d, d heads)")
    parser.add_argument(
        "--latent", type=int, default=32, help="latent side (32 = 256 px with SD3's VAE)"
    )
    parser.add_argument("--t5-tokens", type=int, default=77)
    parser.add_argument("--batch", type=int, default=2, help="preference pairs per step")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument(
        "--targets",
        choices=sorted(("attention", "all-linears")),
        default="attention",
        help="LoRA targets (t2i dpo's default: attention)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--repeats", type=int, default=1, help="alternate the two modes this many times"
    )
    parser.add_argument(
        "--mode",
        choices=["adapter-disabled", "frozen-copy", "adapter-disabled-no-replay"],
        help=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--attribution",
        action="store_true",
        help="also time the adapter-disabled reference without replaying the input layers",
    )
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args)))
        return
    results = []
    modes = ("adapter-disabled", "frozen-copy")
    if args.attribution:
        modes += ("adapter-disabled-no-replay",)
    for repeat in range(args.repeats):  # alternate, so load changes on a shared machine hit both
        for mode in modes if repeat % 2 == 0 else modes[::-1]:
            argv = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
            argv = [a for a in argv if a != "--attribution"]
            done = subprocess.run(argv, capture_output=True, text=True, check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
