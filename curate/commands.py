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
]
