"""`t2i curate IN OUT`: validate, score, deduplicate, and write the sample table with every drop recorded.

Recipe (SD3 section 5.3.1 and appendix E): decode and validate every file, drop exact byte
copies, score NSFW and aesthetics, then remove near-duplicates with Algorithm 1.

The driver only plans the input (shards: groups of files, tars, row ranges) and reduces. The
workers (in this process, local processes or a Dask cluster; one intra-op thread each) read
their shards themselves and write each chunk's table to the work log beside OUT
(curate/shards.py), so image bytes never pass through the driver. The driver then settles exact
byte copies across shards, deduplicates and writes the tables. A killed run picks up the chunks
already finished, and the committed tables do not depend on where it was killed or where the
shards ran.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from curate import ingest
from curate.config import CurateConfig
from curate.runtime import reasons
from curate.runtime.executor import EXECUTION_FIELDS, Setup, executor_for
from curate.runtime.output_guard import check_output
from curate.runtime.stage_runtime import StageRun, local_path
from curate.runtime.store import Rejection, params_hash
from curate.runtime.store_writer import WorkLog
from curate.shards import ChunkDone, Ledger, ShardTask, files_per_shard, score_shard

STAGE = "curate"
# Options that change how fast the work runs, never what it produces.
VOLATILE = (*EXECUTION_FIELDS, "batch_size", "device")

SAMPLE_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "caption": datasets.Value("string"),
        "caption_note": datasets.Value("string"),  # why a non-text caption was dropped; "" = none
        "source": datasets.Value("string"),
        "width": datasets.Value("int32"),
        "height": datasets.Value("int32"),
        "nsfw_score": datasets.Value("float32"),
        "aesthetic_score": datasets.Value("float32"),
        "aesthetic_kind": datasets.Value("string"),
        "cluster_id": datasets.Value("int32"),
    }
)


def _score_all(inp: Path, work: WorkLog, resolved, timing: dict[str, Any]) -> int:
    """Fill the WorkLog with every shard's chunk tables, read and scored by the executor's workers;
    returns the number of records.

    The driver sends each worker a shard's name (curate/shards.py), never its bytes. TIMING
    receives when the first chunk finished (start-up: workers started, models loaded), how many
    images were scored after it (for a steady-state rate), and where the work ran.
    """
    from curate.workers import build_scorers

    config = resolved.config
    setup = Setup(build_scorers, resolved, params_hash({"stage": STAGE, **config.model_dump()}))
    plan = ingest.plan(inp, files_per_shard(config))
    ledger = Ledger(work)
    root = str(inp.resolve())
    progress = tqdm(desc="curate: scoring", unit="img")

    def pending() -> Iterator[tuple[str, ShardTask]]:
        for index, shard in enumerate(plan):
            if index in ledger.done:
                progress.update(ledger.rows(index))
            else:
                yield f"shard-{index:08d}", ShardTask(root, index, shard, work)

    try:
        with executor_for(config, STAGE) as executor:
            timing["executor"] = executor.describe()
            for result in executor.map(setup, score_shard, pending()):
                ledger.add(int(result.name.removeprefix("shard-")), result.value)
                progress.update(sum(chunk.rows for chunk in result.value))
                _clock(timing, result.value)
    finally:
        progress.close()
    total = ledger.rows()
    if total == 0:
        raise ValueError(ingest.nothing_to_read(inp))
    _reject_exact_duplicates(work)
    return total


def _clock(timing: dict[str, Any], chunks: list[ChunkDone]) -> None:
    """Fold the finishing times of a shard's newly scored chunks into TIMING (wall clock)."""
    for chunk in chunks:
        if chunk.finished is None:
            continue
        first = timing.get("first_chunk")
        if first is None or chunk.finished < first:
            if first is not None:  # the old first chunk now counts as steady work
                timing["after_first"] = timing.get("after_first", 0) + timing["first_rows"]
            timing["first_chunk"], timing["first_rows"] = chunk.finished, chunk.rows
        else:
            timing["after_first"] = timing.get("after_first", 0) + chunk.rows
        timing["last_chunk"] = max(timing.get("last_chunk", chunk.finished), chunk.finished)


def _reject_exact_duplicates(work: WorkLog) -> int:
    """The global step before dedup: in input order, the first record with an id stays and every
    later one becomes an `exact_duplicate` rejection naming it (rewritten in its chunk table).

    Copies inside one shard were already refused by the worker, against the shard's first copy;
    here they name the first copy in the whole input. Returns the number of tables rewritten.
    """
    seen: dict[str, str] = {}
    rewritten = 0
    for name in work.names():
        rows = work.read(name, ["id", "source", "exact_check", "detail"]).to_pylist()
        changes: dict[int, str] = {}
        for position, row in enumerate(rows):
            if not row["exact_check"]:
                continue
            original = seen.setdefault(row["id"], row["source"])
            detail = f"source={row['source']} dup_of={row['id']} original={original}"
            if original != row["source"] and row["detail"] != detail:
                changes[position] = detail
        if changes:
            work.write(name, _as_duplicates(work.read(name), changes))
            rewritten += 1
    return rewritten


def _as_duplicates(table: pa.Table, changes: dict[int, str]) -> pa.Table:
    """TABLE with the rows at CHANGES' positions turned into exact_duplicate rejections."""
    rows = table.to_pylist()
    for position, detail in changes.items():
        row = rows[position]
        kept = {key: row[key] for key in ("id", "source", "caption", "exact_check")}
        rows[position] = {key: None for key in row} | kept
        rows[position].update(status="rejected", reason=reasons.EXACT_DUPLICATE, detail=detail)
    return pa.Table.from_pylist(rows, schema=table.schema)


def _candidates(work: WorkLog) -> tuple[list[str], dict[str, np.ndarray], np.ndarray]:
    """ids, per-candidate columns (scores, pHashes, pixels, bytes) and embeddings (a disk-backed array)."""
    ids: list[str] = []
    scores, hashes, pixels, sizes = [], [], [], []
    dim, count = 0, 0
    for name in work.names():
        table = work.read(
            name,
            ["status", "id", "aesthetic_score", "phash", "width", "height", "nbytes", "embedding"],
        )
        table = table.filter(pc.equal(table["status"], "candidate"))
        ids += table["id"].to_pylist()
        scores.append(
            table["aesthetic_score"].fill_null(float("nan")).to_numpy(zero_copy_only=False)
        )
        hashes.append(table["phash"].to_numpy(zero_copy_only=False))
        pixels.append(pc.multiply(table["width"], table["height"]).to_numpy(zero_copy_only=False))
        sizes.append(table["nbytes"].to_numpy(zero_copy_only=False))
        if table.num_rows:
            dim = len(table["embedding"][0])
        count += table.num_rows
    path = work.path / "embeddings.f32"
    matrix = np.memmap(path, dtype=np.float32, mode="w+", shape=(max(count, 1), max(dim, 1)))[
        :count
    ]
    row = 0
    for name in work.names():
        table = work.read(name, ["status", "embedding"])
        table = table.filter(pc.equal(table["status"], "candidate"))
        if table.num_rows:
            values = table["embedding"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
            matrix[row : row + table.num_rows] = values.reshape(table.num_rows, dim)
            row += table.num_rows

    def concat(parts: list[np.ndarray], dtype) -> np.ndarray:
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    columns = {
        "score": concat(scores, np.float64),
        "phash": concat(hashes, np.uint64),
        "pixels": concat(pixels, np.int64),
        "nbytes": concat(sizes, np.int64),
    }
    return ids, columns, matrix


def deduplicate(
    work: WorkLog, resolved, threads: int
) -> tuple[dict[str, tuple[str, float, str]], dict[str, int], dict[str, Any]]:
    """{removed id: (kept id, similarity, how)}, {id: cluster}, and figures for the manifest."""
    from curate import dedup

    config = resolved.config
    ids, columns, embeddings = _candidates(work)
    scores, hashes = columns["score"], columns["phash"]
    n = len(ids)
    started = time.monotonic()
    by_hash = dedup.phash_pairs(hashes, config.phash_distance)
    k = config.clusters or dedup.default_clusters(n)
    labels = (
        dedup.cluster(
            embeddings, k, config.cluster_assign, config.kmeans_iterations, config.seed, threads
        )
        if n
        else np.zeros((0, 1), np.int64)
    )
    by_embedding = (
        dedup.embedding_pairs(embeddings, labels, resolved.similarity_threshold)
        if n
        else dedup.Pairs.empty()
    )
    pairs = dedup.merge(by_hash, by_embedding, max(n, 1))
    hash_codes = set((by_hash.i * max(n, 1) + by_hash.j).tolist())
    removed = {}
    for index, (kept, similarity) in dedup.select(
        pairs, scores, ids, columns["pixels"], columns["nbytes"]
    ).items():
        lo, hi = min(index, kept), max(index, kept)
        how = "phash" if lo * max(n, 1) + hi in hash_codes else "embedding"
        removed[ids[index]] = (ids[kept], similarity, how)
    clusters = {ids[i]: int(labels[i, 0]) for i in range(n)}
    figures = {
        "candidates": n,
        "clusters": int(min(k, n)) if n else 0,
        "phash_pairs": len(by_hash),
        "embedding_pairs": len(by_embedding),
        "dedup_s": round(time.monotonic() - started, 3),
    }
    return removed, clusters, figures


def _sample_rows(work: WorkLog, removed, clusters, kind: str) -> Iterator[dict[str, Any]]:
    columns = [
        "status",
        "id",
        "image",
        "caption",
        "caption_note",
        "source",
        "width",
        "height",
        "nsfw_score",
        "aesthetic_score",
    ]
    for name in work.names():
        for row in work.read(name, columns).to_pylist():
            if row["status"] != "candidate" or row["id"] in removed:
                continue
            yield {
                "id": row["id"],
                "image": {"bytes": row["image"], "path": None},
                "caption": row["caption"],
                "caption_note": row["caption_note"] or "",
                "source": row["source"],
                "width": row["width"],
                "height": row["height"],
                "nsfw_score": row["nsfw_score"],
                "aesthetic_score": row["aesthetic_score"],
                "aesthetic_kind": kind,
                "cluster_id": clusters.get(row["id"], -1),
            }


def _captions_dropped(work: WorkLog, removed) -> int:
    """Kept samples whose caption was not text and was dropped (each says why in caption_note)."""
    count = 0
    for name in work.names():
        for row in work.read(name, ["status", "id", "caption_note"]).to_pylist():
            count += bool(
                row["status"] == "candidate" and row["id"] not in removed and row["caption_note"]
            )
    return count


def _rejections(work: WorkLog, removed, threshold: float) -> Iterator[Rejection]:
    for name in work.names():
        columns = ["status", "id", "reason", "score", "threshold", "detail", "source"]
        for row in work.read(name, columns).to_pylist():
            if row["status"] == "rejected":
                yield Rejection(
                    row["id"],
                    STAGE,
                    row["reason"],
                    row["score"],
                    row["threshold"],
                    row["detail"] or "",
                )
            elif row["id"] in removed:
                kept, similarity, how = removed[row["id"]]
                yield Rejection(
                    row["id"],
                    STAGE,
                    reasons.NEAR_DUPLICATE,
                    float(similarity),
                    threshold,
                    f"source={row['source']} dup_of={kept} by={how}",
                )


def run_curate(input: str | Path, output: str | Path, config: CurateConfig | None = None) -> Path:
    """Curate INPUT into OUTPUT (see the module docstring); skipped when OUTPUT is already this run's result."""
    from curate.report import write_report
    from curate.workers import resolve

    config = config or CurateConfig()
    inp, out = Path(input), Path(output)
    if not inp.exists():
        raise FileNotFoundError(f"curate: input {inp} does not exist")
    check_output(out, STAGE, {"input": inp})  # StageRun checks again, with the model folders
    resolved = resolve(config)
    models = ("nsfw_model", "aesthetic_model", "clip_model", "embedder_model")
    reads = {"input": inp, **{name: local_path(getattr(config, name)) for name in models}}
    with StageRun(out, STAGE, config, reads, volatile=VOLATILE) as run:
        if run.finished:
            return run.skip()
        work = run.work_log(ignore=("contact_sheet_max",))  # only the report depends on it
        started = time.time()  # wall clock: chunk finishing times come from the workers
        timing: dict[str, float] = {}
        total = _score_all(inp, work, resolved, timing)
        scored_s = time.time() - started
        steady = None
        if timing.get("after_first") and timing["last_chunk"] > timing["first_chunk"]:
            steady = round(
                timing["after_first"] / (timing["last_chunk"] - timing["first_chunk"]), 3
            )
        removed, clusters, figures = deduplicate(
            work, resolved, threads=1
        )  # FAISS with 2 threads contends badly on 2 cores
        with run.writer() as writer:
            kept = writer.write_samples(
                _sample_rows(work, removed, clusters, resolved.aesthetic_kind), SAMPLE_FEATURES
            )
            rejected = writer.write_rejected(
                _rejections(work, removed, resolved.similarity_threshold)
            )
            writer.counts.update(input=total, kept=kept, rejected=rejected)
            if dropped := _captions_dropped(work, removed):  # only when there are some
                writer.counts["captions_dropped"] = dropped
            writer.extra.update(
                aesthetic_kind=resolved.aesthetic_kind,
                aesthetic_threshold=resolved.aesthetic_threshold,
                similarity_threshold=resolved.similarity_threshold,
                scoring_s=round(scored_s, 3),
                images_per_s=round(total / scored_s, 3) if scored_s else None,
                steady_images_per_s=steady,
                executor=timing.get("executor"),
                startup_s=round(timing["first_chunk"] - started, 3)
                if "first_chunk" in timing
                else None,
                **figures,
            )
            write_report(writer.path, work, removed, resolved, writer.counts, writer.extra)
        work.clear()
    return out
