"""Write a trained transformer as a diffusers SD3 folder beside the base model's other parts."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from model.folders import weight_variant

SKIP = {"transformer", "model_index.json", "training", "manifest.json"}
WEIGHTS = (".safetensors", ".bin")


def _other_weights(variant: str | None):
    """copytree's ignore: with a variant, weight files of any other variant (or none) stay behind."""

    def ignore(folder: str, names: list[str]) -> list[str]:
        if variant is None:
            return []
        weights = [n for n in names if n.endswith(WEIGHTS) or ".index." in n]
        return [n for n in weights if weight_variant(n) != variant]

    return ignore


def _plain_name(name: str, variant: str) -> str:
    """model.fp16.safetensors -> model.safetensors, model.fp16-00001-of-00002.safetensors ->
    model-00001-of-00002.safetensors, model.safetensors.index.fp16.json -> model.safetensors.index.json"""
    return re.sub(rf"\.{re.escape(variant)}(?=[.-])", "", name)


def _drop_variant(folder: Path, variant: str) -> None:
    for file in sorted(folder.rglob("*")):
        if not file.is_file() or weight_variant(file.name) != variant:
            continue
        target = file.with_name(_plain_name(file.name, variant))
        if ".index." in file.name:  # a sharded checkpoint's index names its shard files
            index = json.loads(file.read_text())
            index["weight_map"] = {
                k: _plain_name(v, variant) for k, v in index["weight_map"].items()
            }
            target.write_text(json.dumps(index, indent=2))
            file.unlink()
        else:
            file.rename(target)


def export_pipeline(
    model_dir: Path,
    transformer: torch.nn.Module,
    output: Path,
    shift: float | None,
    variant: str | None = None,
) -> Path:
    """Copy every component of MODEL_DIR except its transformer, save TRANSFORMER in its place,
    store the training shift (Eq. 23) in the scheduler config (None: leave it as it was), and
    write model_index.json last, so a folder without it is an unfinished export. With VARIANT,
    its weight files are copied under their plain names (model.fp16.safetensors ->
    model.safetensors), so the output loads without --variant like the transformer saved beside
    them; other variants are left out."""
    model_dir, output = Path(model_dir), Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "model_index.json").unlink(missing_ok=True)
    for entry in sorted(model_dir.iterdir()):
        if entry.name in SKIP or entry.name.startswith("."):
            continue
        target = output / entry.name
        if entry.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(entry, target, ignore=_other_weights(variant))
            if variant:
                _drop_variant(target, variant)
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
