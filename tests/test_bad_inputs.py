"""The bad-input corpus (tests/bad_corpus.py) through curate, caption, precompute, prefs and make-prefs.

Every run finishes; input = kept + rejected; each planted case has its reason; nothing outside
IN and OUT is read or written: the canaries outside IN never reach an output, the folders around
them are unchanged, and the folder holding the outputs holds nothing else afterwards. Its parent
is made read-only too, which stops a stray write when the tests do not run as root (as root,
the before/after comparison is what catches one).
"""

from __future__ import annotations

import io
import json
import os
import stat

import bad_corpus
import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from captioning.config import CaptionConfig
from captioning.stage import run_caption
from curate.config import CurateConfig
from curate.runtime import reasons
from curate.runtime.markdown import escape
from curate.runtime.store import Manifest, load_rejected, load_samples, sample_id
from curate.runtime.store_writer import StageWriter
from curate.stage import run_curate
from dpo.config import IngestPrefsConfig, MakePrefsConfig
from dpo.ingest import run_prefs
from dpo.synthetic import run_make_prefs
from model.config import PrecomputeConfig
from model.precompute import run_precompute

CHEAP = {"nsfw_detector": "none", "aesthetic_scorer": "none", "workers": 1}
FAST_CAPTION = {"max_new_tokens": 12, "max_caption_tokens": 12, "chunk_size": 4, "batch_size": 4}
IMAGE_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "caption": datasets.Value("string"),
        "source": datasets.Value("string"),
    }
)


def _snapshot(root):
    """Every entry under ROOT (links not followed) with its bytes or link target and mtime."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                content = os.readlink(path).encode()
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as handle:
                    content = handle.read()
            else:
                content = b""
            found[os.path.relpath(path, root)] = (content, info.st_mtime_ns)
    return found


def _files_bytes(root):
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as handle:
                yield os.path.join(directory, name), handle.read()


@pytest.fixture(scope="module")
def corpus(demo_folder, tmp_path_factory):
    base = tmp_path_factory.mktemp("bad")
    built = bad_corpus.build(base, demo_folder)
    built.before = {"in": _snapshot(built.root), "outside": _snapshot(built.outside)}
    return built


@pytest.fixture(scope="module")
def area(tmp_path_factory):
    """OUTs live in AREA; AREA's parent is read-only for the whole module."""
    parent = tmp_path_factory.mktemp("readonly")
    folder = parent / "area"
    folder.mkdir()
    parent.chmod(0o555)
    yield folder
    parent.chmod(0o755)


@pytest.fixture(scope="module")
def crafted_store(corpus, tmp_path_factory):
    """A stage output whose image cells are hostile: a path to the canary, a bomb, a truncated PNG."""
    good = corpus.root.joinpath("astronaut.jpg").read_bytes()
    rows = [
        ("good", {"bytes": good, "path": None}),
        ("path", {"bytes": None, "path": str(corpus.outside / "canary.png")}),
        ("bomb", {"bytes": corpus.bomb, "path": None}),
        ("truncated", {"bytes": corpus.truncated_png, "path": None}),
    ]
    out = tmp_path_factory.mktemp("crafted") / "store"
    # image as a plain struct: `datasets.Image()` would itself read the path while saving
    cell = {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}
    features = datasets.Features({**IMAGE_FEATURES, "image": cell})
    with StageWriter(out, "curate", {"crafted": True}, "crafted") as writer:
        writer.write_samples(
            [
                {
                    "id": f"{name}-{index}",
                    "image": cell,
                    "caption": f"<b>{name}</b>",
                    "source": name,
                }
                for index, (name, cell) in enumerate(rows)
            ],
            features,
        )
        writer.counts.update(input=len(rows), kept=len(rows), rejected=0)
    return out


@pytest.fixture(scope="module")
def curated(corpus, area):
    return run_curate(corpus.root, area / "curated", CurateConfig(**CHEAP))


def _rejection_for(rejected, key):
    """The rejection whose detail names KEY as its source."""
    found = [
        r
        for r in rejected
        if r["detail"] == f"source={key}" or r["detail"].startswith(f"source={key} ")
    ]
    assert len(found) == 1, (key, found)
    return found[0]


def test_curate_finishes_with_every_planted_case_kept_or_rejected_with_its_reason(corpus, curated):
    counts = Manifest.read(curated).counts
    assert counts["input"] == len(corpus.expect) == counts["kept"] + counts["rejected"]
    samples, rejected = load_samples(curated), load_rejected(curated).to_list()
    kept = {row["source"] for row in samples.remove_columns("image")}
    assert kept == {key for key, want in corpus.expect.items() if want == "keep"}
    for key, want in corpus.expect.items():
        if want != "keep":
            assert _rejection_for(rejected, key)["reason"] == want, key
    # a valid image whose caption is not text is kept with no caption, and says why
    notes = {
        row["source"]: (row["caption"], row["caption_note"])
        for row in samples.remove_columns("image")
    }
    dropped = {key for key, (_, note) in notes.items() if note}
    assert dropped == corpus.captions_dropped
    for key in dropped:
        caption, note = notes[key]
        assert caption == "" and "caption dropped, image kept" in note, (key, note)
    assert "not UTF-8 text (byte 0xe9" in notes["latin1_caption.jpg"][1]
    assert "latin1_caption.txt" in notes["latin1_caption.jpg"][1]
    assert "not UTF-8" in notes["shards/latin1.tar/grass.jpg"][1]
    assert notes["latin1_cells.parquet:l1"][1].startswith("caption cell: ")
    assert counts["captions_dropped"] == len(corpus.captions_dropped)
    report = (curated / "report.md").read_text()
    assert "Captions dropped, images kept (4)" in report and escape("latin1_caption.jpg") in report
    # the limits are in the reasons
    long = _rejection_for(rejected, "long_caption.jpg")
    assert "16384" in long["detail"] and "max_caption_bytes" in long["detail"]
    bomb = _rejection_for(rejected, "bomb.png")
    assert (bomb["score"], bomb["threshold"]) == (900_000_000, CurateConfig().max_pixels)
    # a loose image beside the shards was read, and so was the shard's intact sample
    assert {"astronaut.jpg", "shards/cut.tar/hubble.jpg", "cells.parquet:good"} <= kept


def test_the_issue_24_inputs_are_each_counted_with_their_reason_and_limit(corpus, curated):
    rejected = load_rejected(curated).to_list()
    escaped = _rejection_for(rejected, "escaped_ds")
    assert "outside its folder" in escaped["detail"] and "../../outside" in escaped["detail"]
    duplicate = _rejection_for(rejected, "shards/dup.tar/dup.png#2")
    assert duplicate["reason"] == reasons.DUPLICATE_MEMBER and "2 times" in duplicate["detail"]
    deep = _rejection_for(rejected, "deep_json.jpg")
    assert "nests 100000 levels" in deep["detail"] and "limit of 64" in deep["detail"]
    big = _rejection_for(rejected, "shards/big.tar/big.png")
    assert str(bad_corpus.BIG_MEMBER) in big["detail"] and "max_image_bytes" in big["detail"]
    assert "hard link" in _rejection_for(rejected, "hardlink_out.png")["detail"]
    kept = {row["source"] for row in load_samples(curated).remove_columns("image")}
    assert "shards/dup.tar/dup.png" in kept and "hardlink_in.jpg" not in kept


def test_nothing_outside_the_input_reaches_the_output_and_nothing_around_it_changes(
    corpus, curated, area
):
    ids = set(load_samples(curated)["id"])
    assert sample_id(corpus.canary_image) not in ids
    for path, data in _files_bytes(curated):
        assert bad_corpus.SECRET not in data, path
    assert _snapshot(corpus.outside) == corpus.before["outside"]
    assert _snapshot(corpus.root) == corpus.before["in"]
    leftovers = {p.name for p in area.iterdir() if not p.name.endswith(".lock")}
    assert leftovers <= {"curated", "captioned", "encoded", "prefs", "pairs"}, leftovers


def test_the_report_shows_hostile_names_and_captions_as_text(curated):
    report = (curated / "report.md").read_text()
    assert "<img" not in report and "<script" not in report
    assert "&lt;img src=x onerror=alert\\(1\\)&gt;" in report or "notes.jpg" in report


def test_caption_and_precompute_run_on_the_curated_corpus(
    curated, area, tiny_captioner_dir, tiny_model_dir
):
    captioned = run_caption(
        curated, area / "captioned", CaptionConfig(model=tiny_captioner_dir, **FAST_CAPTION)
    )
    counts = Manifest.read(captioned).counts
    assert counts["kept"] == Manifest.read(curated).counts["kept"] and counts["failed"] == 0
    report = (captioned / "report.md").read_text()
    assert "<script" not in report and "<img" not in report
    encoded = run_precompute(
        captioned, area / "encoded", PrecomputeConfig(model=tiny_model_dir, resolution=64)
    )
    counts = Manifest.read(encoded).counts
    assert (
        counts.get("kept", 0) + counts.get("rejected", 0) == Manifest.read(captioned).counts["kept"]
    )


def test_caption_reports_each_hostile_cell_with_its_reason_and_never_reads_the_path(
    corpus, crafted_store, tiny_captioner_dir, tmp_path
):
    out = run_caption(
        crafted_store,
        tmp_path / "captioned",
        CaptionConfig(model=tiny_captioner_dir, **FAST_CAPTION),
    )
    failures = {
        f["id"].split("-")[0]: f["reason"] for f in json.loads((out / "failures.json").read_text())
    }
    assert set(failures) == {"path", "bomb", "truncated"}
    assert reasons.UNSAFE_PATH in failures["path"]
    assert reasons.DECOMPRESSION_BOMB in failures["bomb"]
    assert reasons.TRUNCATED in failures["truncated"]
    assert Manifest.read(out).counts["kept"] == 4  # the caption stage keeps every row
    report = (out / "report.md").read_text()
    assert "<b>" not in report


def test_precompute_rejects_each_hostile_cell_with_its_reason(
    crafted_store, tiny_model_dir, tmp_path
):
    # precompute needs captions: the crafted store has them; the path cell must not be read
    out = run_precompute(
        crafted_store, tmp_path / "encoded", PrecomputeConfig(model=tiny_model_dir, resolution=64)
    )
    rejected = {r["id"].split("-")[0]: r for r in load_rejected(out).to_list()}
    assert set(rejected) == {"path", "bomb", "truncated"}
    assert reasons.UNSAFE_PATH in rejected["path"]["detail"]
    assert reasons.DECOMPRESSION_BOMB in rejected["bomb"]["detail"]
    assert len(load_samples(out)) == 1


def _pair_png(color):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, "PNG")
    return buffer.getvalue()


def test_prefs_rejects_hostile_cells_without_reading_paths(corpus, area):
    source = corpus.outside.parent / "prefs_in"
    source.mkdir(exist_ok=True)
    cell = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    red, blue = _pair_png((200, 0, 0)), _pair_png((0, 0, 200))
    canary = str(corpus.outside / "canary.png")
    rows = [
        ("good", {"bytes": red, "path": None}, {"bytes": blue, "path": None}),
        ("path", {"bytes": None, "path": canary}, {"bytes": blue, "path": None}),
        ("bomb", {"bytes": corpus.bomb, "path": None}, {"bytes": blue, "path": None}),
    ]
    pq.write_table(
        pa.table(
            {
                "caption": [r[0] for r in rows],
                "image_w": pa.array([r[1] for r in rows], cell),
                "image_l": pa.array([r[2] for r in rows], cell),
            }
        ),
        source / "pairs.parquet",
    )
    out = run_prefs(source, area / "prefs", IngestPrefsConfig())
    counts = Manifest.read(out).counts
    assert counts["kept"] == 1 and counts["kept"] + counts["rejected"] == len(rows)
    rejected = {r["detail"].split(":")[0]: r for r in load_rejected(out).to_list()}
    assert rejected["row 1"]["reason"] == reasons.UNSAFE_PATH
    assert reasons.DECOMPRESSION_BOMB in rejected["row 2"]["detail"]
    for path, data in _files_bytes(out):
        assert sample_id(corpus.canary_image) not in path and corpus.canary_image not in data


def test_make_prefs_on_the_corpus_uses_only_the_good_images_and_writes_only_in_out(corpus, area):
    out = run_make_prefs(area / "pairs", MakePrefsConfig(source=str(corpus.root)))
    about = json.loads((out / "PAIRS.json").read_text())
    skipped = set(about["skipped_sources"])
    for key, want in corpus.expect.items():  # each skipped source names its reason
        assert key not in skipped or about["skipped_reasons"][key].startswith(want), key
    assert about["pairs"] + len(skipped) == len(corpus.expect)  # every source used or skipped
    for key, want in corpus.expect.items():  # every rejected source but the duplicate is skipped
        assert (key in skipped) == (
            want not in ("keep", reasons.EXACT_DUPLICATE, reasons.TOO_SMALL)
        ), key
    for path, data in _files_bytes(out):
        assert bad_corpus.SECRET not in data and data != corpus.canary_image, path
    assert _snapshot(corpus.outside) == corpus.before["outside"]


def test_make_prefs_turns_crafted_ids_into_safe_folder_names(tmp_path):
    red = _pair_png((200, 100, 50))
    store = tmp_path / "store"
    with StageWriter(store, "curate", {}, "crafted") as writer:
        writer.write_samples(
            [
                {
                    "id": "x",
                    "image": {"bytes": red, "path": None},
                    "caption": "c",
                    "source": "../../escaped",
                }
            ],
            IMAGE_FEATURES,
        )
        writer.counts.update(input=1, kept=1, rejected=0)
    area = tmp_path / "a" / "b"
    out = run_make_prefs(area / "pairs", MakePrefsConfig(source=str(store)))
    pairs = [p for p in out.iterdir() if (p / "caption.txt").is_file()]
    assert len(pairs) == 1 and pairs[0].parent == out
    assert not (tmp_path / "escaped-00").exists() and not (tmp_path / "a" / "escaped-00").exists()


def test_prefs_pair_folders_never_follow_links_out_or_keep_binary_captions(corpus, tmp_path):
    source = tmp_path / "pairs"
    red, blue = _pair_png((200, 0, 0)), _pair_png((0, 0, 200))
    for name in ("good", "link", "garbage"):
        (source / name).mkdir(parents=True)
        (source / name / "winner.png").write_bytes(red)
        (source / name / "loser.png").write_bytes(blue)
        (source / name / "caption.txt").write_text(f"a {name} pair")
    (source / "link" / "winner.png").unlink()
    os.symlink(corpus.outside / "canary.png", source / "link" / "winner.png")
    (source / "garbage" / "caption.txt").write_bytes(bytes(range(256)))
    out = run_prefs(source, tmp_path / "prefs", IngestPrefsConfig())
    assert Manifest.read(out).counts["kept"] == 1
    rejected = {r["detail"].split(":")[0]: r["reason"] for r in load_rejected(out).to_list()}
    assert rejected == {"link": reasons.UNSAFE_PATH, "garbage": reasons.BAD_CAPTION}


def test_a_make_prefs_run_that_fails_midway_leaves_no_output_prefs_would_accept(
    corpus, tmp_path, monkeypatch
):
    import dpo.synthetic

    made = []
    real_edit = dpo.synthetic.edit

    def failing_edit(*args, **kwargs):
        made.append(1)
        if len(made) > 3:  # a few pairs are written, then the run dies
            raise OSError(28, "No space left on device")
        return real_edit(*args, **kwargs)

    monkeypatch.setattr(dpo.synthetic, "edit", failing_edit)
    out = tmp_path / "pairs"
    with pytest.raises(OSError, match="No space"):
        run_make_prefs(out, MakePrefsConfig(source=str(corpus.root)))
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []
    with pytest.raises((FileNotFoundError, ValueError)):
        run_prefs(out, tmp_path / "prefs", IngestPrefsConfig())
