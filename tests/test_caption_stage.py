import json
import multiprocessing
import os
import signal
import time

import datasets
import pytest

from captioning.cleaning import word_budget
from captioning.config import CaptionConfig
from captioning.stage import captioner_id, captioner_spec, run_caption
from curate.runtime.store import Manifest, load_samples
from flows.cli import main as t2i
from model.tokenizers import build_t5_tokenizer

# Small chunks and batches so that a run has many chunks to resume from.
FAST = {"max_new_tokens": 24, "max_caption_tokens": 12, "chunk_size": 4, "batch_size": 4}


def _config(model, **options):
    return CaptionConfig(model=model, **{**FAST, **options})


def _undecoded(dataset):
    return dataset.cast_column("image", datasets.Image(decode=False))


def _captions(out):
    table = load_samples(out).select_columns(["id", "caption_synthetic", "captioner"])
    return {row["id"]: (row["caption_synthetic"], row["captioner"]) for row in table}


@pytest.fixture(scope="module")
def captioned(caption_store, tiny_captioner_dir, tmp_path_factory):
    """The curated demo store captioned by the tiny VLM (transformers backend), uninterrupted."""
    out = tmp_path_factory.mktemp("captioned") / "out"
    return run_caption(caption_store, out, _config(tiny_captioner_dir))


def test_every_row_and_column_is_kept_and_good_rows_get_a_synthetic_caption(
    caption_store, captioned
):
    before, after = (_undecoded(load_samples(d)) for d in (caption_store, captioned))
    assert after.column_names == before.column_names + ["caption_synthetic", "captioner"]
    for column in before.column_names:
        assert after[column] == before[column], column  # images included, byte for byte
    manifest = Manifest.read(captioned)
    captioner = manifest.extra["captioner"]
    good = [
        row for row in after.select_columns(["caption_synthetic", "captioner"]) if row["captioner"]
    ]
    assert len(good) == len(before) - 1 == manifest.counts["captioned"]
    assert {row["captioner"] for row in good} == {captioner}
    assert all(row["caption_synthetic"].strip() for row in good)
    assert all(len(row["caption_synthetic"].split()) <= FAST["max_caption_tokens"] for row in good)
    assert (
        manifest.parameters["captioner"] == captioner
        and manifest.parameters["captioner_spec"]["prompt"]
    )


def test_a_row_that_cannot_be_captioned_keeps_its_caption_and_is_reported(caption_store, captioned):
    failures = json.loads((captioned / "failures.json").read_text())
    assert len(failures) == 1 and "undecodable image" in failures[0]["reason"]
    row = next(r for r in _undecoded(load_samples(captioned)) if r["id"] == failures[0]["id"])
    assert row["caption_synthetic"] is None and row["captioner"] is None
    assert row["caption"] == "a truncated file"  # the original caption, untouched
    report = (captioned / "report.md").read_text()
    assert failures[0]["id"] in report and "truncated" in report
    assert Manifest.read(captioned).counts == {
        "input": 21,
        "kept": 21,
        "rejected": 0,
        "captioned": 20,
        "failed": 1,
        "truncated": 20,
    }


def test_rerunning_a_run_with_failures_retries_only_the_failed_rows(
    caption_store, captioned, tiny_captioner_dir
):
    before = _captions(captioned)
    run_caption(caption_store, captioned, _config(tiny_captioner_dir))
    this_run = Manifest.read(captioned).extra["this_run"]
    assert this_run == {"resumed_rows": 20, "captioned_rows": 0, "reused_from_input": 0}
    assert _captions(captioned) == before


def test_the_command_line_run_fits_t5_tokens_and_a_finished_run_is_skipped(
    make_caption_store, tiny_captioner_dir, tmp_path
):
    store = make_caption_store(tmp_path / "store", ["astronaut", "coffee"])
    t5 = build_t5_tokenizer()
    t5.save_pretrained(tmp_path / "sd3" / "tokenizer_3")
    argv = [
        "caption",
        str(store),
        str(tmp_path / "out"),
        "--model",
        tiny_captioner_dir,
        "--prompt",
        "hint",
        "--budget-tokenizer",
        str(tmp_path / "sd3"),
        "--max-caption-tokens",
        "10",
        "--max-new-tokens",
        "24",
    ]
    assert t2i(argv) == 0
    captions = [c for c, _ in _captions(tmp_path / "out").values()]
    assert all(c and len(t5(c)["input_ids"]) <= 10 for c in captions)
    spec = Manifest.read(tmp_path / "out").parameters["captioner_spec"]
    assert "{caption}" in spec["prompt"] and spec["budget"]["counter"].startswith("T5")
    assert not (tmp_path / ".out.work").exists()  # the work log is gone once every row succeeded

    written = (tmp_path / "out" / "manifest.json").stat().st_mtime_ns
    assert t2i(argv) == 0
    assert (tmp_path / "out" / "manifest.json").stat().st_mtime_ns == written  # skipped


def test_a_store_captioned_by_the_same_captioner_is_not_captioned_again(
    captioned, tiny_captioner_dir, tmp_path
):
    again = run_caption(captioned, tmp_path / "again", _config(tiny_captioner_dir))
    assert Manifest.read(again).extra["this_run"]["reused_from_input"] == 20
    assert _captions(again) == _captions(captioned)


def test_the_captioner_id_names_the_model_prompt_and_decoding_settings(tiny_captioner_dir):
    def cid(**options):
        config = _config(tiny_captioner_dir, **options)
        return captioner_id(
            captioner_spec(config, "Describe {caption}", word_budget(config.max_caption_tokens))
        )

    base = cid()
    assert base.startswith("vlm@") and base == cid(
        batch_size=1, chunk_size=3, device="cpu"
    )  # how, not what
    assert len({base, cid(max_new_tokens=30), cid(do_sample=True), cid(max_caption_tokens=40)}) == 4


def test_bad_inputs_are_clear_errors(caption_store, tmp_path, capsys):
    assert t2i(["caption", str(tmp_path), str(tmp_path / "o"), "--model", "m"]) == 1
    assert "manifest.json" in capsys.readouterr().err
    (tmp_path / "m").mkdir()  # apart from OUT: the guard refuses an OUT inside a read
    assert (
        t2i(["caption", str(caption_store), str(tmp_path / "o"), "--model", str(tmp_path / "m")])
        == 1
    )
    assert "not a transformers model folder" in capsys.readouterr().err
    assert (
        t2i(
            [
                "caption",
                str(caption_store),
                str(tmp_path / "o"),
                "--model",
                "m",
                "--backend",
                "openai",
            ]
        )
        == 1
    )
    assert "--endpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_run_killed_with_sigkill_resumes_and_captions_every_row_exactly_once(
    caption_store, captioned, tiny_captioner_dir, tmp_path
):
    # A forked child runs the stage (no second interpreter start-up); the kill is a real SIGKILL.
    config = _config(tiny_captioner_dir)
    child = multiprocessing.get_context("fork").Process(
        target=run_caption, args=(caption_store, tmp_path / "out", config)
    )
    child.start()
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.work/*/chunk-*.parquet")) and child.is_alive():
        assert time.monotonic() < deadline, "no chunk written in 120 s"
        time.sleep(0.002)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL  # it was still working when killed
    assert not (tmp_path / "out").exists()  # nothing that looks finished

    resumed = run_caption(caption_store, tmp_path / "out", config)
    this_run = Manifest.read(resumed).extra["this_run"]
    assert (
        this_run["resumed_rows"] >= FAST["chunk_size"]
    )  # chunks finished before the kill are kept
    assert this_run["resumed_rows"] + this_run["captioned_rows"] == 20  # nothing captioned twice
    ids = load_samples(resumed)["id"]
    assert len(ids) == len(set(ids)) == 21
    assert _captions(resumed) == _captions(captioned)  # the uninterrupted run, same settings
