"""Near-duplicate removal: SD3 appendix E, Algorithm 1, with a perceptual-hash pre-pass.

1. pHash pairs: 64-bit DCT hashes within `max_distance` bits, found exactly by multi-index
   hashing (split into max_distance+1 bands: by pigeonhole, a close pair agrees on one band).
2. Embedding pairs: L2-normalised embeddings, spherical FAISS k-means into K clusters, each
   vector assigned to its `assign` nearest centroids (top-2 recovers pairs split by a boundary),
   then per cluster an exact FAISS range search (BLAS inner products) at `threshold`.
3. Selection (Algorithm 1): visit images best first (highest aesthetic score, ties by id); an
   image not yet removed is kept and removes every neighbour still standing, recording `dup_of`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BLOCK = 4096  # rows of a cluster's similarity matrix computed at once


@dataclass
class Pairs:
    i: np.ndarray  # int64, i < j
    j: np.ndarray
    similarity: np.ndarray  # cosine (embeddings) or 1 - distance/64 (pHash)

    @staticmethod
    def empty() -> Pairs:
        return Pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.i)


def _unique(i: np.ndarray, j: np.ndarray, s: np.ndarray, n: int) -> Pairs:
    if len(i) == 0:
        return Pairs.empty()
    lo, hi = np.minimum(i, j).astype(np.int64), np.maximum(i, j).astype(np.int64)
    code = lo * n + hi
    code, first = np.unique(code, return_index=True)
    return Pairs(code // n, code % n, s[first].astype(np.float32))


def merge(a: Pairs, b: Pairs, n: int) -> Pairs:
    return _unique(
        np.concatenate([a.i, b.i]),
        np.concatenate([a.j, b.j]),
        np.concatenate([a.similarity, b.similarity]),
        n,
    )


def _popcount64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64)
    counts = np.zeros(x.shape, np.int64)
    for shift in range(0, 64, 8):
        counts += _POPCOUNT8[((x >> np.uint64(shift)) & np.uint64(0xFF)).astype(np.int64)]
    return counts


_POPCOUNT8 = np.array([bin(v).count("1") for v in range(256)], dtype=np.int64)


def phash_pairs(hashes: np.ndarray, max_distance: int) -> Pairs:
    """All pairs whose 64-bit hashes differ in at most MAX_DISTANCE bits (exact, not sampled)."""
    n = len(hashes)
    if n < 2 or max_distance < 0:
        return Pairs.empty()
    hashes = hashes.astype(np.uint64)
    bands = max_distance + 1
    edges = np.linspace(0, 64, bands + 1).astype(int)
    found_i, found_j = [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = np.uint64((1 << (hi - lo)) - 1)
        keys = (hashes >> np.uint64(lo)) & mask
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], n]
        for start, end in zip(starts[ends - starts > 1], ends[ends - starts > 1], strict=True):
            members = order[start:end]
            a, b = np.triu_indices(len(members), k=1)
            close = _popcount64(hashes[members[a]] ^ hashes[members[b]]) <= max_distance
            found_i.append(members[a][close])
            found_j.append(members[b][close])
    if not found_i:
        return Pairs.empty()
    i, j = np.concatenate(found_i), np.concatenate(found_j)
    distance = _popcount64(hashes[i] ^ hashes[j])
    return _unique(i, j, 1.0 - distance / 64.0, n)


EXACT_UP_TO = 2000  # below this many images one cluster (exact all-pairs) is cheaper than k-means


def default_clusters(n: int) -> int:
    """K grows with N: one cluster up to 2,000 images, then 2 sqrt(N) (balancing k-means and search cost), at most SD3's 16,000."""
    if n <= EXACT_UP_TO:
        return 1
    return int(min(16_000, round(2 * math.sqrt(n))))


def cluster(
    embeddings: np.ndarray,
    k: int,
    assign: int,
    iterations: int,
    seed: int,
    threads: int | None = None,
    pca_dim: int | None = None,
) -> np.ndarray:
    """Spherical k-means; each vector's `assign` nearest centroids, [N, assign] int64 (column 0 = own cluster).

    With `pca_dim` (default: 128 when D > 256 and N > 100,000) the clustering runs on a PCA
    projection fitted on the training sample; similarities are always computed in full D later.
    """
    import faiss

    if threads:
        faiss.omp_set_num_threads(threads)
    n, d = embeddings.shape
    k = max(1, min(k, n))
    if k == 1:
        return np.zeros((n, 1), np.int64)
    rng = np.random.default_rng(seed)
    sample = np.sort(
        rng.choice(n, min(n, k * 32), replace=False)
    )  # 32 training points per centroid
    train = np.ascontiguousarray(embeddings[sample], dtype=np.float32)
    if pca_dim is None and d > 256 and n > 100_000:
        pca_dim = 128
    project = None
    if pca_dim and pca_dim < d:
        pca = faiss.PCAMatrix(d, pca_dim)
        pca.train(train)
        project = pca.apply_py
        train = project(train)
    kmeans = faiss.Kmeans(
        train.shape[1],
        k,
        niter=iterations,
        spherical=True,
        seed=seed,
        verbose=False,
        min_points_per_centroid=1,
    )
    kmeans.train(train)
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(kmeans.centroids)
    labels = np.empty((n, min(assign, k)), np.int64)
    for start in range(0, n, 65536):
        block = np.ascontiguousarray(embeddings[start : start + 65536], dtype=np.float32)
        if project is not None:
            block = project(block)
        labels[start : start + len(block)] = index.search(block, labels.shape[1])[1]
    return labels


def embedding_pairs(embeddings: np.ndarray, labels: np.ndarray, threshold: float) -> Pairs:
    """Per cluster, an exact range search at THRESHOLD: its own members against everything assigned to it.

    The database of cluster c holds the vectors whose nearest centroid is c; the queries are those
    plus the vectors that have c among their other top-`assign` centroids. A pair is found when one
    image's own cluster is among the other's nearest clusters.
    """
    import faiss

    n, d = embeddings.shape
    members = labels.reshape(-1)
    owners = np.repeat(np.arange(n), labels.shape[1])
    primary = np.tile(np.arange(labels.shape[1]) == 0, n)
    order = np.lexsort((~primary, members))
    members, owners, primary = members[order], owners[order], primary[order]
    starts = np.flatnonzero(np.r_[True, members[1:] != members[:-1]])
    ends = np.r_[starts[1:], len(members)]
    found_i, found_j, found_s = [], [], []
    for start, end in zip(starts, ends, strict=True):
        if end - start < 2:
            continue
        base = owners[start:end][primary[start:end]]
        if len(base) == 0:
            continue
        queries = owners[start:end]
        index = faiss.IndexFlatIP(d)
        index.add(np.ascontiguousarray(embeddings[base], dtype=np.float32))
        for row in range(0, len(queries), BLOCK):
            batch = queries[row : row + BLOCK]
            lims, sims, hits = index.range_search(
                np.ascontiguousarray(embeddings[batch], dtype=np.float32), threshold
            )
            query = np.repeat(batch, np.diff(lims.astype(np.int64)))
            other = base[hits]
            keep = query != other
            found_i.append(query[keep])
            found_j.append(other[keep])
            found_s.append(sims[keep])
    if not found_i:
        return Pairs.empty()
    return _unique(np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s), n)


def select(
    pairs: Pairs,
    scores: np.ndarray,
    ids: list[str],
    pixels: np.ndarray | None = None,
    sizes: np.ndarray | None = None,
) -> dict[int, tuple[int, float]]:
    """Algorithm 1's greedy pass: {removed index: (index it duplicates, similarity)}.

    Best first: highest score; ties (or no score) by more pixels, then the larger original file, then id.
    """
    if len(pairs) == 0:
        return {}
    nodes = np.unique(np.concatenate([pairs.i, pairs.j]))
    pixels = np.zeros(len(ids)) if pixels is None else pixels
    sizes = np.zeros(len(ids)) if sizes is None else sizes

    def order(x: int) -> tuple:
        return (-_finite(scores[x]), -float(pixels[x]), -float(sizes[x]), ids[x])

    rank = {int(node): r for r, node in enumerate(sorted(nodes.tolist(), key=order))}
    neighbours: dict[int, list[tuple[int, float]]] = {}
    for a, b, s in zip(pairs.i.tolist(), pairs.j.tolist(), pairs.similarity.tolist(), strict=True):
        neighbours.setdefault(a, []).append((b, s))
        neighbours.setdefault(b, []).append((a, s))
    removed: dict[int, tuple[int, float]] = {}
    for node in sorted(rank, key=rank.__getitem__):
        if node in removed:
            continue
        for other, similarity in neighbours[node]:
            if other not in removed and rank[other] > rank[node]:
                removed[other] = (node, similarity)
    return removed


def _finite(value: float) -> float:
    return float(value) if np.isfinite(value) else -1e30
