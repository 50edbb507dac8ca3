"""The shard executor: state built once per worker, results for every shard, a dead worker's shard rerun."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from curate.runtime.executor import Executor, Setup, worker_state

BUILDS: list[str] = []


def build(spec: str) -> dict:
    BUILDS.append(spec)
    return {"spec": spec, "pid": os.getpid(), "builds": len(BUILDS)}


def square(state: dict, payload: int) -> tuple[int, int, int]:
    return payload * payload, state["pid"], state["builds"]


def die_once(state: dict, payload: tuple[int, str]) -> int:
    """SIGKILL this worker the first time shard 3 runs (a marker file remembers across processes)."""
    value, marker = payload
    if value == 3 and not Path(marker).exists():
        Path(marker).write_text("killed")
        os.kill(os.getpid(), signal.SIGKILL)
    return value * 10


def test_a_worker_builds_its_state_once_and_a_new_setup_replaces_it():
    first, load = worker_state(Setup(build, "a", "key-a"))
    again, reload = worker_state(Setup(build, "a", "key-a"))
    assert again is first and reload == 0.0
    other, _ = worker_state(Setup(build, "b", "key-b"))
    assert other["spec"] == "b" and other is not first


@pytest.mark.parametrize("workers", [1, 2])
def test_every_shard_comes_back_once_and_models_load_once_per_worker(workers):
    shards = [(f"s{i}", i) for i in range(9)]
    with Executor(workers=workers) as executor:
        results = list(executor.map(Setup(build, "m", f"key-{workers}"), square, shards))
    assert sorted(r.name for r in results) == sorted(name for name, _ in shards)
    assert {r.name: r.value[0] for r in results} == {name: i * i for name, i in shards}
    pids = {r.value[1] for r in results}
    assert len(pids) <= workers and (workers == 1) == (pids == {os.getpid()})
    assert len({r.value[1:] for r in results}) == len(pids)  # one state per worker, built once
    assert sum(r.load_s > 0 for r in results) == len(pids)


def test_a_killed_local_worker_is_replaced_and_its_shard_reruns(tmp_path):
    marker = str(tmp_path / "killed-once")
    shards = [(f"s{i}", (i, marker)) for i in range(8)]
    with Executor(workers=2) as executor:
        results = {r.name: r.value for r in executor.map(Setup(build, "m", "k"), die_once, shards)}
    assert Path(marker).exists()  # a worker really died mid-shard
    assert results == {f"s{i}": i * 10 for i in range(8)}


def test_curate_chunks_close_at_the_pixel_bound_whatever_the_image_count():
    import io

    from PIL import Image

    from curate.config import CurateConfig
    from curate.records import Record
    from curate.shards import chunks as cut

    def jpeg(side: int, shade: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (side, side), (shade, 0, 0)).save(buffer, "JPEG")
        return buffer.getvalue()

    sides = [400, 400, 400, 1000, 100, 100, 100, 100]  # 160k px each, then one 1 Mpx image
    records = [Record(f"{i}.jpg", jpeg(side, i), "") for i, side in enumerate(sides)]
    records.append(Record("broken.jpg", b"not an image", ""))
    config = CurateConfig(chunk_size=5, chunk_pixels=500_000)
    chunks = [[item["key"] for item in chunk] for chunk in cut(iter(records), config)]
    assert chunks == [
        ["0.jpg", "1.jpg", "2.jpg"],
        ["3.jpg"],
        ["4.jpg", "5.jpg", "6.jpg", "7.jpg", "broken.jpg"],
    ]


FAULTS = """
import resource, sys
import numpy as np
from curate.runtime.executor import _heap_for_tensors

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(100):
        buffer = np.ones(1 << 18, np.float32)  # 1 MiB, like an image tensor
        del buffer
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
small = faults()
changed = _heap_for_tensors()
faults()
print(small, faults(), changed)
"""


@pytest.mark.skipif(not Path("/lib/x86_64-linux-gnu/libc.so.6").exists(), reason="glibc only")
def test_a_worker_started_with_a_small_trim_threshold_stops_page_faulting_on_every_tensor():
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536: each 1 MiB buffer is then mmapped afresh."""
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    small, restored, changed = int(out[0]), int(out[1]), out[2]
    assert changed == "True"
    assert small >= 100 * 200  # every buffer faulted in page by page (256 pages of 4 KiB)
    assert restored * 20 < small
    env.pop("MALLOC_TRIM_THRESHOLD_")  # glibc's defaults: nothing to undo
    out = subprocess.run(
        [sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[2] == "False"
