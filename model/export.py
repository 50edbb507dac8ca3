"""Write a trained transformer as a diffusers SD3 folder beside the base model's other parts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

SKIP = {"transformer", "model_index.json", "training", "manifest.json"}


def export_pipeline(
    model_dir: Path, transformer: torch.nn.Module, output: Path, shift: float | None
) -> Path:
    """Copy every component of MODEL_DIR except its transformer, save TRANSFORMER in its place,
    store the training shift (Eq. 23) in the scheduler config (None: leave it as it was), and write model_index.json last,
    so a folder without it is an unfinished export."""
    model_dir, output = Path(model_dir), Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "model_index.json").unlink(missing_ok=True)
    for entry in sorted(model_dir.iterdir()):
        if entry.name in SKIP or entry.name.startswith("."):
            continue
        target = output / entry.name
        if entry.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(entry, target)
        else:
            shutil.copy2(entry, target)
    scheduler_config = output / "scheduler" / "scheduler_config.json"
    if shift is not None and scheduler_config.is_file():
        config = json.loads(scheduler_config.read_text())
        config["shift"] = float(shift)
        scheduler_config.write_text(json.dumps(config, indent=2))
    shutil.rmtree(output / "transformer", ignore_errors=True)
    transformer.save_pretrained(output / "transformer", safe_serialization=True)
    shutil.copy2(model_dir / "model_index.json", output / "model_index.json")
    return output
