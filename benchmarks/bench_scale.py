"""Benchmark: how curate, caption and precompute grow with the number of images.

For each N, writes N distinct small synthetic JPEGs (with captions), then runs the chain
curate -> caption (tiny random VLM) -> precompute (tiny random SD3 kit), each stage as its own
`t2i` process, and records its wall time and peak RSS: of the stage's driver process, and of
its whole process tree (driver plus worker processes, sampled every 0.2 s). The goal: time
linear in N, peak RSS at the largest N within 1.25x of the smallest.

Then, on the smallest N, curate on a local Dask cluster of 1 and of 2 workers (`--dask-workers`),
alternated REPEATS times in this one run, for the speed-up ratio.

    PYTHONPATH=. python benchmarks/bench_scale.py --n 1000 2000 4000 --json scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The stage's own work at tiny model cost: no NSFW or quality scorer, a tiny random CLIP as the
# dedup embedder (decode, validation, pHash, thumbnails, dedup and the tables all run as usual).
CURATE = [
    "--nsfw-detector",
    "none",
    "--aesthetic-scorer",
    "none",
    "--embedder",
    "clip",
    "--similarity-threshold",
    "1.0",
    "--phash-distance",
    "0",
    "--workers",
    "1",
]
CAPTION = ["--max-new-tokens", "8", "--batch-size", "16", "--chunk-size", "256"]
PRECOMPUTE = ["--resolution", "64", "--batch-size", "16", "--shard-size", "256"]


def make_images(folder: Path, n: int, side: int = 160, seed: int = 0) -> None:
    """N distinct images: a smooth random colour field, shapes and noise, as JPEGs with a caption."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        field = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        image = Image.fromarray(field).resize((side, side), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x0, y0 = rng.integers(0, side - 20, 2)
            x1, y1 = x0 + rng.integers(10, side // 2), y0 + rng.integers(10, side // 2)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
        noisy = np.asarray(image, np.int16) + rng.integers(-12, 13, (side, side, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
            folder / f"img{i:06d}.jpg", quality=85
        )
        (folder / f"img{i:06d}.txt").write_text(f"shapes on a coloured ground, number {i}")


def write_tiny_clip(folder: Path) -> str:
    """A random 2-layer CLIP image tower (32 px, 16-d embeddings), from its config."""
    from curate.clip import TINY_CLIP_VISION, init_clip_vision

    return str(init_clip_vision(folder, **TINY_CLIP_VISION))


def run(argv: list[str], log: Path) -> dict[str, float]:
    """Run `t2i ARGV`; wall seconds and peak RSS (driver, and driver plus descendants) in MiB."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    with log.open("w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *argv],
            cwd=ROOT,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        driver = tree = 0
        watched = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                processes = [watched, *watched.children(recursive=True)]
                sizes = [p.memory_info().rss for p in processes]
            except psutil.Error:
                sizes = []
            if sizes:
                driver, tree = max(driver, sizes[0]), max(tree, sum(sizes))
            time.sleep(0.2)
    wall = time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError(f"t2i {' '.join(argv)} failed:\n{log.read_text()[-3000:]}")
    mib = 1024 * 1024
    return {
        "wall_s": round(wall, 1),
        "driver_mib": round(driver / mib),
        "tree_mib": round(tree / mib),
    }


def chain(root: Path, n: int, model: str, captioner: str) -> dict[str, dict[str, float]]:
    curate = [*CURATE, "--clip-model", str(root / "clip")]
    raw, logs = root / f"raw-{n}", root / "logs"
    logs.mkdir(exist_ok=True)
    make_images(raw, n)
    figures = {}
    curated, captioned, encoded = (root / f"{stage}-{n}" for stage in ("cur", "cap", "enc"))
    figures["curate"] = run(["curate", str(raw), str(curated), *curate], logs / f"curate-{n}.log")
    figures["caption"] = run(
        ["caption", str(curated), str(captioned), "--model", captioner, *CAPTION],
        logs / f"caption-{n}.log",
    )
    figures["precompute"] = run(
        ["precompute", str(captioned), str(encoded), "--model", model, *PRECOMPUTE],
        logs / f"precompute-{n}.log",
    )
    kept = json.loads((curated / "manifest.json").read_text())["counts"]["kept"]
    figures["curate"]["kept"] = kept
    for path in (captioned, encoded):
        shutil.rmtree(path, ignore_errors=True)
    return figures


def dask_ratio(root: Path, n: int, repeats: int) -> dict[str, object]:
    """curate on a local Dask cluster of 1 and of 2 workers, alternated; seconds per run."""
    raw, logs = root / f"raw-{n}", root / "logs"
    times: dict[int, list[float]] = {1: [], 2: []}
    for repeat in range(repeats):
        for workers in (1, 2):
            out = root / f"dask-{workers}-{repeat}"
            argv = [
                "curate",
                str(raw),
                str(out),
                *CURATE[:-2],
                "--clip-model",
                str(root / "clip"),
                "--dask-workers",
                str(workers),
                "--chunk-size",
                "32",
            ]
            times[workers].append(run(argv, logs / f"dask-{workers}-{repeat}.log")["wall_s"])
            shutil.rmtree(out, ignore_errors=True)
    best = {w: min(t) for w, t in times.items()}
    return {"n": n, "seconds": times, "speedup_2_vs_1": round(best[1] / best[2], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--repeats", type=int, default=2, help="alternated 1- and 2-worker runs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        model, captioner = str(root / "model"), str(root / "vlm")
        run(["init-model", model, "--preset", "tiny"], root / "init-model.log")
        run(["init-captioner", captioner, "--preset", "tiny"], root / "init-captioner.log")
        write_tiny_clip(root / "clip")
        results: dict[str, object] = {"n": {}}
        for n in args.n:
            results["n"][n] = chain(root, n, model, captioner)
            print(json.dumps({n: results["n"][n]}), flush=True)
            if args.json:  # what is finished survives an interrupted run
                Path(args.json).write_text(json.dumps(results, indent=1))
        results["dask"] = dask_ratio(root, min(args.n), args.repeats)
        print(json.dumps(results["dask"]), flush=True)
        smallest, largest = min(args.n), max(args.n)
        results["growth"] = {
            stage: {
                "time_per_image_ratio": round(
                    results["n"][largest][stage]["wall_s"]
                    / largest
                    / (results["n"][smallest][stage]["wall_s"] / smallest),
                    2,
                ),
                "peak_driver_rss_ratio": round(
                    results["n"][largest][stage]["driver_mib"]
                    / results["n"][smallest][stage]["driver_mib"],
                    2,
                ),
            }
            for stage in ("curate", "caption", "precompute")
        }
        print(json.dumps(results["growth"], indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
