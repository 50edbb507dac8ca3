"""The output guard (curate/runtime/stage_runtime.py: check_output), through the real command line.

No command deletes what it did not write: OUT may not be, lie inside or contain what the stage
reads; a file is never an OUT; a non-empty folder the pipeline did not write is refused, even
with --overwrite; another stage's output is replaced only with --overwrite. Each refusal is one
line and a non-zero exit, and a hash of the whole tree around it is the same before and after.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from bad_corpus import tree_hash
from PIL import Image

from curate.runtime.output_guard import OWNER_FILE, OutputRefused, check_output, overwrite_allowed
from flows.cli import COMMANDS, main

CHEAP = ["--nsfw-detector", "none", "--aesthetic-scorer", "none", "--workers", "1"]


def images(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        colour = (40 * index + 30, 200 - 50 * index, 90)
        Image.new("RGB", (48, 40), colour).save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(f"a flat colour number {index}\n")
    return folder


def pair_folder(folder: Path) -> Path:
    pair = folder / "p0"
    pair.mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(pair / "winner.png")
    Image.new("RGB", (32, 32), (30, 30, 200)).save(pair / "loser.png")
    (pair / "caption.txt").write_text("a red square\n")
    return folder


def refused(capsys, tmp_path: Path, argv: list[str], *expected: str) -> str:
    """Run ARGV from TMP_PATH; assert a one-line refusal, exit 1, and TMP_PATH unchanged."""
    before = tree_hash(tmp_path)
    capsys.readouterr()  # what setting up printed
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = main(argv)
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert len(err.splitlines()) == 1, err
    assert "refusing to write" in err, err
    for text in expected:
        assert text in err, err
    assert tree_hash(tmp_path) == before, "the refused run changed files around it"
    return err


def ran(capsys, tmp_path: Path, argv: list[str]) -> str:
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = main(argv)
    finally:
        os.chdir(cwd)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.err


# ---- the reproductions from issue 24 -----------------------------------------------------------


def test_curate_into_the_folder_holding_its_input_is_refused(capsys, tmp_path):
    images(tmp_path / "data" / "raw")
    (tmp_path / "data" / "notes.txt").write_text("a sibling of the input\n")
    refused(capsys, tmp_path, ["curate", "data/raw", "data", *CHEAP], "contains the input data/raw")


def test_caption_into_the_project_holding_its_input_store_is_refused(
    capsys, tmp_path, make_caption_store
):
    make_caption_store(tmp_path / "proj" / "curated", keys=["astronaut"])
    (tmp_path / "proj" / "plan.md").write_text("what the project is\n")
    argv = ["caption", "proj/curated", "proj", "--model", "proj/no-such-vlm"]
    refused(capsys, tmp_path, argv, "contains the input proj/curated")


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_a_folder_the_pipeline_did_not_write_is_refused_even_with_overwrite(
    capsys, tmp_path, overwrite
):
    images(tmp_path / "imgs")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.txt").write_text("x\n")
    argv = ["curate", "imgs", "docs", *CHEAP, *overwrite]
    refused(capsys, tmp_path, argv, "docs", "thesis.txt", "did not write", "--overwrite")


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_a_regular_file_as_output_is_refused(capsys, tmp_path, overwrite):
    images(tmp_path / "imgs")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.txt").write_text("x\n")
    argv = ["curate", "imgs", "docs/thesis.txt", *CHEAP, *overwrite]
    refused(capsys, tmp_path, argv, "thesis.txt", "is a file")


def test_prefs_onto_its_own_input_is_refused(capsys, tmp_path):
    pair_folder(tmp_path / "pairs")
    refused(capsys, tmp_path, ["prefs", "pairs", "pairs"], "it is the input pairs")


# ---- the rule, for every command that writes --------------------------------------------------


def test_an_output_inside_the_input_or_a_link_to_it_is_refused(capsys, tmp_path):
    images(tmp_path / "imgs")
    refused(capsys, tmp_path, ["curate", "imgs", "imgs/out", *CHEAP], "lies inside the input")
    (tmp_path / "link").symlink_to("imgs")
    refused(capsys, tmp_path, ["curate", "imgs", "link", *CHEAP], "it is the input")


def _self_output(name: str) -> list[str]:
    """COMMAND with OUT = what it reads (every command that reads something)."""
    return {
        "curate": ["curate", "in", "in", *CHEAP],
        "caption": ["caption", "store", "store", "--model", "vlm"],
        "precompute": ["precompute", "store", "store", "--model", "model"],
        "train": ["train", "in", "in", "--model", "model"],
        "prefs": ["prefs", "pairs", "pairs"],
        "make-prefs": ["make-prefs", "in", "--source", "in"],
        "dpo": ["dpo", "pairs", "pairs", "--model", "model"],
        "sample": ["sample", "--model", "model", "--prompt", "x", "--out", "model"],
        "lora-convert": ["lora-convert", "lora.safetensors", "lora.safetensors", "--to", "kohya"],
    }[name]


READERS = [
    "curate",
    "caption",
    "precompute",
    "train",
    "prefs",
    "make-prefs",
    "dpo",
    "sample",
    "lora-convert",
]


def _inputs(tmp_path: Path, make_caption_store) -> None:
    images(tmp_path / "in")
    make_caption_store(tmp_path / "store", keys=["astronaut"])
    pair_folder(tmp_path / "pairs")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    (tmp_path / "vlm").mkdir()
    (tmp_path / "lora.safetensors").write_bytes(b"not read: refused first")


@pytest.mark.parametrize("name", READERS)
def test_every_command_refuses_to_write_over_what_it_reads(
    capsys, tmp_path, make_caption_store, name
):
    _inputs(tmp_path, make_caption_store)
    read = {"train": "encoded", "dpo": "prefs", "make-prefs": "source", "sample": "model"}
    refused(capsys, tmp_path, _self_output(name), f": it is the {read.get(name, 'input')} ")


def _foreign_output(name: str) -> list[str]:
    """COMMAND writing into `docs`, a folder holding a file the pipeline did not write."""
    return {
        "demo-data": ["demo-data", "docs"],
        "init-model": ["init-model", "docs"],
        "init-captioner": ["init-captioner", "docs"],
        "curate": ["curate", "in", "docs", *CHEAP],
        "caption": ["caption", "store", "docs", "--model", "vlm"],
        "precompute": ["precompute", "store", "docs", "--model", "model"],
        "train": ["train", "in", "docs", "--model", "model"],
        "prefs": ["prefs", "pairs", "docs"],
        "make-prefs": ["make-prefs", "docs", "--source", "in"],
        "dpo": ["dpo", "pairs", "docs", "--model", "model"],
        "sample": ["sample", "--model", "model", "--prompt", "x", "--out", "docs"],
    }[name]


WRITERS = ["demo-data", "init-model", "init-captioner", *READERS[:-1]]


@pytest.mark.parametrize("name", WRITERS)
def test_every_command_refuses_a_folder_it_did_not_write(
    capsys, tmp_path, make_caption_store, name
):
    _inputs(tmp_path, make_caption_store)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.txt").write_text("x\n")
    refused(capsys, tmp_path, [*_foreign_output(name), "--overwrite"], "thesis.txt")


def test_every_command_that_writes_takes_overwrite():
    from flows.cli import build_parser

    parser = build_parser()
    names = {c.name for c in COMMANDS if c.writes}
    assert set(WRITERS) | {"lora-convert", "export-single-file", "merge-lora", "run-all"} == names
    for name in names:
        args = parser.parse_args([name, *["x"] * len(_positionals(name)), "--overwrite"])
        assert args._overwrite is True


def _positionals(name: str) -> list[str]:
    return next(c.positional_names for c in COMMANDS if c.name == name)


# ---- what is allowed: its own output, and another stage's with --overwrite ----------------------


def test_own_output_is_rewritten_another_stages_only_with_overwrite(capsys, tmp_path):
    images(tmp_path / "in")
    make = ["make-prefs", "--source", "in", "--pairs-per-image", "1"]
    ran(capsys, tmp_path, [make[0], "pairs", *make[1:]])
    ran(capsys, tmp_path, ["prefs", "pairs", "table"])
    err = refused(capsys, tmp_path, [make[0], "table", *make[1:]], "output of `t2i prefs`")
    assert "--overwrite" in err
    ran(capsys, tmp_path, [make[0], "table", *make[1:], "--overwrite"])
    manifest = json.loads((tmp_path / "table" / "manifest.json").read_text())
    assert manifest["stage"] == "make-prefs"
    # its own output, other parameters: replaced without --overwrite
    ran(capsys, tmp_path, [make[0], "table", "--source", "in", "--pairs-per-image", "2"])
    # a file someone put into an output is never removed by a rerun, with or without --overwrite
    (tmp_path / "table" / "mine.txt").write_text("my notes\n")
    again = [make[0], "table", "--source", "in", "--pairs-per-image", "1"]
    refused(capsys, tmp_path, again, "mine.txt", "did not write")
    refused(capsys, tmp_path, [*again, "--overwrite"], "mine.txt")


def test_demo_data_rewrites_its_own_folder_but_not_one_with_foreign_files(capsys, tmp_path):
    ran(capsys, tmp_path, ["demo-data", "data"])
    ran(capsys, tmp_path, ["demo-data", "data", "--format", "parquet"])  # its own: replaced
    ran(capsys, tmp_path, ["demo-data", "data", "--format", "all"])
    ran(capsys, tmp_path, ["demo-data", "data", "--format", "webdataset"])
    assert {p.suffix for p in (tmp_path / "data").iterdir()} == {".json", ".tar"}
    (tmp_path / "data" / "mine.txt").write_text("my notes\n")
    refused(capsys, tmp_path, ["demo-data", "data", "--overwrite"], "mine.txt")


def test_single_file_writers_replace_an_existing_file_only_with_overwrite(capsys, tmp_path):
    (tmp_path / "in.safetensors").write_bytes(b"not read: refused first")
    (tmp_path / "out.safetensors").write_bytes(b"someone's file")
    (tmp_path / "model").mkdir()
    argv = ["lora-convert", "in.safetensors", "out.safetensors", "--to", "kohya"]
    refused(capsys, tmp_path, argv, "out.safetensors", "--overwrite")
    argv = ["export-single-file", "model", "out.safetensors"]
    refused(capsys, tmp_path, argv, "out.safetensors", "--overwrite")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "pytorch_lora_weights.safetensors").write_bytes(b"someone's")
    argv = ["lora-convert", "in.safetensors", "folder", "--to", "kohya"]
    refused(capsys, tmp_path, argv, "pytorch_lora_weights.safetensors", "--overwrite")


def test_an_empty_folder_is_a_fine_output(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", "curate", {}) == (tmp_path / "empty").resolve()


def test_an_unfinished_in_place_output_is_its_stages_own(tmp_path):
    """A killed `t2i train` leaves OUT with checkpoints and no manifest: its rerun (--resume)
    may continue there; another stage may not take it without --overwrite."""
    out = tmp_path / "trained"
    (out / "training" / "checkpoints").mkdir(parents=True)
    (out / OWNER_FILE).write_text(json.dumps({"stage": "train"}))
    assert check_output(out, "train") == out.resolve()
    with pytest.raises(OutputRefused, match="output of `t2i train`"):
        check_output(out, "dpo")
    with overwrite_allowed():
        assert check_output(out, "dpo") == out.resolve()
    (out / OWNER_FILE).unlink()
    with pytest.raises(OutputRefused, match="did not write"):
        check_output(out, "train")


def test_a_manifest_json_of_another_program_is_not_ours(tmp_path):
    out = tmp_path / "site"
    out.mkdir()
    (out / "manifest.json").write_text('{"name": "a web app", "icons": []}')
    with pytest.raises(OutputRefused, match="did not write"), overwrite_allowed():
        check_output(out, "curate")
