"""What a `t2i dpo` run reads: the preference table (ingested first when PREFS is raw data), the
folder its encodings are kept in, and the captions of the base-vs-LoRA comparison."""

from __future__ import annotations

from pathlib import Path

from curate.runtime.store import Manifest, fingerprint, params_hash
from dpo.config import DPOConfig, IngestPrefsConfig
from dpo.ingest import STAGE as PREFS_STAGE
from dpo.ingest import run_prefs


def resolve_prefs(prefs: Path, work: Path) -> Path:
    """PREFS itself when it is a finished preference table, else its ingest into WORK/prefs
    (a folder holding several Pick-a-Pic splits is refused: run `t2i prefs --split` first)."""
    manifest = Manifest.read(prefs) if prefs.is_dir() else None
    if manifest is not None and manifest.stage == PREFS_STAGE:
        return prefs
    return run_prefs(prefs, work / "prefs", IngestPrefsConfig())


def encoded_pairs_dir(root: Path, table_dir: Path, config: DPOConfig, resolution: int) -> Path:
    """Where a preference table's encodings live: keyed by the table and the encoding options only,
    so runs that differ in training options (beta, lr, steps, ...) share one encode."""
    key = params_hash(
        {
            "table": fingerprint(table_dir),
            "model": fingerprint(config.model),
            "resolution": resolution,
            "t5": config.t5_length,
            "variant": config.variant,
        }
    )
    return root / f"encoded-{key[:16]}"


def eval_captions(config: DPOConfig, rows, pairs) -> list[str]:
    """--eval-caption, else the first distinct captions of PAIRS (the held-out ones when any)."""
    if config.eval_captions:
        return list(config.eval_captions)
    by_id = dict(zip(rows["id"], rows["caption"], strict=True))
    distinct = dict.fromkeys(by_id[i] for i in pairs.ids if i in by_id)
    return list(distinct)[: config.eval_max_captions]


def check_off_target(off_target: list[str], preference_captions, preserve=()) -> None:
    """Off-target captions must be outside the preference set and the preserved captions (else
    they judge what was trained on)."""
    for name, trained in (
        ("the preference set", preference_captions),
        ("--preserve-captions", preserve),
    ):
        inside = set(off_target) & set(trained)
        if inside:
            raise ValueError(
                f"--offtarget-captions {sorted(inside)[0]!r} is a caption of {name}; off-target "
                "captions must be prompts the training never shows"
            )
