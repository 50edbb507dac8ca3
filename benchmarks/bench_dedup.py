"""Benchmark: near-duplicate search (curate/dedup.py) on N x D synthetic embeddings.

The data mimic image embeddings: vectors around 2,000 topic centres (different images of a topic
have cosine ~0.3-0.6), plus planted near-duplicate groups of 2-4 copies with cosine ~0.90-0.99 to
their original. Ground truth is exact all-pairs similarity for a sample of query vectors against
all N (half planted members, half random vectors); recall is the share of those true pairs
(cosine >= threshold) the clustered search returns, precision the share of returned pairs (with a
sampled query) that are true.

    python benchmarks/bench_dedup.py --n 1000000 --dim 512
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate import dedup


def synthetic(n: int, dim: int, groups: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors with topic structure and planted groups; returns (vectors, group id or -1)."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((2000, dim)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    vectors = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        noise = rng.standard_normal((stop - start, dim)).astype(np.float32)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        vectors[start:stop] = 0.7 * topics[rng.integers(0, len(topics), stop - start)] + 0.7 * noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    group = np.full(n, -1, np.int64)
    slots = rng.permutation(n)
    cursor = 0
    for g in range(groups):
        size = int(rng.integers(2, 5))
        members = slots[cursor : cursor + size]
        cursor += size
        original = vectors[members[0]]
        for m in members[1:]:
            strength = rng.uniform(0.1, 0.45)  # cosine to the original ~0.90-0.995
            noise = rng.standard_normal(dim).astype(np.float32)
            noise /= np.linalg.norm(noise)
            copy = original + strength * noise
            vectors[m] = copy / np.linalg.norm(copy)
        group[members] = g
    return vectors, group


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--groups", type=int, default=20_000, help="planted near-duplicate groups")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--clusters", type=int, default=None, help="default: curate's sqrt(N) rule")
    parser.add_argument("--assign", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="FAISS threads (1: two contend badly on 2 shared cores)",
    )
    parser.add_argument("--json", type=str, default=None, help="write the figures here too")
    args = parser.parse_args()

    started = time.monotonic()
    vectors, group = synthetic(args.n, args.dim, args.groups, seed=0)
    made_s = time.monotonic() - started
    k = args.clusters or dedup.default_clusters(args.n)

    t0 = time.monotonic()
    labels = dedup.cluster(vectors, k, args.assign, args.iterations, seed=0, threads=args.threads)
    t1 = time.monotonic()
    pairs = dedup.embedding_pairs(vectors, labels, args.threshold)
    t2 = time.monotonic()
    removed = (
        dedup.select(pairs, np.zeros(args.n), [f"{i:08d}" for i in range(args.n)])
        if len(pairs) < 5_000_000
        else {}
    )
    t3 = time.monotonic()

    # Exact ground truth for sampled queries against all N.
    rng = np.random.default_rng(1)
    planted = np.flatnonzero(group >= 0)
    queries = np.unique(
        np.concatenate(
            [
                rng.choice(planted, args.queries // 2, replace=False),
                rng.choice(args.n, args.queries // 2, replace=False),
            ]
        )
    )
    truth = set()
    for start in range(0, len(queries), 256):
        block = queries[start : start + 256]
        sims = vectors[block] @ vectors.T
        a, b = np.nonzero(sims >= args.threshold)
        for q, other in zip(block[a].tolist(), b.tolist(), strict=True):
            if q != other:
                truth.add((min(q, other), max(q, other)))
    query_set = set(queries.tolist())
    found = {
        (i, j)
        for i, j in zip(pairs.i.tolist(), pairs.j.tolist(), strict=True)
        if i in query_set or j in query_set
    }
    hits = len(found & truth)
    figures = {
        "n": args.n,
        "dim": args.dim,
        "clusters": k,
        "assign": args.assign,
        "threshold": args.threshold,
        "threads": args.threads,
        "planted_groups": args.groups,
        "make_data_s": round(made_s, 1),
        "kmeans_and_assign_s": round(t1 - t0, 1),
        "cluster_search_s": round(t2 - t1, 1),
        "select_s": round(t3 - t2, 1),
        "dedup_total_s": round(t3 - t0, 1),
        "pairs_found": len(pairs),
        "removed": len(removed),
        "sample_queries": len(queries),
        "sample_true_pairs": len(truth),
        "pair_recall": round(hits / max(1, len(truth)), 4),
        "pair_precision": round(hits / max(1, len(found)), 4),
        "max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
