"""Session fixtures: the tiny SD3 kit and the demo collection, built once, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest
import torch

# Two cores: torch with two intra-op threads is much slower than one on small models.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A random-weight SD3 pipeline folder (`t2i init-model DIR --preset tiny`)."""
    from model.build import init_model

    return str(init_model(tmp_path_factory.mktemp("tiny-sd3") / "model", "tiny"))


@pytest.fixture(scope="session")
def tiny64_model_dir(tmp_path_factory) -> str:
    """The same kit with preset tiny-d2-64: 2 blocks, 2 heads of 64 (the widths sd-scripts and
    ComfyUI infer from a Stability checkpoint), for LoRA interop tests."""
    from model.build import init_model

    return str(init_model(tmp_path_factory.mktemp("tiny64-sd3") / "model", "tiny-d2-64"))


@pytest.fixture(scope="session")
def dpo_pairs(demo_folder, tmp_path_factory):
    """`t2i make-prefs` pairs (warm-tinted crop beats blue-tinted crop) of three demo images."""
    from flows.cli import main as t2i

    source = tmp_path_factory.mktemp("source")
    for name in ("astronaut.jpg", "coffee.jpg", "chelsea.jpg"):
        for file in (demo_folder / name, (demo_folder / name).with_suffix(".txt")):
            (source / file.name).write_bytes(file.read_bytes())
    out = tmp_path_factory.mktemp("pairs") / "pairs"
    assert t2i(["make-prefs", str(out), "--source", str(source), "--pairs-per-image", "2"]) == 0
    return out


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The demo collection in every layout: ROOT/folder, ROOT/webdataset, ROOT/parquet."""
    from curate.demo_data import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo") / "data", "all")


@pytest.fixture(scope="session")
def demo_folder(demo_root):
    return demo_root / "folder"


# --- captioning: a tiny VLM and small curated stores (tests/test_caption_*.py) ---


@pytest.fixture(scope="session")
def tiny_captioner_dir(tmp_path_factory) -> str:
    """A random-weight LLaVA folder (`t2i init-captioner DIR --preset tiny`)."""
    from captioning.tiny import init_captioner

    return str(init_captioner(tmp_path_factory.mktemp("tiny-vlm") / "vlm"))


@pytest.fixture(scope="session")
def make_caption_store(demo_folder):
    """make(out, keys=None): a curated-store-shaped stage output built from demo images.

    Columns as `t2i curate` writes them. Default keys: every demo image curation keeps, plus
    `retina_truncated`, whose bytes cannot be decoded (a row the caption stage must report).
    """
    import json

    import datasets

    from curate.runtime.store import sample_id
    from curate.runtime.store_writer import StageWriter

    truth = json.loads((demo_folder / "DEMO_TRUTH.json").read_text())
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "source": datasets.Value("string"),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "nsfw_score": datasets.Value("float32"),
            "aesthetic_score": datasets.Value("float32"),
            "aesthetic_kind": datasets.Value("string"),
            "cluster_id": datasets.Value("int64"),
        }
    )
    default = [k for k, t in truth.items() if t["expect"] in ("keep", "truncated")]

    def make(out, keys=None):
        rows = []
        for index, key in enumerate(keys or default):
            name = f"{key}.{truth[key]['ext']}"
            data = (demo_folder / name).read_bytes()
            rows.append(
                {
                    "id": sample_id(data),
                    "image": {"bytes": data, "path": None},
                    "caption": truth[key]["caption"],
                    "source": name,
                    "width": 64 + index,
                    "height": 48 + index,
                    "nsfw_score": 0.01 * index,
                    "aesthetic_score": 5.0 + 0.1 * index,
                    "aesthetic_kind": "demo",
                    "cluster_id": index % 3,
                }
            )
        with StageWriter(out, "curate", {"keys": keys}, "demo") as writer:
            writer.write_samples(rows, features)
            writer.counts.update(kept=len(rows))
        return out

    return make


@pytest.fixture(scope="session")
def caption_store(make_caption_store, tmp_path_factory):
    return make_caption_store(tmp_path_factory.mktemp("caption-store") / "curated")


# --- training: a small pre-encoded set (tests/test_train*.py; a module may override `encoded`) ---


@pytest.fixture(scope="module")
def encoded(tiny_model_dir, tmp_path_factory):
    """24 coloured shapes at 32x32, through a captioned store and `t2i precompute` (tiny kit)."""
    from train_sets import shapes_encoded

    return shapes_encoded(tiny_model_dir, tmp_path_factory.mktemp("shapes"), 24)[0]


@pytest.fixture(scope="module")
def shapes(encoded):
    from model.encoded import EncodedDataset

    return EncodedDataset(encoded)
