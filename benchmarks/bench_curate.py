"""Benchmark: end-to-end images/s of `t2i curate` against the ceiling its scorers allow.

Builds N distinct ~512 px JPEGs from the real demo photographs (crops at random scales and
offsets, random flips and colour jitter), then times on the same files:
  1. each default scorer alone (open_nsfw, BRISQUE quality, EfficientNet-Lite0 embedding), one
     process, decode included, on the first --alone images; the ceiling of W workers running
     all three is W / (sum of the per-image seconds);
  2. `run_curate` with W local worker processes, end to end (ingest, validation, all scorers,
     pHash, dedup, writing the tables and the report), wall clock;
  3. the same on a Dask cluster of W one-thread workers started beforehand (`dask_address`);
     with --dask-ratio R, also on clusters of 1 and of W workers, alternated R times;
  4. with --clip: a random CLIP ViT-B/32 image tower (from its config, no download) feeding the
     LAION aesthetic head, the CLIP NSFW head and the dedup embedding. Alone, each of the three
     runs its own CLIP forward; curate runs one forward per image and gives it to all three.
     Reported: the three alone, their ceiling as three forwards, and curate end to end.

    python benchmarks/bench_curate.py --n 2000 --workers 2 --clip
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate.config import CurateConfig
from curate.runtime.decode import to_rgb
from curate.stage import run_curate

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


def ceiling(alone: dict[str, float], workers: int) -> float:
    """Images/s of WORKERS processes each running every scorer on every image."""
    return workers / sum(1.0 / rate for rate in alone.values())


def end_to_end(folder: Path, out: Path, config: CurateConfig) -> dict[str, float]:
    started = time.monotonic()
    run_curate(folder, out, config)
    wall = time.monotonic() - started
    extra = json.loads((out / "manifest.json").read_text())["extra"]
    n = json.loads((out / "manifest.json").read_text())["counts"]["input"]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "img_s": round(n / wall, 2),
        "wall_s": round(wall, 1),
        "startup_s": extra["startup_s"],
        "steady_img_s": extra["steady_images_per_s"],
        "executor": extra["executor"],
    }


def dask_cluster(workers: int):
    """A local Dask cluster of WORKERS one-thread worker processes, started before curate runs."""
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        host="127.0.0.1",
    )


def dask_scaling(
    folder: Path, out: Path, config: CurateConfig, workers: int, repeats: int
) -> dict[str, object]:
    """Images/s on a local Dask cluster of 1 worker and of WORKERS, alternated; clusters started beforehand."""
    rates: dict[int, list[float]] = {1: [], workers: []}
    for repeat in range(repeats):
        for size in (1, workers) if repeat % 2 == 0 else (workers, 1):
            with dask_cluster(size) as cluster:
                figures = end_to_end(
                    folder,
                    out,
                    config.model_copy(update={"dask_address": cluster.scheduler_address}),
                )
            rates[size].append(figures["img_s"])
    return {
        "img_s": rates,
        f"speedup_{workers}_vs_1": round(
            statistics.median(rates[workers]) / statistics.median(rates[1]), 2
        ),
    }


def write_clip_kit(folder: Path) -> dict[str, str]:
    """A random CLIP ViT-B/32 image tower and LAION-layout heads for its 512-d embeddings."""
    import torch
    from safetensors.torch import save_file

    from curate.clip import init_clip_vision

    init_clip_vision(  # ViT-B/32's image tower
        folder / "clip",
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
        projection_dim=512,
    )
    dims = [512, 1024, 128, 64, 16, 1]  # LAION aesthetic v2's MLP on a 512-d CLIP
    head = {}
    for index, (a, b) in zip([0, 2, 4, 6, 7], zip(dims[:-1], dims[1:])):
        head[f"layers.{index}.weight"] = torch.randn(b, a) / a**0.5
        head[f"layers.{index}.bias"] = torch.zeros(b)
    save_file(head, str(folder / "aesthetic.safetensors"))
    nsfw = {
        "layers.0.weight": torch.randn(64, 512) / 512**0.5,
        "layers.0.bias": torch.zeros(64),
        "layers.1.weight": torch.randn(1, 64) / 8,
        "layers.1.bias": torch.full((1,), -4.0),
    }
    save_file(nsfw, str(folder / "nsfw.safetensors"))
    return {
        "clip_model": str(folder / "clip"),
        "aesthetic_model": str(folder / "aesthetic.safetensors"),
        "nsfw_model": str(folder / "nsfw.safetensors"),
    }


def _clip_scorer(kit_and_kind: tuple[dict[str, str], str]):
    import torch

    torch.set_num_threads(1)
    kit, kind = kit_and_kind
    if kind == "laion_v2":
        from curate.aesthetic import LaionAestheticV2

        return LaionAestheticV2(kit["clip_model"], kit["aesthetic_model"])
    if kind == "laion_clip":
        from curate.nsfw import LaionClipNSFW

        return LaionClipNSFW(kit["clip_model"], kit["nsfw_model"])
    from curate.clip import ClipImageEmbedder

    return ClipImageEmbedder(kit["clip_model"])


def clip_alone(kit: dict[str, str], kind: str, paths: list[Path], batch: int = 16) -> float:
    """Images/s of one CLIP-based scorer with its own CLIP forward, one process, decode included."""
    global _MODEL
    _MODEL = _clip_scorer((kit, kind))
    chunks = [[str(p) for p in paths[i : i + batch]] for i in range(0, len(paths), batch)]
    started = time.monotonic()
    done = sum(_score(c) for c in chunks)
    return done / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--alone", type=int, default=200, help="images each scorer is timed on alone"
    )
    parser.add_argument("--chunk-size", type=int, default=32, help="curate's chunk size")
    parser.add_argument("--clip", action="store_true", help="also the shared-CLIP comparison")
    parser.add_argument(
        "--dask-ratio",
        type=int,
        default=0,
        metavar="REPEATS",
        help="also curate on local Dask clusters of 1 and of --workers workers, alternated REPEATS times",
    )
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-curate-"))
    try:
        paths = make_images(root / "in", args.n)
        sample = paths[: args.alone]
        alone = {kind: round(scorer_alone(kind, sample, 1), 2) for kind in SCORERS}
        limit = ceiling(alone, args.workers)
        base = CurateConfig(workers=args.workers, chunk_size=args.chunk_size)
        local = end_to_end(root / "in", root / "out", base)
        with dask_cluster(args.workers) as cluster:
            on_dask = end_to_end(
                root / "in",
                root / "out",
                base.model_copy(update={"dask_address": cluster.scheduler_address}),
            )
        figures = {
            "n": args.n,
            "workers": args.workers,
            "chunk_size": args.chunk_size,
            "scorer_alone_1proc_img_s": alone,
            "ceiling_img_s": round(limit, 2),
            "local": local,
            "local_vs_ceiling": round(local["img_s"] / limit, 3),
            "dask": on_dask,
            "dask_vs_ceiling": round(on_dask["img_s"] / limit, 3),
        }
        if args.dask_ratio:
            figures["dask_scaling"] = dask_scaling(
                root / "in", root / "out", base, args.workers, args.dask_ratio
            )
        if args.clip:
            kit = write_clip_kit(root / "clip-kit")
            clip_kinds = ("laion_v2", "laion_clip", "clip")
            clip = {kind: round(clip_alone(kit, kind, sample), 2) for kind in clip_kinds}
            separate = ceiling(clip, args.workers)
            config = base.model_copy(
                update={
                    "nsfw_detector": "laion_clip",
                    "aesthetic_scorer": "laion_v2",
                    "embedder": "clip",
                    **kit,
                }
            )
            shared = end_to_end(root / "in", root / "out", config)
            figures["clip"] = {
                "alone_1proc_img_s": clip,
                "ceiling_three_forwards_img_s": round(separate, 2),
                "curate_one_forward": shared,
                "one_forward_vs_three_ceiling": round(shared["img_s"] / separate, 3),
            }
        print(json.dumps(figures, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
