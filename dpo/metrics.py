"""The metrics.jsonl of a `t2i dpo` run: one row per --log-every window, read back tolerant of a
line torn by a kill, and cut back to the resumed checkpoint's step."""

from __future__ import annotations

import json
from pathlib import Path

METRICS = "metrics.jsonl"


def mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def metric_rows(path: Path) -> list[dict]:
    """The complete rows of a metrics.jsonl; a line torn by a kill mid-write is skipped."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def metrics_until(path: Path, step: int) -> None:
    """Keep the rows logged up to STEP (later ones belong to a run killed after its last
    checkpoint, and a torn last line to a kill mid-write)."""
    if path.is_file():
        rows = [row for row in metric_rows(path) if row.get("step", 0) <= step]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
