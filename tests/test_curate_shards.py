"""Curate's workers read their own input: the driver plans shards and reduces, never reads a record."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curate.config import CurateConfig
from curate.runtime import reasons
from curate.runtime.store import Manifest, load_rejected, load_samples
from curate.runtime.store_writer import WorkLog
from curate.shards import LEDGER, ChunkDone, Ledger, chunk_name
from curate.stage import run_curate

# Scorers off (the dedup embedder stays): these tests check who reads what, not the models.
CHEAP = {"nsfw_detector": "none", "aesthetic_scorer": "none"}


def _tables(out: Path) -> tuple[list[dict], list[dict]]:
    samples = load_samples(out).remove_columns("image").sort("id").to_list()
    rejected = sorted(
        load_rejected(out).to_list(), key=lambda r: (r["id"], r["reason"], r["detail"])
    )
    return samples, rejected


def _refuse_to_read(*args, **kwargs):
    raise AssertionError("the driver read an input record")


def test_the_driver_never_reads_an_image_record_in_a_sharded_run(
    demo_folder, tmp_path, monkeypatch
):
    reference = run_curate(demo_folder, tmp_path / "inline", CurateConfig(**CHEAP, chunk_size=4))
    # Spawned workers import the real readers; this process (the driver) cannot read a record.
    monkeypatch.setattr("curate.ingest.read_shard", _refuse_to_read)
    monkeypatch.setattr("curate.ingest.read_records", _refuse_to_read)
    config = CurateConfig(**CHEAP, chunk_size=4, workers=2)
    out = run_curate(demo_folder, tmp_path / "workers", config)
    assert _tables(out) == _tables(reference)
    rejected = load_rejected(out).to_list()
    assert any(r["reason"] == reasons.EXACT_DUPLICATE for r in rejected)  # the demo plants copies
    extra = Manifest.read(out).extra
    assert extra["executor"] == "processes x2"
    assert extra["startup_s"] > 0 and extra["steady_images_per_s"] > 0


def _noise_jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _mixed_folder(root: Path) -> dict[str, bytes]:
    """Loose images and a tar, with copies of the same bytes across and inside shards."""
    x, y, z = _noise_jpeg(1), _noise_jpeg(2), _noise_jpeg(3)
    root.mkdir()
    loose = {"a.jpg": x, "b.jpg": y, "c.jpg": x}
    for name, data in loose.items():
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text(f"caption of {name}")
    members = {"x.jpg": x, "n.jpg": z, "y.jpg": y, "x2.jpg": x}
    with tarfile.open(root / "z.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return {"x": x, "y": y, "z": z}


@pytest.mark.parametrize("workers", [1, 2])
def test_exact_copies_across_shards_keep_the_first_in_input_order(tmp_path, workers):
    from curate.runtime.store import sample_id

    data = _mixed_folder(tmp_path / "in")
    ids = {name: sample_id(value) for name, value in data.items()}
    strict = {**CHEAP, "similarity_threshold": 0.9999, "phash_distance": 0}
    # One loose file per shard (chunk_size 1) on WORKERS, against every loose file in one shard.
    sharded = CurateConfig(**strict, chunk_size=1, workers=workers)
    out = run_curate(tmp_path / "in", tmp_path / "sharded", sharded)
    whole = run_curate(tmp_path / "in", tmp_path / "whole", CurateConfig(**strict, workers=1))
    assert _tables(out) == _tables(whole)

    samples = {r["id"]: r["source"] for r in load_samples(out).remove_columns("image").to_list()}
    assert samples == {ids["x"]: "a.jpg", ids["y"]: "b.jpg", ids["z"]: "z.tar/n.jpg"}
    copies = {
        r["detail"].split()[0]: r
        for r in load_rejected(out).to_list()
        if r["reason"] == reasons.EXACT_DUPLICATE
    }
    assert set(copies) == {
        "source=c.jpg",
        "source=z.tar/x.jpg",
        "source=z.tar/y.jpg",
        "source=z.tar/x2.jpg",
    }
    for source, first, name in [
        ("c.jpg", "a.jpg", "x"),
        ("z.tar/x.jpg", "a.jpg", "x"),
        ("z.tar/x2.jpg", "a.jpg", "x"),  # a copy inside the tar names the first in the input
        ("z.tar/y.jpg", "b.jpg", "y"),
    ]:
        row = copies[f"source={source}"]
        assert row["id"] == ids[name]
        assert row["detail"] == f"source={source} dup_of={ids[name]} original={first}"
    counts = Manifest.read(out).counts
    assert counts == {"input": 7, "kept": 3, "rejected": 4}


def test_the_ledger_lists_only_shards_whose_chunks_are_all_on_disk(tmp_path):
    work = WorkLog(tmp_path / "out", "key")
    ledger = Ledger(work)
    for shard in (0, 1):
        names = [chunk_name(shard, k) for k in range(2)]
        for name in names:
            work.write(name, [{"id": name}])
        ledger.add(shard, [ChunkDone(name, 3, 1.0) for name in names])
    with open(work.path / LEDGER, "a") as handle:
        handle.write('{"shard": 2, "chun')  # a line cut short by a kill
    (work.path / f"{chunk_name(1, 1)}.parquet").unlink()
    reread = Ledger(work)
    assert sorted(reread.done) == [0] and reread.rows() == 6
    assert chunk_name(0, 1) < chunk_name(1, 0) < chunk_name(10, 0)  # input order is name order
