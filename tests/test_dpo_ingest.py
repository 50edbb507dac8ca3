"""Preference ingest: Pick-a-Pic v2, the generic layout and a folder of pairs (dpo/ingest.py)."""

import io

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate import reasons
from curate.store import Manifest, load_rejected, load_samples
from dpo.config import IngestPrefsConfig
from dpo.ingest import ingest_prefs, pair_id


def png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buffer, format="PNG")
    return buffer.getvalue()


RED, BLUE, GREEN = png("red"), png("blue"), png("green")
BROKEN = RED[: len(RED) // 2]


@pytest.fixture
def pickapic(tmp_path):
    rows = [
        {"caption": "jpg_0 won", "jpg_0": RED, "jpg_1": BLUE, "label_0": 1.0, "label_1": 0.0},
        {"caption": "jpg_1 won", "jpg_0": RED, "jpg_1": GREEN, "label_0": 0.0, "label_1": 1.0},
        {"caption": "a tie", "jpg_0": BLUE, "jpg_1": GREEN, "label_0": 0.5, "label_1": 0.5},
        {
            "caption": "same picture twice",
            "jpg_0": GREEN,
            "jpg_1": GREEN,
            "label_0": 1.0,
            "label_1": 0.0,
        },
        {"caption": "half a file", "jpg_0": BROKEN, "jpg_1": BLUE, "label_0": 1.0, "label_1": 0.0},
        {"caption": "", "jpg_0": BLUE, "jpg_1": RED, "label_0": 1.0, "label_1": 0.0},
    ]
    path = tmp_path / "pickapic.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_pickapic_label_0_one_means_jpg_0_won_and_zero_means_jpg_1_won(pickapic, tmp_path):
    out = ingest_prefs(pickapic, tmp_path / "prefs", IngestPrefsConfig())
    kept = {row["caption"]: row for row in load_samples(out)}
    assert set(kept) == {"jpg_0 won", "jpg_1 won"}
    assert (kept["jpg_0 won"]["image_w"], kept["jpg_0 won"]["image_l"]) == (RED, BLUE)
    assert (kept["jpg_1 won"]["image_w"], kept["jpg_1 won"]["image_l"]) == (GREEN, RED)
    assert kept["jpg_1 won"]["id"] == pair_id(GREEN, RED)


def test_ties_identical_undecodable_and_captionless_pairs_are_rejected_with_reasons(
    pickapic, tmp_path
):
    out = ingest_prefs(pickapic, tmp_path / "prefs", IngestPrefsConfig())
    rejected = {row["reason"]: row for row in load_rejected(out)}
    assert set(rejected) == {
        reasons.TIE,
        reasons.IDENTICAL_PAIR,
        reasons.UNDECODABLE,
        reasons.NO_CAPTION,
    }
    assert rejected[reasons.TIE]["score"] == 0.5
    assert "winner" in rejected[reasons.UNDECODABLE]["detail"]
    manifest = Manifest.read(out)
    assert manifest.counts == {"input": 6, "kept": 2, "rejected": 4}
    assert manifest.extra["layout"] == "pickapic"


def test_generic_layout_from_a_saved_dataset_keeps_its_orientation(tmp_path):
    saved = tmp_path / "generic"
    datasets.Dataset.from_list(
        [{"caption": "red beats blue", "image_w": RED, "image_l": BLUE}]
    ).save_to_disk(str(saved))
    out = ingest_prefs(saved, tmp_path / "prefs", IngestPrefsConfig())
    (row,) = list(load_samples(out))
    assert (row["caption"], row["image_w"], row["image_l"]) == ("red beats blue", RED, BLUE)
    assert Manifest.read(out).extra["layout"] == "generic"


def test_a_folder_of_pairs_is_read_and_a_missing_loser_is_rejected(tmp_path):
    source = tmp_path / "pairs"
    for name, files in {
        "good": {"winner.png": RED, "loser.png": BLUE},
        "half": {"winner.png": RED},
    }.items():
        (source / name).mkdir(parents=True)
        (source / name / "caption.txt").write_text(f"pair {name}\n")
        for file, data in files.items():
            (source / name / file).write_bytes(data)
    out = ingest_prefs(source, tmp_path / "prefs", IngestPrefsConfig())
    (row,) = list(load_samples(out))
    assert (row["caption"], row["source"]) == ("pair good", "good")
    (rejection,) = list(load_rejected(out))
    assert (
        rejection["reason"] == reasons.UNDECODABLE
        and "loser: no image bytes" in rejection["detail"]
    )


def test_unknown_columns_give_an_error_that_names_the_expected_layouts(tmp_path):
    path = tmp_path / "odd.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "x", "a": RED}]), path)
    with pytest.raises(ValueError, match="Pick-a-Pic v2"):
        ingest_prefs(path, tmp_path / "prefs", IngestPrefsConfig())


def test_make_prefs_from_a_stage_output_gives_winners_the_attribute_the_losers_lack(tmp_path):
    from curate.store import StageWriter, sample_id
    from dpo.config import MakePrefsConfig
    from dpo.synthetic import attribute_score, make_prefs

    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Value("binary"),
                                  "caption": datasets.Value("string")})  # fmt: skip
    with StageWriter(tmp_path / "store", "curate", {}, "fp") as writer:
        writer.write_samples([{"id": sample_id(png(c)), "image": png(c), "caption": f"a {c} square"}
                              for c in ["gray", "olive"]], features)  # fmt: skip
    for attribute in ("warm", "bright"):
        out = make_prefs(
            tmp_path / attribute,
            MakePrefsConfig(source=str(tmp_path / "store"), attribute=attribute),
        )
        pairs = sorted(p for p in out.iterdir() if p.is_dir())
        assert sorted((p / "caption.txt").read_text().strip() for p in pairs) == [
            "a gray square",
            "a olive square",
        ]
        for pair in pairs:
            winner, loser = (
                attribute_score(Image.open(pair / f"{r}.png"), attribute)
                for r in ("winner", "loser")
            )
            assert winner > loser + 0.2
    swapped = make_prefs(
        tmp_path / "swap", MakePrefsConfig(source=str(tmp_path / "store"), swap=True)
    )
    pair = sorted(p for p in swapped.iterdir() if p.is_dir())[0]
    assert attribute_score(Image.open(pair / "winner.png"), "warm") < attribute_score(
        Image.open(pair / "loser.png"), "warm"
    )
