"""Reading a diffusers SD3 folder as users have them: its index, components, variants and single files, checked before anything loads."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from diffusers import (
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.utils import logging as diffusers_logging

from model.build import text_dims

PIPELINE_CLASS = "StableDiffusion3Pipeline"

T5_PARTS = ("text_encoder_3", "tokenizer_3")  # optional: SD3 runs with zeros in T5's place

WEIGHT_SUFFIXES = (".safetensors", ".bin")

NOT_A_FOLDER_HINT = (
    "pass a local SD3/SD3.5 diffusers folder such as stable-diffusion-3-medium-diffusers, "
    "or make one with `t2i init-model DIR --preset tiny`"
)


class ModelFolderError(ValueError):
    """A model folder or checkpoint that cannot be loaded; the message is one line."""


class MissingModelFile(ModelFolderError, FileNotFoundError):
    """A file or folder the model needs is not there (also a FileNotFoundError)."""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def model_index(model_dir: str | os.PathLike) -> dict[str, Any]:
    """model_index.json of an SD3/SD3.5 folder; a one-line error for anything else."""
    path = Path(model_dir) / "model_index.json"
    if not path.is_file():
        kind = "a file" if Path(model_dir).is_file() else "not a diffusers pipeline folder"
        raise MissingModelFile(f"{model_dir} is {kind} (no model_index.json); {NOT_A_FOLDER_HINT}")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFolderError(f"{path} is not valid JSON ({_one_line(error)})") from None
    name = index.get("_class_name")
    if name != PIPELINE_CLASS:
        raise ModelFolderError(
            f"{model_dir} holds a {name or 'unnamed'} pipeline; expected an SD3/SD3.5 folder "
            f"({PIPELINE_CLASS} in model_index.json)"
        )
    return index


def component_entry(model_dir: str | os.PathLike, component: str) -> tuple[str, str] | None:
    """(library, class) of a component, or None when model_index.json lists it as null."""
    index = model_index(model_dir)
    if component not in index:
        raise ModelFolderError(f"{model_dir}/model_index.json names no {component}")
    entry = index[component]
    if not entry or entry[0] is None:
        return None
    return entry[0], entry[1]


def has_t5(model_dir: str | os.PathLike) -> bool:
    """False for a T5-less folder (text_encoder_3 null, as saved with `text_encoder_3=None`)."""
    return component_entry(model_dir, "text_encoder_3") is not None


def t5_width(model_dir: str | os.PathLike) -> int:
    """T5's width: its d_model, or for a T5-less folder the transformer's joint_attention_dim
    (the width of the zeros the pipeline feeds in T5's place)."""
    folder = Path(model_dir)
    part = "text_encoder_3" if has_t5(folder) else "transformer"
    path = folder / part / "config.json"
    if not path.is_file():
        need = "T5's config" if part == "text_encoder_3" else "the width of T5's zeros (no T5)"
        raise MissingModelFile(f"{path} is missing; it gives {need}")
    config = json.loads(path.read_text())
    return config["d_model"] if part == "text_encoder_3" else config["joint_attention_dim"]


def folder_text_dims(model_dir: str | os.PathLike) -> dict[str, int]:
    """`text_dims` of a folder from its configs alone (no weights), T5-less folders included."""
    configs = {}
    for part in ("text_encoder", "text_encoder_2"):
        path = Path(model_dir) / part / "config.json"
        if not path.is_file():
            raise MissingModelFile(f"{path} is missing; expected a CLIP text encoder config")
        configs[part] = SimpleNamespace(config=SimpleNamespace(**json.loads(path.read_text())))
    configs["text_encoder_3"] = SimpleNamespace(config=SimpleNamespace(d_model=t5_width(model_dir)))
    return text_dims(configs)


def weight_variant(name: str) -> str | None:
    """'fp16' for model.fp16.safetensors, model.fp16-00001-of-00002.safetensors and
    model.safetensors.index.fp16.json; None for files without a variant."""
    if ".index." in name:
        found = re.search(r"\.index\.([^.]+)\.json$", name)
        return found.group(1) if found else None
    stem = re.sub(r"-\d{5}-of-\d{5}$", "", re.sub(r"\.(safetensors|bin)$", "", name))
    parts = stem.split(".")
    return parts[-1] if len(parts) > 1 else None


def check_component(
    model_dir: str | os.PathLike, component: str, variant: str | None = None
) -> Path:
    """The component's folder, after checking it has a config and weights for VARIANT."""
    folder = Path(model_dir) / component
    entry = component_entry(model_dir, component)
    if entry is None:
        raise ModelFolderError(f"{model_dir} has no {component} (null in model_index.json)")
    if not folder.is_dir():
        raise MissingModelFile(
            f"{folder} is missing; model_index.json names {entry[1]} for {component}"
        )
    if component.startswith("tokenizer") or component == "scheduler":
        return folder
    if not (folder / "config.json").is_file():
        raise MissingModelFile(f"{folder} has no config.json; expected a {entry[1]} folder")
    weights = sorted(p.name for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    found = {weight_variant(name) for name in weights}
    if not weights:
        raise MissingModelFile(f"{folder} has no weights (*.safetensors or *.bin)")
    if variant is not None and variant not in found:
        raise ModelFolderError(
            f"{folder} has no {variant} weights (expected *.{variant}.safetensors; found "
            f"{', '.join(weights)})"
        )
    if variant is None and None not in found:
        hint = ", ".join(sorted(str(v) for v in found))
        raise ModelFolderError(
            f"{folder} has only variant weights ({', '.join(weights)}); pass --variant {hint}"
        )
    return folder


def load_component(
    model_dir: str | os.PathLike,
    component: str,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """One pipeline component (a model, tokenizer or scheduler) from a local folder, never a hub."""
    folder = check_component(model_dir, component, variant)
    library, name = component_entry(model_dir, component)
    cls = getattr(importlib.import_module(library), name)
    try:
        if component.startswith("tokenizer") or component == "scheduler":
            return cls.from_pretrained(folder, local_files_only=True)
        return cls.from_pretrained(
            model_dir, subfolder=component, variant=variant, dtype=dtype, local_files_only=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelFolderError(
            f"cannot load {component} ({name}) from {folder}: {_one_line(error)}"
        ) from None


def load_transformer(
    model_dir: str | os.PathLike,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    transformer_file: str | os.PathLike | None = None,
) -> SD3Transformer2DModel:
    """MODEL_DIR's MMDiT, or the one in TRANSFORMER_FILE (a Stability single-file SD3/SD3.5
    checkpoint) with MODEL_DIR's transformer config, through diffusers' single-file loader."""
    if transformer_file is None:
        return load_component(model_dir, "transformer", variant, dtype)
    path = Path(transformer_file)
    check_single_file(path)
    config = Path(model_dir) / "transformer" / "config.json"
    if not config.is_file():
        raise MissingModelFile(
            f"{config} is missing; --transformer-file takes its architecture from --model's "
            "transformer/config.json (e.g. stable-diffusion-3.5-medium's)"
        )
    try:
        return SD3Transformer2DModel.from_single_file(
            str(path),
            config=str(model_dir),
            subfolder="transformer",
            torch_dtype=dtype,
            local_files_only=True,
        )
    except (OSError, ValueError, KeyError, RuntimeError, IndexError) as error:
        raise ModelFolderError(
            f"{path} does not fit {config} (an SD3/SD3.5 MMDiT of another size or version?): "
            f"{_one_line(error)}"
        ) from None


STABILITY_PREFIX = "model.diffusion_model."


def check_single_file(path: Path) -> None:
    """A Stability MMDiT checkpoint has joint_blocks (under model.diffusion_model. or bare)."""
    if not path.is_file():
        raise MissingModelFile(f"--transformer-file {path} does not exist")
    if path.suffix != ".safetensors":
        raise ModelFolderError(
            f"{path} is not a .safetensors file; expected e.g. sd3.5_medium.safetensors"
        )
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as error:  # any unreadable header
        raise ModelFolderError(
            f"{path} is not a readable safetensors file ({_one_line(error)})"
        ) from None
    if not any(k.removeprefix(STABILITY_PREFIX).startswith("joint_blocks.") for k in keys):
        raise ModelFolderError(
            f"{path} is not a Stability SD3/SD3.5 checkpoint (no joint_blocks.* MMDiT keys); for a "
            "diffusers transformer folder use --model or --init-from"
        )


def load_pipeline(
    model_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    variant: str | None = None,
    transformer_file: str | os.PathLike | None = None,
    **components: Any,
) -> StableDiffusion3Pipeline:
    """Load any local SD3/SD3.5 diffusers folder, never touching a hub.

    VARIANT picks the `*.VARIANT.safetensors` weights (e.g. fp16); a T5-less folder loads with
    text_encoder_3 = tokenizer_3 = None, where the pipeline feeds zeros in T5's place; a
    TRANSFORMER_FILE (Stability single-file checkpoint) replaces the folder's transformer.
    """
    model_dir = Path(model_dir)
    for component in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if component in components or (component == "transformer" and transformer_file):
            continue
        if component == "text_encoder_3" and not has_t5(model_dir):
            components.update(text_encoder_3=None, tokenizer_3=None)
            continue
        check_component(model_dir, component, variant)
    if transformer_file is not None and "transformer" not in components:
        components["transformer"] = load_transformer(model_dir, variant, dtype, transformer_file)
    try:
        with _no_loading_bar():
            pipe = StableDiffusion3Pipeline.from_pretrained(
                model_dir, dtype=dtype, variant=variant, local_files_only=True, **components
            )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelFolderError(f"cannot load {model_dir}: {_one_line(error)}") from None
    return pipe.to(device)


@contextlib.contextmanager
def _no_loading_bar() -> Iterator[None]:
    """Without diffusers' "Loading pipeline components" bar: the stage loading it shows its own."""
    shown = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            diffusers_logging.enable_progress_bar()


def parse_dtype(name: str) -> torch.dtype:
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of fp32, fp16, bf16") from None
