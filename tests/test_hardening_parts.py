"""Hardening pieces on small exact cases: decoder cap, table cells, ingest layouts and limits,
markdown escaping, credential stripping, and peak memory on decompression bombs and streaming ingest."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import bad_corpus
import pytest
from PIL import Image

from curate.ingest import ROWS_PER_SHARD, plan, read_records, read_shard
from curate.runtime import reasons
from curate.runtime.cells import caption_cell, image_cell
from curate.runtime.decode import Invalid, check, decode_image
from curate.runtime.markdown import escape, fenced
from curate.runtime.redact import strip_credentials
from curate.runtime.store import Manifest
from curate.runtime.store_writer import StageWriter

REPO = Path(__file__).resolve().parents[1]


def _png(size=(200, 160), color=(10, 120, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def test_importing_the_decoder_leaves_pils_own_guard_in_place():
    code = "import PIL.Image as I; a = I.MAX_IMAGE_PIXELS; import curate.runtime.decode; print(a == I.MAX_IMAGE_PIXELS and a is not None)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.stdout.strip() == "True", done.stderr


def test_every_decoder_entry_refuses_a_bomb_and_names_its_cap():
    bomb = bad_corpus.bomb_png(20_000, 10_000)
    for call in (
        lambda: check(bomb, 64, 3.0, 10**8),
        lambda: decode_image(bomb, max_pixels=10**8),
    ):
        with pytest.raises(Invalid) as caught:
            call()
        assert caught.value.reason == reasons.DECOMPRESSION_BOMB
        assert caught.value.score == 200_000_000 and "100000000" in caught.value.detail


def test_a_truncated_png_with_exif_is_one_truncated_rejection():
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.effect_noise((300, 300), 60).convert("RGB").save(buffer, "PNG", exif=exif.tobytes())
    data = buffer.getvalue()
    with pytest.raises(Invalid) as caught:
        check(data[: len(data) // 2], 64, 3.0, 10**8)
    assert caught.value.reason == reasons.TRUNCATED


@pytest.mark.parametrize(
    ("cell", "reason"),
    [
        ("a string", reasons.INVALID_CELL),
        (10**12, reasons.INVALID_CELL),
        ({"bytes": "text", "path": None}, reasons.INVALID_CELL),
        ({"bytes": None, "path": "/etc/passwd"}, reasons.UNSAFE_PATH),
        ({"bytes": None, "path": "../x.png"}, reasons.UNSAFE_PATH),
    ],
)
def test_image_cells_that_are_not_bytes_are_refused_unread(cell, reason):
    with pytest.raises(Invalid) as caught:
        image_cell(cell)
    assert caught.value.reason == reason


def test_path_cells_are_read_under_the_option_only_inside_the_root(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(_png())
    (tmp_path / "outside.png").write_bytes(_png())
    assert image_cell({"bytes": None, "path": "a.png"}, tmp_path / "in") == _png()
    for path in ("../outside.png", str(tmp_path / "outside.png")):
        with pytest.raises(Invalid, match="outside the input folder"):
            image_cell({"bytes": None, "path": path}, tmp_path / "in")


def test_caption_cells_refuse_binary_and_oversized_text_with_the_limit():
    assert caption_cell("  a cat ", 100) == "a cat"
    with pytest.raises(Invalid, match="over the limit of 10"):
        caption_cell("x" * 11, 10)
    with pytest.raises(Invalid, match="not UTF-8"):
        caption_cell(b"\xff\xfe", 10)
    with pytest.raises(Invalid, match="control character"):
        caption_cell("a\x00b", 10)
    with pytest.raises(Invalid, match="int, not text"):
        caption_cell(7, 10)


@pytest.mark.parametrize(
    ("files", "message"),
    [({}, "the folder is empty"), ({"a.txt": "a cat", "b.json": "{}"}, "only 2 caption")],
)
def test_an_input_with_no_image_is_a_clear_error(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        list(read_records(tmp_path))


def test_a_mixed_folder_reads_loose_images_tars_and_parquet_in_path_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.png").write_bytes(_png(color=(1, 1, 1)))
    (tmp_path / "a.txt").write_text("loose")
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        for name, payload in (("s.png", _png(color=(2, 2, 2))), ("s.txt", b"in a tar")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    pq.write_table(
        pa.table({"image": [_png(color=(3, 3, 3))], "caption": ["in parquet"]}),
        tmp_path / "c.parquet",
    )
    (tmp_path / "d.png").write_bytes(_png(color=(4, 4, 4)))
    records = list(read_records(tmp_path))
    assert [(r.key, r.caption) for r in records] == [
        ("a.png", "loose"),
        ("b.tar/s.png", "in a tar"),
        ("c.parquet:0", "in parquet"),
        ("d.png", ""),
    ]
    assert [s.kind for s in plan(tmp_path)] == ["files", "webdataset", "parquet", "files"]


def test_a_saved_dataset_is_planned_as_row_ranges_read_independently(tmp_path):
    import datasets

    rows = ROWS_PER_SHARD + 5
    datasets.Dataset.from_dict(
        {"image": [b"x%d" % i for i in range(rows)], "text": [str(i) for i in range(rows)]}
    ).save_to_disk(str(tmp_path / "ds"))
    shards = plan(tmp_path / "ds")
    assert [s.rows for s in shards] == [(0, ROWS_PER_SHARD), (ROWS_PER_SHARD, rows)]
    assert [r.caption for r in read_shard(tmp_path / "ds", shards[1])] == [
        str(i) for i in range(ROWS_PER_SHARD, rows)
    ]


def test_a_tar_whose_headers_turn_to_garbage_midway_is_reported_not_silently_cut(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload in (("a.png", _png()), ("b.png", _png(color=(9, 9, 9)))):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    data = bytearray(buffer.getvalue())
    second = data.index(b"b.png")
    data[second : second + 512] = b"\x07" * 512  # the second member's header is garbage
    (tmp_path / "x.tar").write_bytes(bytes(data))
    records = list(read_records(tmp_path))
    assert [(r.key, r.refused) for r in records] == [
        ("x.tar/a.png", ""),
        ("x.tar", reasons.CORRUPT_SHARD),
    ]


def test_escape_makes_data_inert_markdown():
    text = escape("<img src=x onerror=alert(1)> [a](javascript:x) `c` | *b*\nnext")
    assert "<" not in text and "\n" not in text and "](" not in text
    assert text.startswith("&lt;img") and "\\|" in text and "\\`c\\`" in text
    assert fenced("```\nbreak out")[0] == "````"


def test_recorded_manifests_never_hold_url_credentials(tmp_path):
    parameters = {"endpoint": "https://alice:s3cret@llm.example:8000/v1", "n": [1, "ftp://u:p@h/x"]}
    assert strip_credentials(parameters) == {
        "endpoint": "https://llm.example:8000/v1",
        "n": [1, "ftp://h/x"],
    }
    with StageWriter(tmp_path / "out", "caption", parameters, "fp") as writer:
        writer.extra["why"] = "called https://bob:pw@h/v1"
    text = (tmp_path / "out" / "manifest.json").read_text()
    assert "s3cret" not in text and "bob:pw" not in text and "alice" not in text
    assert Manifest.read(tmp_path / "out").matches("caption", parameters, "fp")


BOMB_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    sys.path.insert(0, "tests")
    import bad_corpus
    from captioning.chat_request import RequestError, decode_data_url
    from curate.runtime.decode import Invalid, check, decode_image, to_rgb
    from curate.ingest import read_records
    from dpo.synthetic import source_images
    import base64
    folder = Path(sys.argv[1])
    bombs = [bad_corpus.bomb_png(30_000, 30_000), bad_corpus.bomb_png(12_000, 9_000)]
    for i, bomb in enumerate(bombs):
        (folder / f"bomb{i}.png").write_bytes(bomb)
    list(read_records(folder))  # warm up the imports before the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused = 0
    for bomb in bombs:
        for call in (lambda: check(bomb, 64, 3.0, 89_478_485), lambda: decode_image(bomb)):
            try:
                call()
            except Invalid:
                refused += 1
        try:
            to_rgb(bomb)
        except ValueError:
            refused += 1
        try:
            decode_data_url("data:image/png;base64," + base64.b64encode(bomb).decode())
        except RequestError:
            refused += 1
    skipped = {}
    usable = list(source_images(folder, skipped))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"refused": refused, "skipped": len(skipped), "usable": len(usable),
                      "grew_kb": peak - base}))
    """
)


def test_decompression_bombs_cost_no_memory_in_any_decoder(tmp_path):
    """Peak RSS, measured in a fresh process, grows by under 64 MB while every decoder refuses
    a 900 MP and a 108 MP bomb (decoding the first would take 2.7 GB as RGB)."""
    done = subprocess.run(
        [sys.executable, "-c", BOMB_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["refused"] == 8 and figures["skipped"] == 2 and figures["usable"] == 0
    assert figures["grew_kb"] < 64 * 1024, figures


STREAM_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, tracemalloc
    import pyarrow as pa
    from curate.ingest import read_records

    records = read_records(sys.argv[1])
    total = len(next(records).data)  # imports done and the first shard open: the baseline
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    arrow = pa.total_allocated_bytes()
    for record in records:
        total += len(record.data)
        arrow = max(arrow, pa.total_allocated_bytes())
    python = tracemalloc.get_traced_memory()[1]
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
    print(json.dumps({"bytes_mb": total / 1e6, "held_mb": (python + arrow) / 1e6,
                      "rss_grew_mb": grew / 1024}))
    """
)


def _payload(index: int, size: int) -> bytes:
    return bytes([index % 251]) * (size - 8) + index.to_bytes(8, "big")


def _streaming_inputs(root: Path, count: int, size: int) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir()
    (root / "tars").mkdir()
    for s in range(4):
        with tarfile.open(root / "tars" / f"{s}.tar", "w") as tar:
            for i in range(s * count // 4, (s + 1) * count // 4):
                info = tarfile.TarInfo(f"{i:05d}.png")
                info.size = size
                tar.addfile(info, io.BytesIO(_payload(i, size)))
    (root / "pq").mkdir()
    for s in range(2):
        rows = range(s * count // 2, (s + 1) * count // 2)
        table = pa.table({"image": pa.array([_payload(i, size) for i in rows], pa.binary())})
        pq.write_table(table, root / "pq" / f"{s}.parquet", row_group_size=16)
    datasets.Dataset.from_generator(
        lambda: ({"image": _payload(i, size)} for i in range(count)),
        features=datasets.Features({"image": datasets.Value("binary")}),
        cache_dir=str(root / "cache"),
    ).save_to_disk(str(root / "ds"), max_shard_size="20MB")
    return {"webdataset": root / "tars", "parquet": root / "pq", "datasets": root / "ds"}


def _stream(path: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", STREAM_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_ingest_streams_every_layout_without_holding_the_collection(tmp_path):
    """Bytes held while reading (Python objects + Arrow buffers, peak, in a fresh process) do not
    grow with the collection: 4x the data (192 MB vs 48 MB) holds under 1.25x as much, and under a
    quarter of the data. Mapped arrow pages are page cache, so they are not counted as held."""
    small = _streaming_inputs(tmp_path / "small", count=120, size=400_000)
    large = _streaming_inputs(tmp_path / "large", count=480, size=400_000)
    figures = {layout: (_stream(small[layout]), _stream(large[layout])) for layout in small}
    for layout, (one, four) in figures.items():
        assert (one["bytes_mb"], four["bytes_mb"]) == (pytest.approx(48.0), pytest.approx(192.0))
        assert four["held_mb"] < 1.25 * one["held_mb"] + 4, (layout, figures)
        assert four["held_mb"] < four["bytes_mb"] / 4, (layout, figures)


PEAK_SCRIPT = (
    "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
    "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


@pytest.mark.parametrize(
    "command",
    [
        [
            "curate",
            "{src}",
            "{out}",
            "--nsfw-detector",
            "none",
            "--aesthetic-scorer",
            "none",
            "--workers",
            "1",
        ],
        ["make-prefs", "{out}", "--source", "{src}"],
    ],
    ids=["curate", "make-prefs"],
)
def test_whole_commands_on_bombs_stay_under_one_gigabyte_peak_rss(tmp_path, demo_folder, command):
    """`t2i curate` and `t2i make-prefs` on a 900 MP and a 108 MP bomb beside one good image:
    peak RSS of the command's process under 1 GB (decoding the first bomb alone takes 2.7 GB)."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "bomb.png").write_bytes(bad_corpus.bomb_png())
    (source / "bomb2.png").write_bytes(bad_corpus.bomb_png(12_000, 9_000))
    (source / "good.jpg").write_bytes((demo_folder / "astronaut.jpg").read_bytes())
    argv = [part.format(src=source, out=tmp_path / "out") for part in command]
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, sys.executable, "-m", "flows.cli", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    code, peak_kb = (int(x) for x in done.stdout.strip().splitlines()[-1].split())
    assert code == 0, done.stderr[-2000:]
    assert peak_kb < 1024 * 1024, peak_kb


def test_prefect_stage_markdown_shows_paths_and_image_names_as_text(tmp_path):
    from flows.artifacts import stage_markdown

    out = tmp_path / "<img src=x onerror=alert(1)>"
    out.mkdir()
    Image.new("RGB", (8, 8)).save(out / "<script>x.png")
    (out / "report.md").write_text(f"# report\n\n{escape('<script>alert(1)</script>')}\n")
    text = stage_markdown("curate", out, None, None)
    assert "<img" not in text and "<script" not in text
    assert "&lt;img src=x onerror=alert\\(1\\)&gt;" in text and "&lt;script&gt;x.png" in text


def test_allow_path_cells_reads_paths_inside_the_input_only(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.records import IngestOptions

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(_png())
    (tmp_path / "secret.png").write_bytes(_png(color=(1, 2, 3)))
    cell = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    paths = ["a.png", "../secret.png", str(tmp_path / "secret.png")]
    cells = pa.array([{"bytes": None, "path": p} for p in paths], cell)
    pq.write_table(pa.table({"image": cells}), tmp_path / "in" / "t.parquet")
    for root in (tmp_path / "in", tmp_path / "in" / "t.parquet"):
        records = read_records(root, IngestOptions(allow_path_cells=True))
        records = [r for r in records if r.key.startswith("t.parquet:")]
        assert [(r.refused, r.data == _png()) for r in records] == [
            ("", True),
            (reasons.UNSAFE_PATH, False),
            (reasons.UNSAFE_PATH, False),
        ]


# ---- issue 24: saved datasets read only inside IN, tar duplicates and sizes, deep JSON, hard links


def _saved(path: Path, rows: int = 1) -> Path:
    import datasets

    datasets.Dataset.from_dict(
        {"image": [_png(color=(i, 9, 9)) for i in range(rows)], "caption": ["c"] * rows}
    ).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("escape", ["../outside/DATA", "/ABS/DATA", "sub/DATA", "link"])
def test_a_saved_dataset_reads_no_data_file_outside_its_folder(tmp_path, escape):
    from curate.runtime.store import StoreError, check_saved_dataset

    outside = _saved(tmp_path / "outside")
    data = next(p.name for p in outside.glob("*.arrow"))
    inner = _saved(tmp_path / "in" / "ds")
    state = json.loads((inner / "state.json").read_text())
    if escape == "link":
        (inner / "link.arrow").symlink_to(outside / data)
        name = "link.arrow"
    else:
        name = escape.replace("DATA", data).replace("/ABS", str(tmp_path))
    state["_data_files"] = [{"filename": name}]
    (inner / "state.json").write_text(json.dumps(state))
    with pytest.raises(StoreError, match="outside"):
        check_saved_dataset(inner)
    records = list(read_records(tmp_path / "in"))
    assert [(r.key, r.refused) for r in records] == [("ds", reasons.CORRUPT_SHARD)]


def test_a_dataset_dict_whose_split_climbs_out_is_refused(tmp_path):
    from curate.runtime.store import StoreError, check_saved_dataset

    _saved(tmp_path / "outside" / "train")
    root = tmp_path / "in" / "dd"
    root.mkdir(parents=True)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["../../outside/train"]}))
    with pytest.raises(StoreError, match="split"):
        check_saved_dataset(root)


def test_prefs_refuses_a_saved_dataset_reading_outside_in_one_line(tmp_path, capsys):
    from flows.cli import main

    outside = _saved(tmp_path / "outside")
    inner = _saved(tmp_path / "pairs")
    state = json.loads((inner / "state.json").read_text())
    for entry in state["_data_files"]:
        entry["filename"] = "../outside/" + next(p.name for p in outside.glob("*.arrow"))
    (inner / "state.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert main(["prefs", str(inner), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "outside its folder" in err, err
    assert not (tmp_path / "out").exists()


def test_every_duplicate_tar_member_is_counted_and_only_the_first_read(tmp_path):
    members = [
        ("a.png", _png(color=(1, 1, 1))),
        ("a.txt", b"first"),
        ("a.png", _png()),
        ("a.txt", b"second"),
        ("a.png", b"third"),
    ]
    bad_corpus._tar(tmp_path / "dup.tar", members)
    records = list(read_records(tmp_path / "dup.tar"))
    got = [(r.key, r.refused, r.caption) for r in records]
    assert got == [
        ("dup.tar/a.png#2", reasons.DUPLICATE_MEMBER, ""),
        ("dup.tar/a.txt#2", reasons.DUPLICATE_MEMBER, ""),
        ("dup.tar/a.png#3", reasons.DUPLICATE_MEMBER, ""),
        ("dup.tar/a.png", "", "first"),
    ]
    assert records[-1].data == _png(color=(1, 1, 1))


def test_tar_members_and_loose_files_share_the_image_size_cap(tmp_path):
    from curate.records import IngestOptions

    image = _png()
    (tmp_path / "in").mkdir()
    bad_corpus._tar(tmp_path / "in" / "s.tar", [("big.png", image), ("ok.txt", b"x")])
    (tmp_path / "in" / "loose.png").write_bytes(image)
    options = IngestOptions(max_image_bytes=len(image) - 1)
    got = {r.key: (r.refused, r.detail) for r in read_records(tmp_path / "in", options)}
    for key in ("s.tar/big.png", "loose.png"):
        reason, detail = got[key]
        assert reason == reasons.TOO_LARGE and f"{len(image)} bytes" in detail, got
        assert "max_image_bytes" in detail
    wide = IngestOptions(max_image_bytes=len(image))
    assert {r.refused for r in read_records(tmp_path / "in", wide)} == {""}


def test_a_deeply_nested_json_sidecar_is_one_rejection_not_a_recursion_error(tmp_path):
    from curate.records import JSON_MAX_DEPTH, json_depth

    assert json_depth('{"a": "[[[[", "b": [[1]]}') == 3
    (tmp_path / "x.png").write_bytes(_png())
    (tmp_path / "x.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "y.png").write_bytes(_png(color=(1, 2, 3)))
    nested = (
        "{"
        + '"a": {' * (JSON_MAX_DEPTH - 2)
        + '"caption": "deep but fine"'
        + "}" * (JSON_MAX_DEPTH - 1)
    )
    (tmp_path / "y.json").write_text(nested)
    got = {r.key: (r.refused, r.caption) for r in read_records(tmp_path)}
    assert got["x.png"][0] == reasons.BAD_CAPTION
    detail = next(r.detail for r in read_records(tmp_path) if r.key == "x.png")
    assert "nests 100000 levels deep, over the limit of 64" in detail
    assert got["y.png"] == ("", "")  # at the limit: parsed (the caption is not at the top)


def test_a_hard_link_to_a_file_outside_the_input_is_refused_one_inside_is_read(tmp_path):
    import os

    (tmp_path / "outside.png").write_bytes(_png(color=(7, 7, 7)))
    root = tmp_path / "in"
    root.mkdir()
    os.link(tmp_path / "outside.png", root / "out_link.png")
    (root / "a.png").write_bytes(_png())
    os.link(root / "a.png", root / "sub_link.png")
    got = {r.key: (r.refused, r.detail) for r in read_records(root)}
    assert got["out_link.png"][0] == reasons.UNSAFE_PATH and "hard link" in got["out_link.png"][1]
    assert got["a.png"][0] == got["sub_link.png"][0] == ""
