"""Stages as shard maps on a real Dask cluster: the same tables as a local run, also when a worker dies."""

from __future__ import annotations

import subprocess
import sys
import time

import datasets
import pytest
import torch
from safetensors.torch import load_file

from captioning.config import CaptionConfig
from captioning.stage import run_caption
from curate.config import CurateConfig
from curate.runtime.store import Manifest, load_rejected, load_samples
from curate.stage import run_curate
from model.config import PrecomputeConfig
from model.precompute import run_precompute
from tests.dask_services import DaskCluster
from tests.prefect_services import ROOT

# Scorers off (the dedup embedder stays): these tests check where the work runs, not the models.
CHEAP = {"nsfw_detector": "none", "aesthetic_scorer": "none", "workers": 1}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with DaskCluster(tmp_path_factory.mktemp("dask-logs"), workers=2) as running:
        yield running


def tables(out) -> tuple[list[dict], list[dict]]:
    """Every row and column of the sample and rejected tables (images as their stored bytes)."""
    samples = load_samples(out)
    if "image" in samples.column_names:
        samples = samples.cast_column("image", datasets.Image(decode=False))
    rejected = load_rejected(out).to_list()
    return sorted(samples.to_list(), key=lambda r: r["id"]), sorted(
        rejected, key=lambda r: (r["id"], r["reason"], r["detail"])
    )


def t2i(*args: str, wait: bool = True):
    argv = [sys.executable, "-m", "flows.cli", *args]
    if wait:
        return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    return subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_curate_through_dask_address_writes_the_local_run_tables(cluster, demo_folder, tmp_path):
    local = run_curate(demo_folder, tmp_path / "local", CurateConfig(workers=1))
    result = t2i(
        "curate", str(demo_folder), str(tmp_path / "dask"), "--dask-address", cluster.address
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert tables(tmp_path / "dask") == tables(local)
    assert Manifest.read(tmp_path / "dask").extra["executor"] == "dask x2"


def test_killing_a_worker_during_curate_still_finishes_with_the_same_tables(
    cluster, demo_folder, tmp_path
):
    local = run_curate(demo_folder, tmp_path / "local", CurateConfig(**CHEAP, chunk_size=2))
    options = ["--nsfw-detector", "none", "--aesthetic-scorer", "none", "--chunk-size", "2"]
    run = t2i(
        "curate",
        str(demo_folder),
        str(tmp_path / "dask"),
        *options,
        "--dask-address",
        cluster.address,
        wait=False,
    )
    work = tmp_path / ".dask.work"
    deadline = time.monotonic() + 300
    while not list(work.glob("*/chunk-*.parquet")):
        assert run.poll() is None, run.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no chunk finished in 300 s"
        time.sleep(0.05)
    victim = cluster.workers[0]
    cluster.kill_worker(victim)
    finished_before_kill = len(list(work.glob("*/chunk-*.parquet")))
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output[-3000:]
    assert finished_before_kill < 16  # 31 files in chunks of 2: work was left when the worker died
    assert tables(tmp_path / "dask") == tables(local)
    cluster.workers.remove(victim)
    cluster.add_worker(len(cluster.workers) + 10)
    cluster.wait_workers(2)


def test_dask_workers_starts_a_local_cluster_with_the_same_result(demo_folder, tmp_path):
    local = run_curate(demo_folder, tmp_path / "local", CurateConfig(**CHEAP, chunk_size=8))
    config = CurateConfig(**{**CHEAP, "dask_workers": 2}, chunk_size=8)
    out = run_curate(demo_folder, tmp_path / "dask", config)
    assert tables(out) == tables(local)
    assert Manifest.read(out).extra["executor"] == "dask x2"


def test_caption_through_dask_address_writes_the_local_run_tables(
    cluster, caption_store, tiny_captioner_dir, tmp_path
):
    options = {"max_new_tokens": 8, "max_caption_tokens": 12, "chunk_size": 4, "batch_size": 4}
    local = run_caption(
        caption_store, tmp_path / "local", CaptionConfig(model=tiny_captioner_dir, **options)
    )
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    result = t2i(
        "caption",
        str(caption_store),
        str(tmp_path / "dask"),
        "--model",
        tiny_captioner_dir,
        *flags,
        "--dask-address",
        cluster.address,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert tables(tmp_path / "dask") == tables(local)
    assert Manifest.read(tmp_path / "dask").counts == Manifest.read(local).counts
    assert Manifest.read(tmp_path / "dask").extra["executor"] == "dask x2"


def test_precompute_through_dask_address_writes_the_local_run_index_and_shards(
    cluster, caption_store, tiny_model_dir, tmp_path
):
    options = {"resolution": 64, "batch_size": 4, "shard_size": 6}
    local = run_precompute(
        caption_store, tmp_path / "local", PrecomputeConfig(model=tiny_model_dir, **options)
    )
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    result = t2i(
        "precompute",
        str(caption_store),
        str(tmp_path / "dask"),
        "--model",
        tiny_model_dir,
        *flags,
        "--dask-address",
        cluster.address,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert tables(tmp_path / "dask") == tables(local)
    shards = sorted(p.name for p in (local / "shards").iterdir())
    assert len(shards) > 4 and shards == sorted(
        p.name for p in (tmp_path / "dask" / "shards").iterdir()
    )
    for name in shards:
        a, b = (
            load_file(str(local / "shards" / name)),
            load_file(str(tmp_path / "dask" / "shards" / name)),
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_end_to_end_on_a_dask_task_runner_completes_with_curate_fanned_out(cluster, tmp_path):
    from prefect.testing.utilities import prefect_test_harness
    from prefect_dask import DaskTaskRunner

    from flows.end_to_end import end_to_end, tiny_kit

    flow = end_to_end.with_options(task_runner=DaskTaskRunner(address=cluster.address))
    with prefect_test_harness(server_startup_timeout=180):
        result = flow(**tiny_kit(str(tmp_path / "run")))
    done = {r["stage"]: r for r in result["stages"]}
    assert {"curate", "caption", "precompute"} <= set(done) and not any(
        r["skipped"] for r in done.values()
    )
    assert done["sample"]["counts"]["images"] > 0
    for stage in (
        "curate",
        "caption",
        "precompute",
    ):  # each mapped its shards over the flow's cluster
        assert Manifest.read(done[stage]["output"]).extra["executor"] == "dask x2"
