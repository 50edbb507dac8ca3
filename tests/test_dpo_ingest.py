"""Preference ingest: Pick-a-Pic v2, the generic layout and a folder of pairs (dpo/ingest.py)."""

import io

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.runtime import reasons
from curate.runtime.store import Manifest, load_rejected, load_samples
from dpo.config import IngestPrefsConfig
from dpo.ingest import pair_id, run_prefs


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
    out = run_prefs(pickapic, tmp_path / "prefs", IngestPrefsConfig())
    kept = {row["caption"]: row for row in load_samples(out)}
    assert set(kept) == {"jpg_0 won", "jpg_1 won"}
    assert (kept["jpg_0 won"]["image_w"], kept["jpg_0 won"]["image_l"]) == (RED, BLUE)
    assert (kept["jpg_1 won"]["image_w"], kept["jpg_1 won"]["image_l"]) == (GREEN, RED)
    assert kept["jpg_1 won"]["id"] == pair_id(GREEN, RED)


def test_ties_identical_undecodable_and_captionless_pairs_are_rejected_with_reasons(
    pickapic, tmp_path
):
    out = run_prefs(pickapic, tmp_path / "prefs", IngestPrefsConfig())
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
    out = run_prefs(saved, tmp_path / "prefs", IngestPrefsConfig())
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
    out = run_prefs(source, tmp_path / "prefs", IngestPrefsConfig())
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
        run_prefs(path, tmp_path / "prefs", IngestPrefsConfig())


def test_make_prefs_from_a_stage_output_gives_winners_the_attribute_the_losers_lack(tmp_path):
    from curate.runtime.store import sample_id
    from curate.runtime.store_writer import StageWriter
    from dpo.config import MakePrefsConfig
    from dpo.synthetic import attribute_score, run_make_prefs

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Value("binary"),
            "caption": datasets.Value("string"),
        }
    )
    with StageWriter(tmp_path / "store", "curate", {}, "fp") as writer:
        writer.write_samples(
            [
                {"id": sample_id(png(c)), "image": png(c), "caption": f"a {c} square"}
                for c in ["gray", "olive"]
            ],
            features,
        )
    for attribute in ("warm", "bright"):
        out = run_make_prefs(
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
    swapped = run_make_prefs(
        tmp_path / "swap", MakePrefsConfig(source=str(tmp_path / "store"), swap=True)
    )
    pair = sorted(p for p in swapped.iterdir() if p.is_dir())[0]
    assert attribute_score(Image.open(pair / "winner.png"), "warm") < attribute_score(
        Image.open(pair / "loser.png"), "warm"
    )


# --- Pick-a-Pic v2 as published: 19 columns, hub split layout ---------------------------------

PICKAPIC_SCHEMA = pa.schema(
    [
        ("are_different", pa.bool_()),
        ("best_image_uid", pa.string()),
        ("caption", pa.string()),
        ("created_at", pa.timestamp("ns")),
        ("has_label", pa.bool_()),
        ("image_0_uid", pa.string()),
        ("image_0_url", pa.string()),
        ("image_1_uid", pa.string()),
        ("image_1_url", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("ranking_id", pa.int64()),
        ("user_id", pa.int64()),
        ("num_example_per_prompt", pa.int64()),
        ("__index_level_0__", pa.int64()),
    ]
)


def pickapic_row(
    ranking_id, caption, jpg_0, jpg_1, label_0, label_1, has_label=True, are_different=True
):
    return {
        "are_different": are_different,
        "best_image_uid": f"uid-{ranking_id}-0",
        "caption": caption,
        "created_at": None,
        "has_label": has_label,
        "image_0_uid": f"uid-{ranking_id}-0",
        "image_0_url": f"https://example.invalid/{ranking_id}/0.jpg",
        "image_1_uid": f"uid-{ranking_id}-1",
        "image_1_url": f"https://example.invalid/{ranking_id}/1.jpg",
        "jpg_0": jpg_0,
        "jpg_1": jpg_1,
        "label_0": label_0,
        "label_1": label_1,
        "model_0": "sdxl",
        "model_1": "sd15",
        "ranking_id": ranking_id,
        "user_id": 7,
        "num_example_per_prompt": 1,
        "__index_level_0__": ranking_id,
    }


def write_pickapic(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=PICKAPIC_SCHEMA), path)
    return path


def test_published_pickapic_rows_without_a_usable_label_are_rejected_with_their_reason(tmp_path):
    rows = [
        pickapic_row(1, "a vote for jpg_1", RED, BLUE, 0.0, 1.0),
        pickapic_row(2, "nobody voted", RED, GREEN, 0.0, 0.0, has_label=False),
        pickapic_row(3, "the same image twice", BLUE, GREEN, 1.0, 0.0, are_different=False),
        pickapic_row(4, "labels that sum to 1.5", GREEN, RED, 1.0, 0.5),
        pickapic_row(5, "a missing label", GREEN, BLUE, 1.0, None),
        pickapic_row(6, "a tie", BLUE, RED, 0.5, 0.5),
    ]
    source = write_pickapic(tmp_path / "data" / "train-00000-of-00001.parquet", rows)
    assert pq.read_schema(source).names == PICKAPIC_SCHEMA.names and len(PICKAPIC_SCHEMA) == 19
    out = run_prefs(tmp_path / "data", tmp_path / "prefs", IngestPrefsConfig())
    (kept,) = list(load_samples(out))
    assert (kept["caption"], kept["image_w"], kept["image_l"], kept["source"]) == (
        "a vote for jpg_1",
        BLUE,
        RED,
        "1",
    )
    rejected = {row["detail"].split(":")[0]: row for row in load_rejected(out)}
    assert {k: r["reason"] for k, r in rejected.items()} == {
        "2": reasons.UNLABELED,
        "3": reasons.NOT_DIFFERENT,
        "4": reasons.BAD_LABELS,
        "5": reasons.BAD_LABELS,
        "6": reasons.TIE,
    }
    assert "1.5" in rejected["4"]["detail"] and "None" in rejected["5"]["detail"]
    manifest = Manifest.read(out)
    assert manifest.counts == {"input": 6, "kept": 1, "rejected": 5}
    assert manifest.extra["rejected_by_reason"] == {
        reasons.UNLABELED: 1,
        reasons.NOT_DIFFERENT: 1,
        reasons.BAD_LABELS: 2,
        reasons.TIE: 1,
    }


@pytest.fixture
def hub_download(tmp_path):
    """data/ as the hub lays it out: two train shards, one validation and one validation_unique."""
    data = tmp_path / "pickapic_v2" / "data"
    colours = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]
    images = [png(c) for c in colours]
    for split, shard, of, ids in (
        ("train", 0, 2, [1, 2, 3]),
        ("train", 1, 2, [4, 5]),
        ("validation", 0, 1, [6]),
        ("validation_unique", 0, 1, [7]),
    ):
        rows = [pickapic_row(i, f"{split} {i}", images[i], images[0], 1.0, 0.0) for i in ids]
        write_pickapic(data / f"{split}-{shard:05d}-of-{of:05d}.parquet", rows)
    return data.parent


def test_split_picks_one_split_of_a_hub_download_and_never_mixes_them(hub_download, tmp_path):
    from flows.cli import main as t2i

    for split, expected in (
        ("train", ["train 1", "train 2", "train 3", "train 4", "train 5"]),
        ("validation", ["validation 6"]),
        ("validation_unique", ["validation_unique 7"]),
    ):
        out = run_prefs(hub_download, tmp_path / split, IngestPrefsConfig(split=split))
        assert sorted(load_samples(out)["caption"]) == expected
        assert Manifest.read(out).extra["split"] == split
    with pytest.raises(
        ValueError, match="no test split; its splits: train, validation, validation_unique"
    ):
        run_prefs(hub_download, tmp_path / "test", IngestPrefsConfig(split="test"))
    with pytest.raises(
        ValueError, match=r"several splits \(train, validation, validation_unique\)"
    ):
        run_prefs(hub_download, tmp_path / "mixed", IngestPrefsConfig())
    assert t2i(["prefs", str(hub_download), str(tmp_path / "cli")]) == 1  # a one-line error
    assert not (tmp_path / "mixed").exists() and not (tmp_path / "cli").exists()


def test_max_pairs_stops_once_that_many_pairs_are_kept(hub_download, tmp_path):
    config = IngestPrefsConfig(split="train", max_pairs=3)
    out = run_prefs(hub_download, tmp_path / "prefs", config)
    assert list(load_samples(out)["caption"]) == ["train 1", "train 2", "train 3"]
    assert Manifest.read(out).counts == {"input": 3, "kept": 3, "rejected": 0}


def test_a_saved_dataset_dict_needs_a_split_too(tmp_path):
    rows = {
        split: [pickapic_row(i, f"{split} {i}", RED, BLUE, 1.0, 0.0)]
        for i, split in enumerate(["train", "test"])
    }
    datasets.DatasetDict(
        {split: datasets.Dataset.from_list(r) for split, r in rows.items()}
    ).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"several splits \(test, train\)"):
        run_prefs(tmp_path / "saved", tmp_path / "mixed", IngestPrefsConfig())
    out = run_prefs(tmp_path / "saved", tmp_path / "prefs", IngestPrefsConfig(split="test"))
    assert list(load_samples(out)["caption"]) == ["test 1"]


def test_a_bomb_in_a_saved_dataset_with_image_features_is_one_rejected_pair(tmp_path):
    from bad_corpus import bomb_png

    saved = tmp_path / "generic-images"
    features = datasets.Features(
        {
            "caption": datasets.Value("string"),
            "image_w": datasets.Image(),
            "image_l": datasets.Image(),
        }
    )
    rows = [
        {
            "caption": "red beats blue",
            "image_w": {"bytes": RED, "path": None},
            "image_l": {"bytes": BLUE, "path": None},
        },
        {
            "caption": "a bomb",
            "image_w": {"bytes": bomb_png(), "path": None},
            "image_l": {"bytes": BLUE, "path": None},
        },
    ]
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(saved))
    out = run_prefs(saved, tmp_path / "prefs", IngestPrefsConfig())
    (kept,) = list(load_samples(out))
    assert kept["caption"] == "red beats blue"
    rejected = {row["reason"] for row in load_rejected(out)}
    assert rejected == {"undecodable"}
    assert Manifest.read(out).counts == {"input": 2, "kept": 1, "rejected": 1}
