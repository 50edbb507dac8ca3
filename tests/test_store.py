import os
import signal
import subprocess
import sys
import textwrap
import time

import datasets
import pytest

from curate.runtime.store import (
    Manifest,
    Rejection,
    StoreError,
    fingerprint,
    is_done,
    load_rejected,
    load_samples,
    sample_id,
)
from curate.runtime.store_writer import StageWriter, WorkLog

FEATURES = datasets.Features({"id": datasets.Value("string"), "caption": datasets.Value("string")})


def _rows(n):
    return ({"id": sample_id(str(i).encode()), "caption": f"caption {i}"} for i in range(n))


def test_sample_id_is_sha256_of_the_bytes():
    assert sample_id(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_a_committed_output_reads_back_with_its_manifest(tmp_path):
    out = tmp_path / "out"
    params = {"threshold": 0.5}
    with StageWriter(out, "curate", params, "fp-1") as writer:
        writer.write_samples(_rows(5), FEATURES)
        writer.write_rejected([Rejection("x" * 64, "curate", "too_small", 12.0, 64.0)])
        writer.counts.update(kept=5, rejected=1)
    samples, rejected = load_samples(out), load_rejected(out)
    assert samples.num_rows == 5 and samples[0]["caption"] == "caption 0"
    assert rejected[0]["reason"] == "too_small" and rejected[0]["threshold"] == 64.0
    manifest = Manifest.read(out)
    assert manifest.counts == {"kept": 5, "rejected": 1}
    assert manifest.versions["datasets"] == datasets.__version__
    assert is_done(out, "curate", params, "fp-1")
    assert not is_done(out, "curate", {"threshold": 0.6}, "fp-1")
    assert not is_done(out, "curate", params, "fp-2")
    assert not is_done(out, "caption", params, "fp-1")


def test_a_failing_stage_leaves_the_previous_output_untouched(tmp_path):
    out = tmp_path / "out"
    with StageWriter(out, "s", {}, "a") as writer:
        writer.write_samples(_rows(2), FEATURES)
    with pytest.raises(RuntimeError), StageWriter(out, "s", {"new": 1}, "a") as writer:
        writer.write_samples(_rows(3), FEATURES)
        raise RuntimeError("boom")
    assert load_samples(out).num_rows == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_loading_something_that_is_not_a_stage_output_says_so(tmp_path):
    with pytest.raises(StoreError, match="not a finished stage output"):
        load_samples(tmp_path)


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"1")
    before = fingerprint(tmp_path)
    assert fingerprint(tmp_path) == before
    time.sleep(0.01)
    (tmp_path / "a.jpg").write_bytes(b"22")
    assert fingerprint(tmp_path) != before


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time, datasets
    from curate.runtime.store_writer import StageWriter
    features = datasets.Features({"id": datasets.Value("string")})
    with StageWriter(sys.argv[1], "slow", {}, "fp") as writer:
        writer.write_samples(({"id": str(i)} for i in range(100)), features)
        print("written", flush=True)
        time.sleep(60)
    """
)


def test_a_killed_stage_leaves_nothing_that_looks_finished(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "written"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert not is_done(out, "slow", {}, "fp")
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert leftovers, "the killed writer should have left its temporary directory"
    with pytest.raises(StoreError):
        load_samples(out)
    # The next run of the stage clears the dead run's leftovers and commits normally.
    with StageWriter(out, "slow", {}, "fp") as writer:
        writer.write_samples(
            ({"id": str(i)} for i in range(3)), datasets.Features({"id": datasets.Value("string")})
        )
    assert is_done(out, "slow", {}, "fp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_worklog_chunks_survive_and_are_keyed(tmp_path):
    out = tmp_path / "out"
    log = WorkLog(out, "key-a")
    log.write("00001", [{"id": "b"}])
    log.write("00000", [{"id": "a"}])
    assert WorkLog(out, "key-a").names() == ["00000", "00001"]
    assert [r["id"] for r in WorkLog(out, "key-a").rows()] == ["a", "b"]
    assert WorkLog(out, "key-b").names() == []
    log.clear()
    assert WorkLog(out, "key-a").names() == []
