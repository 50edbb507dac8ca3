"""`make demo`: the whole chain on the offline tiny kit, printing where each output is."""

from __future__ import annotations

import sys
from pathlib import Path

from flows.cli import main as t2i


def run(out: Path) -> None:
    steps = [
        ("demo data", ["demo-data", str(out / "raw"), "--format", "folder"]),
        ("tiny SD3 model", ["init-model", str(out / "model"), "--preset", "tiny"]),
        ("samples", ["sample", "--model", str(out / "model"), "--prompt", "a photo of a red cat",
                     "--steps", "4", "--seed", "0", "1", "--out", str(out / "samples")]),
    ]  # fmt: skip
    for title, argv in steps:
        print(f"== {title}: t2i {' '.join(argv)}", flush=True)
        if t2i(argv) != 0:
            raise SystemExit(f"demo step {title!r} failed")
    print(f"\ndemo finished; outputs under {out.resolve()}")


if __name__ == "__main__":
    run(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-out"))
