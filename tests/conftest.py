"""Session fixtures: the tiny SD3 kit and the demo collection, built once, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two cores: torch with two intra-op threads is much slower than one on small models.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A random-weight SD3 pipeline folder (`t2i init-model DIR --preset tiny`)."""
    from model.build import init_model

    return str(init_model(tmp_path_factory.mktemp("tiny-sd3") / "model", "tiny"))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The demo collection in every layout: ROOT/folder, ROOT/webdataset, ROOT/parquet."""
    from curate.demo_data import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo") / "data", "all")


@pytest.fixture(scope="session")
def demo_folder(demo_root):
    return demo_root / "folder"
