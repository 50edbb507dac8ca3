"""Training checkpoints: accelerate's full state (model, optimizer, scheduler, registered objects
such as the EMA, RNG) plus our own step counter, written atomically, with a retention limit."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_path(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints (those with a trainer_state.json), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def resolve_resume(root: Path, resume: str | None) -> Path | None:
    """None (fresh start), the newest checkpoint for 'latest', or the named folder."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume {resume}: not a finished checkpoint (no {STATE_FILE}); use 'latest' or one of "
            f"{[p.name for p in list_checkpoints(root)] or 'none yet'} under {root}"
        )
    return path


def save_checkpoint(
    accelerator: Accelerator, root: Path, step: int, state: dict[str, Any], keep: int
) -> Path:
    """Save under a temporary name, then rename: a killed save never looks like a checkpoint."""
    root = Path(root)
    final = checkpoint_path(root, step)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore everything accelerate saved; return our trainer state (its "step" above all)."""
    accelerator.load_state(str(path))
    return json.loads((Path(path) / STATE_FILE).read_text())
