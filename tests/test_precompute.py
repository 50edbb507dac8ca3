"""`t2i precompute`: what a pre-encoded set holds, and that it equals what SD3 computes."""

import io
import json
import math
import os
import pickle
import signal
import time
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

from curate.runtime import reasons
from curate.runtime.store import Manifest, StoreError, fingerprint, load_rejected, load_samples
from curate.runtime.store_writer import StageWriter
from model.buckets import make_buckets
from model.conditioning import TextEncoding, joint_condition
from model.config import PrecomputeConfig
from model.encoded import EncodedDataset, collate
from model.encoders import encode_images, encode_texts, encoder_dims
from model.folders import load_pipeline
from model.precompute import run_precompute

STORE_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "caption": datasets.Value("string"),
        "caption_synthetic": datasets.Value("string"),
    }
)
BROKEN = (reasons.NOT_AN_IMAGE, reasons.TRUNCATED)  # demo files that fail to open or decode
TOL = {"rtol": 2e-3, "atol": 2e-3}  # 16-bit storage
RES = 64  # square crops in the main fixture


@pytest.fixture(scope="module")
def captioned_store(demo_folder, tmp_path_factory) -> Path:
    """The demo's kept images plus two broken ones; every other row has a synthetic caption."""
    truth = json.loads((demo_folder / "DEMO_TRUTH.json").read_text())
    rows = []
    for key, t in sorted(truth.items()):
        if t["expect"] in ("keep", *BROKEN):
            synthetic = f"a detailed photo showing {t['caption']}" if len(rows) % 2 else None
            image = {"bytes": (demo_folder / f"{key}.{t['ext']}").read_bytes(), "path": None}
            rows.append(
                {
                    "id": t["id"],
                    "image": image,
                    "caption": t["caption"],
                    "caption_synthetic": synthetic,
                }
            )
    store = tmp_path_factory.mktemp("captioned") / "store"
    with StageWriter(store, "caption", {}, fingerprint(demo_folder)) as writer:
        writer.write_samples(rows, STORE_FEATURES)
    return store


def source_rows(store: Path) -> dict[str, dict]:
    """The store's rows by id, images as raw bytes (two of them do not decode)."""
    table = load_samples(store).cast_column("image", datasets.Image(decode=False))
    return {row["id"]: row for row in table}


def config_for(model_dir, **overrides) -> PrecomputeConfig:
    return PrecomputeConfig(model=model_dir, **{"resolution": RES, "shard_size": 8, **overrides})


@pytest.fixture(scope="module")
def encoded(captioned_store, tiny_model_dir, tmp_path_factory) -> Path:
    return run_precompute(
        captioned_store, tmp_path_factory.mktemp("enc") / "encoded", config_for(tiny_model_dir)
    )


def test_every_kept_image_has_latents_and_its_caption_encodings_with_config_shapes(
    encoded, captioned_store, tiny_model_dir
):
    ds, source = EncodedDataset(encoded), source_rows(captioned_store)
    dims = encoder_dims(tiny_model_dir)
    assert len(ds) == len(source) - len(BROKEN) and set(ds.ids) < set(source)
    synthetic = {i: r["caption_synthetic"] for i, r in source.items()}
    side = RES // dims["vae_scale_factor"]
    for i, sample_id in enumerate(ds.ids):
        assert ds.has_synthetic(i) == (synthetic[sample_id] is not None)
        for variant in ("original", "synthetic") if ds.has_synthetic(i) else ("original",):
            sample = ds.sample(i, variant)
            assert sample["latents"].shape == (dims["latent_channels"], side, side)
            text = sample["text"]
            assert text.clip_l.shape == (77, dims["clip_l"]) and text.clip_l_pooled.shape == (
                dims["clip_l_pooled"],
            )
            assert text.clip_g.shape == (77, dims["clip_g"]) and text.clip_g_pooled.shape == (
                dims["clip_g_pooled"],
            )
            assert text.t5.shape == (77, dims["t5"]) and text.t5_mask.shape == (77,)
            assert sample["latents"].dtype == text.t5.dtype == torch.float16
        if not ds.has_synthetic(i):
            with pytest.raises(KeyError, match="no synthetic caption"):
                ds.sample(i, "synthetic")
    assert ds.bucket(0) == (side, side) and ds.info["t5_length"] == 77


def test_a_broken_image_is_rejected_with_a_reason_not_lost(encoded, captioned_store):
    rejected = load_rejected(encoded)
    assert rejected.num_rows == len(BROKEN)
    assert set(rejected["reason"]) == {reasons.ENCODE_FAILED}
    assert all("image" in d for d in rejected["detail"])
    counts = Manifest.read(encoded).counts
    assert (
        counts["input"] == len(source_rows(captioned_store)) == counts["kept"] + counts["rejected"]
    )


def test_text_encodings_equal_the_sd3_pipeline_encode_prompt(encoded, tiny_model_dir):
    ds = EncodedDataset(encoded)
    pipe = load_pipeline(tiny_model_dir)
    i = next(i for i in range(len(ds)) if ds.has_synthetic(i))
    source = load_samples(encoded)[i]
    cases = [
        (source["caption"], ds.sample(i)["text"]),
        (source["caption_synthetic"], ds.sample(i, "synthetic")["text"]),
        ("", ds.empty_text()),
    ]
    for caption, text in cases:
        want, _, want_pooled, _ = pipe.encode_prompt(
            caption, None, None, do_classifier_free_guidance=False, max_sequence_length=77
        )
        sequence, pooled = joint_condition(TextEncoding.stack([text]).to(torch.float32))
        torch.testing.assert_close(sequence, want, **TOL)
        torch.testing.assert_close(pooled, want_pooled, **TOL)
    long, _, _, _ = pipe.encode_prompt(
        cases[0][0], None, None, do_classifier_free_guidance=False, max_sequence_length=256
    )
    sequence, _ = joint_condition(
        encode_texts(tiny_model_dir, [cases[0][0]], t5_length=256, progress=False)
    )
    torch.testing.assert_close(sequence, long)


def test_the_reader_returns_what_a_fresh_encode_of_the_sample_gives(
    encoded, captioned_store, tiny_model_dir
):
    ds = EncodedDataset(encoded)
    source = source_rows(captioned_store)
    picks = [0, len(ds) - 1]
    images = [
        Image.open(io.BytesIO(source[ds.ids[i]]["image"]["bytes"])).convert("RGB") for i in picks
    ]
    latents = encode_images(tiny_model_dir, images, resolution=RES, progress=False)
    texts = encode_texts(
        tiny_model_dir, [source[ds.ids[i]]["caption"] for i in picks], progress=False
    )
    for n, i in enumerate(picks):
        torch.testing.assert_close(ds[i]["latents"].float(), latents[n], **TOL)
        torch.testing.assert_close(ds[i]["text"].t5.float(), texts.t5[n], **TOL)
        assert torch.equal(ds[i]["text"].t5_mask, texts.t5_mask[n])


def test_latents_are_stored_after_the_vae_shift_and_scaling(encoded, tiny_model_dir):
    info = EncodedDataset(encoded).info
    vae = json.loads((Path(tiny_model_dir) / "vae" / "config.json").read_text())
    assert (
        info["scaling_factor"] == vae["scaling_factor"]
        and info["shift_factor"] == vae["shift_factor"]
    )
    assert info["latent_mode"] == "mean"


def test_bytes_per_sample_are_within_two_percent_of_the_raw_tensor_bytes(encoded, tiny_model_dir):
    manifest = Manifest.read(encoded)
    stored, dims = manifest.extra["bytes"], encoder_dims(tiny_model_dir)
    assert stored["overhead"] < 0.02
    side, kept, captions = (
        RES // dims["vae_scale_factor"],
        manifest.counts["kept"],
        manifest.counts["kept"] + manifest.counts["with_synthetic"] + 1,
    )
    latents = kept * dims["latent_channels"] * side * side * 2
    text = captions * (
        77 * (dims["clip_l"] + dims["clip_g"] + dims["t5"]) * 2
        + (dims["clip_l_pooled"] + dims["clip_g_pooled"]) * 2
        + 77
    )
    assert stored["tensor_bytes"] == latents + text


def test_rerunning_with_the_same_parameters_is_skipped(encoded, captioned_store, tiny_model_dir):
    before = Manifest.read(encoded)
    run_precompute(captioned_store, encoded, config_for(tiny_model_dir))
    assert Manifest.read(encoded).created == before.created


@pytest.fixture(scope="module")
def bucketed(captioned_store, tiny_model_dir, tmp_path_factory) -> Path:
    """Aspect-ratio buckets at 64^2, bf16, 512 T5 tokens, one shard: a T5 file of a few MB."""
    config = config_for(
        tiny_model_dir, resolution=64, buckets=True, t5_length=512, shard_size=32, dtype="bf16"
    )
    return run_precompute(captioned_store, tmp_path_factory.mktemp("bucketed") / "encoded", config)


def test_random_access_maps_the_shard_and_reads_only_the_requested_rows(bucketed):
    ds = EncodedDataset(bucketed)
    ds.empty_text()  # warm up: imports, and handles of the empty-prompt files
    shard = bucketed / "shards" / "00000.t5.safetensors"
    t5 = ds.sample(7)["text"].t5
    row_bytes = t5.numel() * t5.element_size()
    resident = _mapped_rss(shard)
    assert resident is not None, "the shard is not memory-mapped"
    assert t5.untyped_storage().nbytes() == row_bytes  # the sample owns its row, not the shard
    assert t5.shape[0] == 512 and shard.stat().st_size >= 25 * row_bytes
    assert row_bytes <= resident <= shard.stat().st_size / 4, (resident, shard.stat().st_size)


def _mapped_rss(path: Path) -> int | None:
    """Resident bytes of this process's mapping of `path` (from /proc/self/smaps)."""
    total, inside = None, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef" and "-" in line.split()[0]:
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total = (total or 0) + int(line.split()[1]) * 1024
    return total


def test_the_reader_batches_within_a_bucket_and_survives_pickling(encoded):
    ds = pickle.loads(pickle.dumps(EncodedDataset(encoded)))
    indices = next(iter(ds.bucket_indices().values()))[:3]
    batch = collate([ds[i] for i in indices])
    assert (
        batch["latents"].shape[0] == 3
        and batch["text"].t5.shape[0] == 3
        and batch["ids"] == [ds.ids[i] for i in indices]
    )


def test_aspect_ratio_buckets_keep_the_area_and_patchify_exactly(bucketed, tiny_model_dir):
    dims = encoder_dims(tiny_model_dir)
    step = dims["vae_scale_factor"] * dims["patch_size"]
    buckets = make_buckets(64, step)
    assert all(
        h % step == 0 and w % step == 0 and 0.85 * 64 * 64 <= h * w <= 64 * 64 for h, w in buckets
    )
    ds, index = EncodedDataset(bucketed), load_samples(bucketed)
    assert len(ds.bucket_indices()) > 1
    f = dims["vae_scale_factor"]
    for i, row in enumerate(index):
        h, w = ds.bucket(i)
        assert ds[i]["latents"].shape == (dims["latent_channels"], h, w)
        assert ds[i]["latents"].dtype == ds[i]["text"].clip_g.dtype == torch.bfloat16
        # the bucket whose aspect ratio is nearest the image's (clamped to the widest bucket)
        aspect = math.log(row["width"] / row["height"])
        nearest = min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - aspect))
        assert abs(math.log(w / h) - math.log(nearest[1] / nearest[0])) < 1e-9
        assert row["resized_w"] >= w * f and row["resized_h"] >= h * f


def test_bad_inputs_get_errors_that_say_what_to_do(captioned_store, tiny_model_dir, tmp_path):
    (tmp_path / "raw").mkdir()  # inputs apart from OUT: the guard refuses an OUT inside a read
    with pytest.raises(StoreError, match="curated or captioned store"):
        run_precompute(tmp_path / "raw", tmp_path / "out", config_for(tiny_model_dir))
    with pytest.raises(FileNotFoundError, match="init-model"):
        run_precompute(captioned_store, tmp_path / "out", config_for(str(tmp_path / "raw")))
    with pytest.raises(ValueError, match="multiple of 8"):
        run_precompute(
            captioned_store, tmp_path / "out", config_for(tiny_model_dir, resolution=100)
        )


def test_a_sigkilled_run_resumes_to_the_same_index_and_bytes(
    encoded, captioned_store, tiny_model_dir, tmp_path
):
    out, work = tmp_path / "killed", tmp_path / ".killed.work"
    pid = (
        os.fork()
    )  # a forked child starts without re-importing torch (a fresh interpreter takes ~10 s here)
    if pid == 0:
        try:
            run_precompute(captioned_store, out, config_for(tiny_model_dir))
        finally:
            os._exit(0)
    deadline = time.monotonic() + 120
    while not list(work.glob("*/00000.vae.safetensors")) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and not (out / "manifest.json").exists()
    resumed_at = time.time()
    run_precompute(captioned_store, out, config_for(tiny_model_dir))
    assert (
        out / "shards" / "00000.vae.safetensors"
    ).stat().st_mtime < resumed_at  # reused, not redone
    assert _files(out / "shards") == _files(encoded / "shards")
    assert _files(out / "samples", "*.arrow") == _files(encoded / "samples", "*.arrow")
    assert load_rejected(out).to_list() == load_rejected(encoded).to_list()
    resumed, whole = Manifest.read(out).extra, Manifest.read(encoded).extra
    assert resumed["info"] == whole["info"] and resumed["bytes"] == whole["bytes"]
    assert not work.exists()


def _files(directory: Path, pattern: str = "*") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob(pattern))}


def test_encode_images_center_crops_to_a_square(tiny_model_dir):
    wide = Image.new("RGB", (96, 32), (200, 10, 10))
    latents = encode_images(tiny_model_dir, [wide], resolution=32, progress=False)
    assert latents.shape == (1, encoder_dims(tiny_model_dir)["latent_channels"], 8, 8)
