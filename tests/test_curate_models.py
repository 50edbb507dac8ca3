"""The pluggable scorers and embedders load real model folders and files (tiny, built from configs)."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from curate.aesthetic import BrisqueQuality, LaionAestheticV2
from curate.clip import TINY_CLIP_VISION, ClipImageEmbedder, init_clip_vision
from curate.config import CurateConfig
from curate.embed import SSCD, EfficientNetLite0, HFVision
from curate.nsfw import HFImageClassifierNSFW, LaionClipNSFW, OpenNSFW
from curate.runtime.store import load_samples
from curate.stage import run_curate


def _images(n=3, size=48):
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (size, size + 8 * i, 3), dtype=np.uint8))
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny CLIP vision tower, LAION-style heads, an HF classifier, an HF vision model and an SSCD TorchScript."""
    from transformers import (
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
        ViTModel,
    )

    root = tmp_path_factory.mktemp("tiny-curate-models")
    init_clip_vision(root / "clip", **TINY_CLIP_VISION)
    # LAION aesthetic v2 layout (Linear only, dropout between): 16-32-8-4-2-1 instead of 768-1024-128-64-16-1
    dims = [16, 32, 8, 4, 2, 1]
    aesthetic = {}
    for index, (a, b) in zip([0, 2, 4, 6, 7], zip(dims[:-1], dims[1:], strict=True), strict=True):
        aesthetic[f"layers.{index}.weight"], aesthetic[f"layers.{index}.bias"] = (
            torch.randn(b, a) * 0.3,
            torch.randn(b) * 0.1,
        )
    save_file(aesthetic, str(root / "aesthetic.safetensors"))
    torch.save(aesthetic, root / "aesthetic.pth")
    nsfw = {
        "layers.0.weight": torch.randn(8, 16),
        "layers.0.bias": torch.zeros(8),
        "layers.1.weight": torch.randn(1, 8),
        "layers.1.bias": torch.zeros(1),
    }
    save_file(nsfw, str(root / "nsfw_head.safetensors"))
    vit = ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        id2label={0: "normal", 1: "nsfw"},
        label2id={"normal": 0, "nsfw": 1},
    )
    ViTForImageClassification(vit).save_pretrained(root / "nsfw_hf")
    ViTModel(vit).save_pretrained(root / "vision_hf")
    for name in ("nsfw_hf", "vision_hf"):
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / name)
    sscd = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=4),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 12),
    )
    torch.jit.script(sscd).save(str(root / "sscd.pt"))
    return root


def test_laion_aesthetic_v2_is_the_mlp_on_normalised_clip_embeddings(tiny):
    images = _images()
    clip = ClipImageEmbedder(str(tiny / "clip"))
    embeddings = clip(images)
    assert embeddings.shape == (3, 16) and np.allclose(
        np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5
    )
    state = torch.load(tiny / "aesthetic.pth", weights_only=True)
    x = torch.from_numpy(embeddings)
    for index in (0, 2, 4, 6, 7):  # no activations, as LAION trained it
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    for weights in ("aesthetic.safetensors", "aesthetic.pth"):
        scores = LaionAestheticV2(str(tiny / "clip"), str(tiny / weights), clip=clip)(images)
        assert np.allclose(scores, x.squeeze(-1).numpy(), atol=1e-5)


def test_a_head_for_another_clip_width_is_refused_with_a_clear_error(tiny, tmp_path):
    save_file({"layers.0.weight": torch.zeros(1, 768)}, str(tmp_path / "vitl.safetensors"))
    with pytest.raises(ValueError, match="768-d embeddings but the CLIP model gives 16-d"):
        LaionAestheticV2(str(tiny / "clip"), str(tmp_path / "vitl.safetensors"))


def test_nsfw_detectors_give_probabilities(tiny):
    images = _images()
    for detector in (
        HFImageClassifierNSFW(str(tiny / "nsfw_hf")),
        LaionClipNSFW(str(tiny / "clip"), str(tiny / "nsfw_head.safetensors")),
        OpenNSFW(),
    ):
        scores = detector(images)
        assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 1)), detector.kind


def test_embedders_are_l2_normalised_and_separate_different_images(tiny):
    images = _images()
    for embedder in (
        SSCD(str(tiny / "sscd.pt")),
        HFVision(str(tiny / "vision_hf")),
        EfficientNetLite0(),
    ):
        vectors = embedder(images + [images[0].resize((40, 40))])
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5), embedder.kind
    import skimage.data

    photos = [Image.fromarray(skimage.data.astronaut()), Image.fromarray(skimage.data.coffee())]
    lite = EfficientNetLite0()(photos + [photos[0].resize((200, 200))])
    assert lite.shape[1] == 1280 and lite[0] @ lite[2] > 0.9 > 0.5 > lite[0] @ lite[1]


def test_the_offline_quality_score_is_higher_for_a_clean_image_than_a_noisy_copy():
    import skimage.data

    clean = Image.fromarray(skimage.data.camera()).convert("RGB").resize((160, 160))
    noisy = np.asarray(clean, dtype=np.float64) + np.random.default_rng(0).normal(
        0, 40, (160, 160, 3)
    )
    scores = BrisqueQuality()([clean, Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))])
    assert scores[0] > scores[1] + 20


def test_curate_runs_end_to_end_with_the_clip_based_scorers(tiny, demo_folder, tmp_path):
    small = tmp_path / "in"
    small.mkdir()
    for name in (
        "camera.jpg",
        "camera.txt",
        "coins.jpg",
        "coins.txt",
        "palette.png",
        "palette.txt",
        "empty.jpg",
    ):
        (small / name).write_bytes((demo_folder / name).read_bytes())
    config = CurateConfig(
        workers=1,
        nsfw_detector="laion_clip",
        nsfw_model=str(tiny / "nsfw_head.safetensors"),
        nsfw_threshold=1.0,
        clip_model=str(tiny / "clip"),
        aesthetic_model=str(tiny / "aesthetic.safetensors"),
        aesthetic_threshold=-1e9,
        embedder="clip",
        similarity_threshold=0.9999,
        phash_distance=-1,
    )
    samples = load_samples(run_curate(small, tmp_path / "out", config))
    assert sorted(samples["source"]) == ["camera.jpg", "coins.jpg", "palette.png"]
    assert set(samples["aesthetic_kind"]) == {"laion_v2"}
    clip = ClipImageEmbedder(str(tiny / "clip"))
    row = samples.filter(lambda r: r["source"] == "camera.jpg")[0]
    expected = LaionAestheticV2(str(tiny / "clip"), str(tiny / "aesthetic.safetensors"), clip=clip)(
        [row["image"]]
    )[0]
    assert row["aesthetic_score"] == pytest.approx(expected, abs=1e-4)
