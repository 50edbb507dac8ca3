"""Command-line surface of the curation package, as data (see flows/cli.py)."""

COMMANDS = [
    {
        "name": "demo-data",
        "summary": "write a small real image-text collection with planted trouble",
        "description": (
            "Writes real images shipped by scikit-image, scikit-learn and matplotlib, each with a "
            "caption, plus near-duplicates (resized, re-encoded, cropped, flipped), an exact copy, "
            "truncated/empty/non-image files, a 16x16 image, an extreme aspect ratio and a "
            "decompression-bomb header, and valid CMYK, palette, 16-bit and EXIF-rotated images. "
            "OUTPUT/DEMO_TRUTH.json says what curation should do with each file. Never uses the "
            "network."
        ),
        "config": "curate.config:DemoDataConfig",
        "run": "curate.demo_data:run_demo_data",
        "positionals": [("output", "directory to write the collection to")],
    },
    {
        "name": "curate",
        "summary": "validate, NSFW/aesthetic-filter and deduplicate an image-text collection",
        "description": (
            "Reads INPUT (an image folder with sidecar .txt/.json captions, webdataset .tar shards, "
            "parquet with image bytes, a saved `datasets` dir, or a stage output) and writes OUTPUT: "
            "the sample table (id, image, caption, source, width, height, nsfw_score, "
            "aesthetic_score, aesthetic_kind, cluster_id), a `rejected` table with one row and "
            "reason per dropped file, report.md with contact sheets and score histograms. "
            "Steps (SD3 section 5.3.1, appendix E): decode and validate; drop exact copies; NSFW "
            "score (open_nsfw by default); aesthetic score (LAION v2 on a local CLIP, or BRISQUE "
            "quality offline); near-duplicates by pHash and FAISS k-means + per-cluster range "
            "search (Algorithm 1). Resumable after a kill; skipped when already done. Offline."
        ),
        "config": "curate.config:CurateConfig",
        "run": "curate.stage:run_curate",
        "positionals": [
            ("input", "collection to curate (never modified)"),
            ("output", "directory to write"),
        ],
    },
]
