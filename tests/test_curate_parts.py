"""Decode/validate, ingest and dedup pieces of the curation stage, each on small exact cases."""

import io
import tarfile

import datasets
import numpy as np
import pytest
from PIL import Image

from curate import dedup
from curate.ingest import read_records
from curate.runtime import reasons
from curate.runtime.decode import Invalid, check, to_rgb
from curate.runtime.store import sample_id


def _jpeg(size=(200, 150), color=(200, 30, 30), **options) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def test_plain_rgb_bytes_are_stored_as_they_are_and_others_become_png():
    plain = _jpeg()
    assert check(plain, 64, 3.0, 10**8).stored == plain
    exif = Image.Exif()
    exif[0x0112] = 8
    rotated = check(_jpeg(exif=exif.tobytes()), 64, 3.0, 10**8)
    assert rotated.normalised and rotated.image.size == (150, 200)
    assert Image.open(io.BytesIO(rotated.stored)).format == "PNG" and to_rgb(
        rotated.stored
    ).size == (150, 200)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", reasons.ZERO_BYTE),
        (b"GIF89a not really", reasons.UNDECODABLE),
        (b"hello world" * 10, reasons.NOT_AN_IMAGE),
        (_jpeg()[:300], reasons.TRUNCATED),
        (_jpeg((100, 100)), reasons.TOO_SMALL),
        (_jpeg((900, 200)), reasons.ASPECT_RATIO),
    ],
)
def test_each_broken_input_gets_its_own_reason(data, reason):
    with pytest.raises(Invalid) as caught:
        check(data, 128, 3.0, 10**8)
    assert caught.value.reason == reason


def test_a_pixel_count_over_the_cap_is_a_decompression_bomb_even_before_decoding():
    with pytest.raises(Invalid) as caught:
        check(_jpeg((400, 400)), 64, 3.0, max_pixels=100_000)
    assert (caught.value.reason, caught.value.score, caught.value.threshold) == (
        reasons.DECOMPRESSION_BOMB,
        160_000,
        100_000,
    )


def test_to_rgb_names_the_problem_for_bad_bytes():
    with pytest.raises(ValueError, match="cannot decode image bytes .* not_an_image"):
        to_rgb(b"plain text")


def test_tar_members_that_climb_out_or_are_absolute_are_refused_and_never_extracted(tmp_path):
    shard = tmp_path / "in" / "evil.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for name, payload in [
            ("../escape.jpg", _jpeg()),
            ("/etc/abs.jpg", _jpeg(color=(1, 2, 3))),
            ("ok.jpg", _jpeg()),
            ("ok.txt", b"a red square"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    records = list(read_records(shard.parent))
    refused = {r.key: r.refused for r in records if r.refused}
    assert refused == {
        "evil.tar/../escape.jpg": reasons.UNSAFE_PATH,
        "evil.tar//etc/abs.jpg": reasons.UNSAFE_PATH,
        "evil.tar/link.jpg": reasons.UNSAFE_PATH,
    }
    (ok,) = [r for r in records if not r.refused]
    assert (ok.key, ok.caption) == ("evil.tar/ok.jpg", "a red square")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["evil.tar", "in"]


def test_a_saved_datasets_dir_is_read_with_its_captions(tmp_path):
    data = [_jpeg(color=(i * 40, 0, 0)) for i in range(3)]
    dataset = datasets.Dataset.from_dict(
        {"image": [{"bytes": d, "path": None} for d in data], "text": ["a", "b", "c"]}
    )
    dataset.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    records = list(read_records(tmp_path / "ds"))
    assert [sample_id(r.data) for r in records] == [sample_id(d) for d in data]
    assert [r.caption for r in records] == ["a", "b", "c"]


def test_phash_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 300, dtype=np.uint64)
    flips = np.array(
        [np.uint64(1) << np.uint64(b) for b in rng.integers(0, 64, 300)], dtype=np.uint64
    )
    hashes = np.concatenate(
        [base, base[:100] ^ flips[:100], base[:50] ^ flips[100:150] ^ flips[150:200]]
    )
    found = dedup.phash_pairs(hashes, 4)
    bits = np.unpackbits(hashes.view(np.uint8).reshape(-1, 8), axis=1).astype(np.int16)
    distance = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    i, j = np.nonzero(np.triu(distance <= 4, k=1))
    assert set(zip(found.i.tolist(), found.j.tolist(), strict=True)) == set(
        zip(i.tolist(), j.tolist(), strict=True)
    )


def test_clustered_search_finds_every_planted_pair_and_algorithm_1_keeps_one_per_group():
    rng = np.random.default_rng(1)
    n, d = 3000, 32
    vectors = rng.normal(size=(n, d)).astype(np.float32)
    originals = rng.choice(n, 100, replace=False)
    groups = {}
    for g, o in enumerate(originals[:50]):  # 50 groups of three near-copies
        for _ in range(2):
            vectors = np.vstack(
                [vectors, vectors[o] + 0.05 * rng.normal(size=d).astype(np.float32)]
            )
            groups.setdefault(g, [int(o)]).append(len(vectors) - 1)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = dedup.cluster(vectors, dedup.default_clusters(len(vectors)), 2, 10, 0, threads=1)
    pairs = dedup.embedding_pairs(vectors, labels, 0.9)
    exact = np.triu(vectors @ vectors.T >= 0.9, k=1)
    truth = set(zip(*map(np.ndarray.tolist, np.nonzero(exact)), strict=True))
    found = set(zip(pairs.i.tolist(), pairs.j.tolist(), strict=True))
    assert found <= truth and len(found) / len(truth) >= 0.98
    scores = rng.uniform(size=len(vectors))
    ids = [f"{k:05d}" for k in range(len(vectors))]
    removed = dedup.select(pairs, scores, ids)
    for members in groups.values():
        survivors = [m for m in members if m not in removed]
        assert survivors == [max(members, key=lambda m: scores[m])]
        assert all(removed[m][0] == survivors[0] for m in members if m in removed)


def test_algorithm_1_keeps_both_ends_of_a_chain():
    pairs = dedup.Pairs(np.array([0, 1]), np.array([1, 2]), np.array([0.9, 0.9], np.float32))
    removed = dedup.select(pairs, np.array([3.0, 2.0, 1.0]), ["a", "b", "c"])
    assert removed == {1: (0, pytest.approx(0.9))}  # c is similar to b only, and b is gone
