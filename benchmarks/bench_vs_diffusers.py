"""`t2i train` against diffusers' own SD3 full fine-tune script, side by side in one run.

Both trainers get the same model (SD3 MMDiT, 4 layers, hidden 256 = 9.0M parameters, with the
tiny kit's random CLIP-L/CLIP-G/T5 and VAE), the same 16 images at 64 px (16x16 latents, 64
image tokens + 77 CLIP + 77 T5), batch 8, lr 1e-4, fp32 (or both at bf16 autocast with
`--mixed-precision bf16`), one thread. Ours reads the images
pre-encoded by `t2i precompute`; the peer VAE-encodes its batch at every step, as it does by
default. Steady-state steps/s = (40 - 10) / (time of a 40-step process - time of a 10-step
process), so start-up, loading and saving cancel; measured on the wall clock and on the processes'
own CPU time (both trainers run one thread; CPU time is the steadier figure on a shared machine).
Each repeat runs both short processes, then both long ones, and flips the order every repeat;
one untimed short run of each comes first (it fills the OS file cache and, with `--compile`,
torch.compile's on-disk cache, so compiling is not counted as steps).

    python benchmarks/bench_vs_diffusers.py --peer PATH/train_dreambooth_sd3.py \
        --shim PATH/shim [--repeats 3] [--work DIR]

The peer script is run as given, from its own path; nothing of it is copied here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "a photo of sks thing"


def prepare(work: Path) -> tuple[Path, Path, Path]:
    """(model folder, images-only folder, pre-encoded set) under WORK; reused when present."""
    import numpy as np
    from diffusers import StableDiffusion3Pipeline

    from model.build import build_tiny_components
    from model.config import PrecomputeConfig
    from model.precompute import run_precompute

    sys.path.insert(0, str(ROOT / "tests"))
    from train_sets import shape_image, write_store

    model, images, encoded = work / "model", work / "images", work / "encoded"
    if not (model / "model_index.json").is_file():
        StableDiffusion3Pipeline(**build_tiny_components(0, "d4")).save_pretrained(model)
    if not (encoded / "manifest.json").is_file():
        rng = np.random.default_rng(0)
        colours, shapes = ("red", "green", "blue", "yellow"), ("circle", "square")
        pictures = [shape_image(colours[k % 4], shapes[k // 4 % 2], 64, rng) for k in range(16)]
        images.mkdir(parents=True, exist_ok=True)
        for k, picture in enumerate(pictures):
            picture.save(images / f"{k:02d}.png")
        store = write_store(work / "store", pictures, [PROMPT] * 16, [None] * 16)
        run_precompute(
            store, encoded, PrecomputeConfig(model=str(model), resolution=64, t5_length=77)
        )
    return model, images, encoded


def environment(extra_path: str | None) -> dict[str, str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "ACCELERATE_USE_CPU": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env["PYTHONPATH"] = extra_path or str(ROOT)
    return env


def peer_command(args, model: Path, images: Path, steps: int, out: Path) -> list[str]:
    return [
        sys.executable,
        str(args.peer),
        "--pretrained_model_name_or_path",
        str(model),
        "--instance_data_dir",
        str(images),
        "--instance_prompt",
        PROMPT,
        "--resolution",
        "64",
        "--train_batch_size",
        "8",
        "--max_train_steps",
        str(steps),
        "--learning_rate",
        "1e-4",
        "--mixed_precision",
        args.mixed_precision,
        "--weighting_scheme",
        "logit_normal",
        "--seed",
        "0",
        "--output_dir",
        str(out),
    ]


def ours_command(
    args, model: Path, encoded: Path, steps: int, out: Path, extra: list[str]
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "flows.cli",
        "train",
        str(encoded),
        str(out),
        "--model",
        str(model),
        "--batch-size",
        "8",
        "--max-steps",
        str(steps),
        "--lr",
        "1e-4",
        "--warmup-steps",
        "0",
        "--val-fraction",
        "0",
        "--sample-count",
        "0",
        "--checkpoint-every",
        "0",
        "--log-every",
        "1000",
        "--mixed-precision",
        args.mixed_precision,
        "--device",
        "cpu",
        *extra,
    ]


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one whole process; CPU time is what the process itself
    used, so other jobs on a shared machine disturb it much less than the wall clock."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{command[1]} failed:\n{result.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--peer", type=Path, required=True, help="diffusers' train_dreambooth_sd3.py"
    )
    parser.add_argument(
        "--shim", type=Path, help="folder put first on the peer's PYTHONPATH (torchvision stand-in)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, nargs=2, default=(10, 40), help="short and long run")
    parser.add_argument(
        "--work", type=Path, help="folder for the model, images and runs (default: a temp dir)"
    )
    parser.add_argument(
        "--mixed-precision",
        choices=("no", "bf16"),
        default="no",
        help="both trainers: fp32, or bf16 autocast with fp32 weights (CPUs with AVX512-BF16/AMX)",
    )
    parser.add_argument(
        "--ours-extra",
        action="append",
        help="a variant of `t2i train` to time, as extra flags (repeatable: '' and '--compile' "
        "time both in one run); default: one plain variant",
    )
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-vs-diffusers-"))
    model, images, encoded = prepare(work)
    short, long = args.steps
    peer_env = environment(f"{args.shim}:{ROOT}" if args.shim else None)
    ours_env = environment(None)
    variants = {("t2i " + extra).strip(): extra.split() for extra in args.ours_extra or [""]}
    runners = {"peer": lambda n, out: timed(peer_command(args, model, images, n, out), peer_env)}
    for name, extra in variants.items():
        runners[name] = lambda n, out, extra=extra: timed(
            ours_command(args, model, encoded, n, out, extra), ours_env
        )
    names = list(runners)
    rates = {clock: {name: [] for name in names} for clock in ("wall", "cpu")}
    shutil.rmtree(work / "runs", ignore_errors=True)  # a finished run would be skipped, not timed
    for index, runner in enumerate(runners.values()):  # untimed: file caches, compile's cache
        runner(short, work / "runs" / f"warmup-{index}")
    for repeat in range(args.repeats):
        # Alternate at the finest grain: every short run, then every long run; order flipped each repeat.
        order = names if repeat % 2 == 0 else names[::-1]
        times: dict[str, dict[int, tuple[float, float]]] = {name: {} for name in order}
        for n in (short, long):
            for name in order:
                folder = work / "runs" / f"{names.index(name)}-{repeat}-{n}"
                times[name][n] = runners[name](n, folder)
        for name in order:
            for k, clock in enumerate(("wall", "cpu")):
                rates[clock][name].append(
                    (long - short) / (times[name][long][k] - times[name][short][k])
                )
            print(
                json.dumps(
                    {
                        "repeat": repeat,
                        "trainer": name,
                        "wall_s": {n: round(t[0], 2) for n, t in times[name].items()},
                        "cpu_s": {n: round(t[1], 2) for n, t in times[name].items()},
                        "steps_per_s_wall": round(rates["wall"][name][-1], 3),
                        "steps_per_s_cpu": round(rates["cpu"][name][-1], 3),
                    }
                ),
                flush=True,
            )
    summary: dict[str, object] = {
        "work": str(work),
        "repeats": args.repeats,
        "mixed_precision": args.mixed_precision,
    }
    for clock, by_name in rates.items():
        peer = by_name["peer"]
        summary[clock] = {
            name: {
                "steps_per_s": round(statistics.median(values), 3),
                "range": [round(min(values), 3), round(max(values), 3)],
                "ratio_of_medians": round(statistics.median(values) / statistics.median(peer), 3),
                "ratio_per_repeat": [round(a / b, 3) for a, b in zip(values, peer, strict=True)],
            }
            for name, values in by_name.items()
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
