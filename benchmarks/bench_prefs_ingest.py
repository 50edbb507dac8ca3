"""Peak memory of `t2i prefs` on Pick-a-Pic-shaped parquet: flat in the number of pairs (issue 11, item 5).

Writes a synthetic parquet with Pick-a-Pic v2's 19 columns (hub naming, data/train-00000-of-00001
.parquet; row groups of 100 rows; distinct random-noise JPEGs of about 14 KB; one pair in eight a
tie, as in the published set) for each size, then ingests it in a fresh process and reports that
process's peak resident set size (ru_maxrss) and its peak above the post-import baseline. Sizes
alternate (1k, 10k, 1k, 10k, ...) so slow drift of the shared machine hits both.

    python benchmarks/bench_prefs_ingest.py [--sizes 1000 10000] [--repeats 2] [--work DIR]
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


def jpeg(rng: np.random.Generator, side: int) -> bytes:
    from PIL import Image

    pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def write_parquet(path: Path, pairs: int, side: int, seed: int = 0) -> dict:
    """Pick-a-Pic-shaped rows, written one row group at a time (the writer holds one group)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.test_dpo_ingest import PICKAPIC_SCHEMA, pickapic_row

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_bytes = 0
    with pq.ParquetWriter(path, PICKAPIC_SCHEMA) as writer:
        for start in range(0, pairs, 100):
            rows = []
            for i in range(start, min(start + 100, pairs)):
                a, b = jpeg(rng, side), jpeg(rng, side)
                image_bytes += len(a) + len(b)
                label = 0.5 if i % 8 == 7 else float(i % 2)
                rows.append(pickapic_row(i, f"prompt {i}", a, b, label, 1.0 - label))
            writer.write_table(pa.Table.from_pylist(rows, schema=PICKAPIC_SCHEMA))
    return {
        "pairs": pairs,
        "parquet_mb": round(path.stat().st_size / 2**20, 1),
        "image_mb": round(image_bytes / 2**20, 1),
    }


def one_run(source: str, output: str) -> dict:
    """Runs in a child process: import, note the baseline, ingest, report peak RSS."""
    from dpo.config import IngestPrefsConfig
    from dpo.ingest import run_prefs

    baseline = resident_mb()
    start = time.monotonic()
    out = run_prefs(source, output, IngestPrefsConfig(split="train"))
    seconds = time.monotonic() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    counts = json.loads((Path(out) / "manifest.json").read_text())["counts"]
    return {
        "peak_rss_mb": round(peak, 1),
        "baseline_mb": round(baseline, 1),
        "above_baseline_mb": round(peak - baseline, 1),
        "seconds": round(seconds, 1),
        "counts": counts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--side", type=int, default=128, help="JPEG side in pixels (128: about 14 KB of noise)"
    )
    parser.add_argument("--work", default=None)
    parser.add_argument("--child", nargs=2, metavar=("SOURCE", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(*args.child)))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-prefs-"))
    sources = {}
    for size in args.sizes:
        folder = work / f"pickapic-{size}"
        sources[size] = folder
        shard = folder / "data" / "train-00000-of-00001.parquet"
        info = write_parquet(shard, size, args.side) if not shard.is_file() else {"pairs": size}
        print(json.dumps({"made": str(shard), **info}), flush=True)
    results: dict[int, list[dict]] = {size: [] for size in args.sizes}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for repeat in range(args.repeats):
        for size in args.sizes:
            output = work / f"out-{size}-{repeat}"
            child = subprocess.run(
                [sys.executable, __file__, "--child", str(sources[size]), str(output)],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            )
            result = json.loads(child.stdout.strip().splitlines()[-1])
            results[size].append(result)
            print(json.dumps({"pairs": size, "repeat": repeat, **result}), flush=True)
    small, large = min(args.sizes), max(args.sizes)
    ratio = max(r["peak_rss_mb"] for r in results[large]) / min(
        r["peak_rss_mb"] for r in results[small]
    )
    print(json.dumps({"worst_peak_ratio": round(ratio, 3), "sizes": [small, large]}))


if __name__ == "__main__":
    main()
