"""Peak RSS of reading a ~1 MB gzip tar whose one member is SIZE bytes (issue 24).

    PYTHONPATH=. python benchmarks/bench_tar_member_cap.py --size-mb 400

Builds the tar (tests/bad_corpus.big_tar, written in 1 MiB pieces), then in a fresh process
reads every record with curate.ingest.read_records and prints that process's peak RSS: with the
cap (the default max_image_bytes) the member is refused from its header and never read.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
READ = (
    "import resource, sys; from curate.ingest import read_records; "
    "records = [(r.key, r.refused, len(r.data)) for r in read_records(sys.argv[1])]; "
    "print(records, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, 'MB peak')"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=400)
    parser.add_argument(
        "--code", default=str(REPO), help="checkout whose curate.ingest reads (e.g. an older one)"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    import bad_corpus

    with tempfile.TemporaryDirectory() as folder:
        tar = Path(folder) / "big.tar"
        bad_corpus.big_tar(tar, args.size_mb << 20)
        print(f"{tar.stat().st_size / 1e6:.2f} MB gzip tar, member {args.size_mb} MiB")
        env = {**os.environ, "PYTHONPATH": args.code}
        done = subprocess.run(
            [sys.executable, "-c", READ, str(tar)],
            capture_output=True,
            text=True,
            cwd=args.code,
            env=env,
        )
        print(done.stdout.strip() or done.stderr.strip()[-400:])


if __name__ == "__main__":
    main()
