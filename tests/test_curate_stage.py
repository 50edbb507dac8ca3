"""Acceptance of `t2i curate` on the demo collection, in all three layouts, with the default scorers."""

import json
import multiprocessing
import os
import signal
import time

import pytest
from PIL import Image

from curate.config import CurateConfig
from curate.demo_data import TRUTH_FILE
from curate.runtime import reasons
from curate.runtime.decode import to_rgb
from curate.runtime.store import Manifest, load_rejected, load_samples
from curate.stage import run_curate

# Scorers off: the resume test checks bookkeeping, not models, and should stay quick.
CHEAP = {"nsfw_detector": "none", "aesthetic_scorer": "none", "workers": 1}


def _truth(root):
    return json.loads((root / TRUTH_FILE).read_text())


def _tables(out):
    samples = load_samples(out).remove_columns("image").sort("id").to_list()
    rejected = sorted(
        load_rejected(out).to_list(), key=lambda r: (r["id"], r["reason"], r["detail"])
    )
    return samples, rejected


def _source_key(source: str) -> str:
    """'demo-000001.tar/astronaut.jpg', 'demo-00000.parquet:astronaut' or 'astronaut.jpg' -> 'astronaut'."""
    name = source.rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return name.split(".", 1)[0]


@pytest.fixture(scope="module")
def curated(demo_root, tmp_path_factory):
    """Default scorers on the folder layout; the same minus the (slow, layout-blind) quality scorer on the others."""
    out = tmp_path_factory.mktemp("curated")
    before = {fmt: _snapshot(demo_root / fmt) for fmt in ("folder", "webdataset", "parquet")}
    runs = {"folder": run_curate(demo_root / "folder", out / "folder", CurateConfig(workers=1))}
    for fmt in ("webdataset", "parquet"):
        runs[fmt] = run_curate(
            demo_root / fmt, out / fmt, CurateConfig(workers=1, aesthetic_scorer="none")
        )
    runs["inputs_before"] = before
    return runs


def _snapshot(root):
    """Every file under ROOT with its bytes and modification time."""
    return {
        p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("fmt", ["folder", "webdataset", "parquet"])
def test_every_input_is_kept_or_rejected_with_its_planted_reason(curated, demo_root, fmt):
    truth = _truth(demo_root / fmt)
    out = curated[fmt]
    samples, rejected = _tables(out)
    kept_keys = {_source_key(s["source"]) for s in samples}
    rejected_by_key = {
        _source_key(r["detail"].split()[0].removeprefix("source=")): r for r in rejected
    }
    assert len(samples) + len(rejected) == len(truth)
    assert kept_keys | set(rejected_by_key) == set(truth)
    assert {s["id"] for s in samples} | {r["id"] for r in rejected} == {
        v["id"] for v in truth.values()
    }
    for key, expected in truth.items():
        if expected["expect"] == "keep":
            assert key in kept_keys, f"{key} should be kept, got {rejected_by_key.get(key)}"
        else:
            assert rejected_by_key[key]["reason"] == expected["expect"], key
    assert Manifest.read(out).counts == {
        "input": len(truth),
        "kept": len(samples),
        "rejected": len(rejected),
    }


def test_each_near_duplicate_group_keeps_exactly_one_image_and_names_it(curated, demo_folder):
    truth = _truth(demo_folder)
    samples, rejected = _tables(curated["folder"])
    kept_ids = {s["id"] for s in samples}
    groups = {}
    for value in truth.values():
        if value["group"]:
            groups.setdefault(value["group"], set()).add(value["id"])
    for group, ids in groups.items():
        assert len(ids & kept_ids) == 1, group
    for row in rejected:
        if row["reason"] in (reasons.NEAR_DUPLICATE, reasons.EXACT_DUPLICATE):
            dup_of = row["detail"].split("dup_of=")[1].split()[0]
            assert dup_of in kept_ids
            group = next(v["group"] for v in truth.values() if v["id"] == row["id"])
            assert (
                truth[group]["id"] == dup_of
            )  # the original, with the best score, is the one kept
    exact = [r for r in rejected if r["reason"] == reasons.EXACT_DUPLICATE]
    assert [r["id"] for r in exact] == [
        truth["hubble"]["id"]
    ]  # same bytes, same id, one row per dropped file


def test_the_layouts_read_the_same_samples_and_captions(curated, demo_root):
    truth = _truth(demo_root / "folder")
    captions = {}
    for fmt in ("folder", "webdataset", "parquet"):
        samples, rejected = _tables(curated[fmt])
        captions[fmt] = {s["id"]: s["caption"] for s in samples}
        assert all(
            captions[fmt][v["id"]] == v["caption"]
            for k, v in truth.items()
            if v["expect"] == "keep"
        )
        assert sorted(r["reason"] for r in rejected) == sorted(
            v["expect"] for v in truth.values() if v["expect"] != "keep"
        )
    assert captions["folder"] == captions["webdataset"] == captions["parquet"]


def test_kept_images_decode_upright_in_plain_rgb_and_keep_plain_bytes(curated, demo_folder):
    truth = _truth(demo_folder)
    by_source = {s["source"]: s for s in load_samples(curated["folder"])}
    astronaut = by_source["astronaut.jpg"]
    assert astronaut["id"] == truth["astronaut"]["id"]
    image = astronaut["image"]
    assert image.size == (astronaut["width"], astronaut["height"])
    raw = load_samples(curated["folder"]).cast_column(
        "image", __import__("datasets").Image(decode=False)
    )
    stored = {r["source"]: r["image"]["bytes"] for r in raw}
    assert stored["astronaut.jpg"] == (demo_folder / "astronaut.jpg").read_bytes()
    for key in ("cmyk", "palette", "sixteen_bit", "exif_rotated"):
        source = f"{key}.{truth[key]['ext']}"
        decoded = Image.open(__import__("io").BytesIO(stored[source]))
        assert decoded.mode == "RGB" and decoded.format == "PNG", key
        assert decoded.getexif().get(0x0112) in (None, 1)
        assert to_rgb(stored[source]).size == (
            by_source[source]["width"],
            by_source[source]["height"],
        )
    clock = by_source["exif_rotated.jpg"]
    assert (clock["width"], clock["height"]) == Image.open(demo_folder / "exif_rotated.jpg").size[
        ::-1
    ]
    assert (
        min(by_source["palette.png"]["image"].getpixel((0, 0))) >= 250
    )  # transparency composited on white


def test_scores_are_columns_and_the_report_is_written(curated):
    out = curated["folder"]
    samples = load_samples(out)
    assert set(samples["aesthetic_kind"]) == {"brisque_quality"}
    assert all(0.0 <= s < 0.8 for s in samples["nsfw_score"])
    report = (out / "report.md").read_text()
    assert "near_duplicate" in report and "technical-quality" in report
    for name in (
        "contact_kept.png",
        "contact_rejected_near_duplicate.png",
        "hist_nsfw.png",
        "hist_aesthetic.png",
    ):
        assert Image.open(out / name).size[0] > 100, name


def test_a_second_run_with_the_same_parameters_is_skipped(curated, demo_folder):
    out = curated["folder"]
    before = (out / "manifest.json").read_text()
    started = time.monotonic()
    assert run_curate(demo_folder, out, CurateConfig(workers=1)) == out
    assert time.monotonic() - started < 5
    assert (out / "manifest.json").read_text() == before


def test_the_input_is_never_modified(curated, demo_root):
    for fmt, before in curated["inputs_before"].items():
        assert _snapshot(demo_root / fmt) == before, fmt


def test_a_run_killed_with_sigkill_resumes_to_the_same_tables(demo_folder, tmp_path):
    reference = run_curate(demo_folder, tmp_path / "reference", CurateConfig(**CHEAP, chunk_size=4))
    out, work = tmp_path / "killed", tmp_path / ".killed.work"
    # A forked copy of this process runs the stage (no second start-up of torch), and is SIGKILLed
    # as soon as its first chunk is on disk.
    child = multiprocessing.get_context("fork").Process(
        target=run_curate, args=(demo_folder, out, CurateConfig(**CHEAP, chunk_size=4))
    )
    child.start()
    deadline = time.monotonic() + 120
    while (
        not list(work.glob("*/chunk-*.parquet"))
        and time.monotonic() < deadline
        and child.is_alive()
    ):
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL
    done_before = {p.name for p in work.glob("*/chunk-*.parquet")}
    assert 1 <= len(done_before) < 8 and not out.exists()
    resumed = run_curate(demo_folder, out, CurateConfig(**CHEAP, chunk_size=4))
    assert _tables(resumed) == _tables(reference)
    assert not work.exists()  # the work log is cleared once the output is committed
