import io
import json
import tarfile

import pyarrow.parquet as pq
from PIL import Image

from curate.demo_data import TRUTH_FILE
from curate.runtime import reasons

PLANTED = {
    "astronaut_resized": reasons.NEAR_DUPLICATE,
    "coffee_reencoded": reasons.NEAR_DUPLICATE,
    "rocket_crop": reasons.NEAR_DUPLICATE,
    "chelsea_flip": reasons.NEAR_DUPLICATE,
    "hubble_copy": reasons.EXACT_DUPLICATE,
    "retina_truncated": reasons.TRUNCATED,
    "empty": reasons.ZERO_BYTE,
    "notes": reasons.NOT_AN_IMAGE,
    "tiny": reasons.TOO_SMALL,
    "strip": reasons.ASPECT_RATIO,
    "bomb": reasons.DECOMPRESSION_BOMB,
}


def _truth(root):
    return json.loads((root / TRUTH_FILE).read_text())


def test_demo_has_twelve_distinct_real_images_and_every_planted_case(demo_folder):
    truth = _truth(demo_folder)
    originals = [k for k, v in truth.items() if v["expect"] == "keep" and v["group"] == k]
    assert len(originals) >= 12
    assert len({truth[k]["id"] for k in originals}) == len(originals)
    for key in originals:
        image = Image.open(demo_folder / f"{key}.jpg")
        image.load()
        assert min(image.size) >= 100
    assert {k: truth[k]["expect"] for k in PLANTED} == PLANTED
    assert (demo_folder / "empty.jpg").stat().st_size == 0
    assert (demo_folder / "tiny.png").exists() and Image.open(demo_folder / "tiny.png").size == (
        16,
        16,
    )
    assert truth["hubble_copy"]["id"] == truth["hubble"]["id"]
    assert (demo_folder / "astronaut.txt").read_text().strip() == truth["astronaut"]["caption"]


def test_the_three_layouts_hold_the_same_bytes(demo_root):
    folder = demo_root / "folder"
    truth = _truth(folder)
    expected = {k: (folder / f"{k}.{v['ext']}").read_bytes() for k, v in truth.items()}

    tar_bytes = {}
    for shard in sorted((demo_root / "webdataset").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.rsplit(".", 1)
                if ext != "txt":
                    tar_bytes[key] = tar.extractfile(member).read()
    assert tar_bytes == expected

    parquet_bytes = {}
    for part in sorted((demo_root / "parquet").glob("*.parquet")):
        table = pq.read_table(part).to_pylist()
        parquet_bytes.update({row["key"]: row["image"] for row in table})
    assert parquet_bytes == expected
    assert _truth(demo_root / "parquet") == truth == _truth(demo_root / "webdataset")


def test_demo_data_is_byte_identical_across_runs(tmp_path, demo_folder):
    from curate.demo_data import write_demo_data

    again = write_demo_data(tmp_path / "again", "folder")
    assert _truth(again) == _truth(demo_folder)


def test_valid_edge_cases_decode(demo_folder):
    modes = {
        k: Image.open(io.BytesIO((demo_folder / f).read_bytes())).mode
        for k, f in [
            ("cmyk", "cmyk.jpg"),
            ("palette", "palette.png"),
            ("sixteen_bit", "sixteen_bit.png"),
        ]
    }
    assert modes == {"cmyk": "CMYK", "palette": "P", "sixteen_bit": "I;16"}
    assert Image.open(demo_folder / "exif_rotated.jpg").getexif()[0x0112] == 6
