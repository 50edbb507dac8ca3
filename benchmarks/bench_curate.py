"""Benchmark: end-to-end images/s of `t2i curate` against its slowest scorer run alone.

Builds N distinct ~512 px JPEGs from the real demo photographs (crops at random scales and
offsets, random flips and colour jitter), then times on the same files:
  1. each scorer alone (open_nsfw, BRISQUE quality, EfficientNet-Lite0 embedding), 1 process,
     decode included, to find the slowest;
  2. the slowest scorer alone in W worker processes (one thread each), decode included;
  3. `run_curate` with W workers, end to end (ingest, validation, all scorers, pHash, dedup,
     writing the tables and the report), wall clock.

    python benchmarks/bench_curate.py --n 160 --workers 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate.config import CurateConfig  # noqa: E402
from curate.decode import to_rgb  # noqa: E402
from curate.stage import run_curate  # noqa: E402

SCORERS = ("opennsfw", "brisque", "efficientnet_lite0")


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    from curate.demo_data import SOURCES, _to_pil

    rng = np.random.default_rng(seed)
    photos = [_to_pil(load()).convert("RGB") for _, load, _ in SOURCES]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        scale = rng.uniform(0.45, 0.9)
        cw, ch = int(w * scale), int(h * scale)
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image = photo.crop((x, y, x + cw, y + ch)).resize((512, int(512 * ch / cw)))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) * rng.uniform(0.8, 1.2, 3)
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
        path = folder / f"img{i:05d}.jpg"
        image.save(path, "JPEG", quality=90)
        path.with_suffix(".txt").write_text(f"image {i}")
        paths.append(path)
    return paths


def _scorer(kind: str):
    import torch

    torch.set_num_threads(1)
    if kind == "opennsfw":
        from curate.nsfw import OpenNSFW

        return OpenNSFW()
    if kind == "brisque":
        from curate.aesthetic import BrisqueQuality

        return BrisqueQuality()
    from curate.embed import EfficientNetLite0

    return EfficientNetLite0()


_MODEL = None


def _init(kind: str) -> None:
    global _MODEL
    _MODEL = _scorer(kind)


def _score(paths: list[str]) -> int:
    images = [to_rgb(Path(p).read_bytes()) for p in paths]
    _MODEL(images)
    return len(images)


def scorer_alone(kind: str, paths: list[Path], workers: int, batch: int = 16) -> float:
    """Images/s of one scorer (decode included); model loading is not timed."""
    chunks = [[str(p) for p in paths[i : i + batch]] for i in range(0, len(paths), batch)]
    if workers == 1:
        _init(kind)
        started = time.monotonic()
        done = sum(_score(c) for c in chunks)
        return done / (time.monotonic() - started)
    with multiprocessing.get_context("spawn").Pool(
        workers, initializer=_init, initargs=(kind,)
    ) as pool:
        pool.map(_score, [chunks[0][:1]] * workers)  # models loaded in every worker
        started = time.monotonic()
        done = sum(pool.map(_score, chunks, chunksize=1))
        return done / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=160)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=16,
        help="curate's chunk size (small, so both workers stay busy on a short run)",
    )
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-curate-"))
    try:
        paths = make_images(root / "in", args.n)
        single = {kind: round(scorer_alone(kind, paths, 1), 2) for kind in SCORERS}
        slowest = min(single, key=single.get)
        parallel = round(scorer_alone(slowest, paths, args.workers), 2)
        started = time.monotonic()
        out = run_curate(
            root / "in",
            root / "out",
            CurateConfig(workers=args.workers, chunk_size=args.chunk_size),
        )
        curate_wall = time.monotonic() - started
        manifest = json.loads((out / "manifest.json").read_text())
        figures = {
            "n": args.n, "workers": args.workers, "chunk_size": args.chunk_size,
            "scorer_alone_1proc_img_s": single, "slowest": slowest,
            f"{slowest}_alone_{args.workers}proc_img_s": parallel,
            "curate_end_to_end_img_s": round(args.n / curate_wall, 2),
            "curate_end_to_end_s": round(curate_wall, 1),
            "curate_scoring_phase_img_s": manifest["extra"]["images_per_s"],
            "ratio_end_to_end_vs_slowest_same_workers": round(args.n / curate_wall / parallel, 3),
            "ratio_scoring_phase_vs_slowest_same_workers": round(manifest["extra"]["images_per_s"] / parallel, 3),
            "curate_startup_s": manifest["extra"]["startup_s"],
            "curate_steady_img_s": manifest["extra"]["steady_images_per_s"],
            "ratio_steady_vs_slowest_same_workers": round((manifest["extra"]["steady_images_per_s"] or 0) / parallel, 3),
            "kept": manifest["counts"]["kept"], "rejected": manifest["counts"]["rejected"],
        }  # fmt: skip
        print(json.dumps(figures, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
