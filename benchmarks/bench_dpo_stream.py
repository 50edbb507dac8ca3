"""Peak memory of `t2i dpo` training on N pre-encoded pairs: flat in N (issue 11, item 6).

Builds the tiny offline model and a generic preference parquet of N pairs (distinct 64x64 noise
PNGs, one caption each), encodes it once (a first `run_dpo`, not measured), then measures a
second `run_dpo` on the same pairs with another learning rate (so it trains again from the
shared encoded set) in a fresh process: its peak RSS (ru_maxrss), the peak above its post-import
baseline, and the peaks of its anonymous memory (heap) and of its file-backed resident pages
(sampled every 20 ms): the shards are memory-mapped, so rows the run reads stay resident as
file pages until the kernel needs them back. The held-out set is a fixed 40 pairs at every size
(--heldout-fraction 40 / N) so both sizes evaluate the same amount. Sizes alternate across repeats.

    python benchmarks/bench_dpo_stream.py [--sizes 500 5000] [--repeats 2] [--steps 20] [--work DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def resident_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def write_pairs(path: Path, pairs: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)

    def png() -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            buffer, format="PNG"
        )
        return buffer.getvalue()

    schema = pa.schema(
        [("caption", pa.string()), ("image_w", pa.binary()), ("image_l", pa.binary())]
    )
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, pairs, 200):
            rows = [
                {"caption": f"a noisy square number {i}", "image_w": png(), "image_l": png()}
                for i in range(start, min(start + 200, pairs))
            ]
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def one_run(model: str, prefs: str, output: str, lr: float, steps: int, pairs: int) -> dict:
    import threading

    import torch

    peaks = {"RssAnon": 0.0, "RssFile": 0.0}

    def watch() -> None:
        while True:
            for field in peaks:
                peaks[field] = max(peaks[field], _status_mb(field))
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()

    torch.set_num_threads(1)
    from dpo.config import DPOConfig
    from dpo.trainer import run_dpo

    baseline = resident_mb()
    start = time.monotonic()
    config = DPOConfig(
        model=model,
        max_steps=steps,
        batch_size=4,
        lora_rank=4,
        lora_alpha=4,
        lr=lr,
        device="cpu",
        heldout_fraction=40 / pairs,
        checkpoint_every=max(1, steps // 2),
        log_every=steps,
    )
    run_dpo(prefs, output, config)
    seconds = time.monotonic() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = json.loads((Path(output) / "summary.json").read_text())
    return {
        "peak_rss_mb": round(peak, 1),
        "baseline_mb": round(baseline, 1),
        "above_baseline_mb": round(peak - baseline, 1),
        "peak_anon_mb": round(peaks["RssAnon"], 1),
        "peak_file_mb": round(peaks["RssFile"], 1),
        "heldout_pairs": summary["heldout_pairs"],
        "seconds": round(seconds, 1),
        "train_pairs": summary["train_pairs"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 5000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--work", default=None)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, prefs, output, lr, pairs = args.child
        print(json.dumps(one_run(model, prefs, output, float(lr), args.steps, int(pairs))))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-dpo-stream-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    model = work / "model"
    if not model.is_dir():
        from model.build import init_model

        init_model(model, "tiny")

    def child(prefs: Path, output: Path, lr: float, pairs: int) -> dict:
        command = [
            sys.executable,
            __file__,
            "--steps",
            str(args.steps),
            "--child",
            str(model),
            str(prefs),
            str(output),
            str(lr),
            str(pairs),
        ]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        return json.loads(done.stdout.strip().splitlines()[-1])

    for size in args.sizes:
        prefs = work / f"pairs-{size}.parquet"
        if not prefs.is_file():
            write_pairs(prefs, size)
        first = child(prefs, work / f"encode-{size}", 1e-3, size)  # encodes into .lora-*.work
        print(json.dumps({"pairs": size, "encoding_run": first}), flush=True)
    results: dict[int, list[dict]] = {size: [] for size in args.sizes}
    for repeat in range(args.repeats):
        for size in args.sizes:
            # the same output folder name, so the run finds the encoded set; a new lr: trains again
            result = child(
                work / f"pairs-{size}.parquet", work / f"encode-{size}", 2e-3 + repeat * 1e-3, size
            )
            results[size].append(result)
            print(json.dumps({"pairs": size, "repeat": repeat, **result}), flush=True)
    small, large = min(args.sizes), max(args.sizes)
    ratio = max(r["peak_rss_mb"] for r in results[large]) / min(
        r["peak_rss_mb"] for r in results[small]
    )
    print(json.dumps({"worst_peak_ratio": round(ratio, 3), "sizes": [small, large]}))


if __name__ == "__main__":
    main()
