"""The option vocabulary every stage shares: one name, type and default per idea (docs/options.md).

A config class that renamed an option lists it once, `RENAMED = {"old_name": "new_name"}`; the old
spelling is then accepted for one release, with a one-line `OptionRenamed` warning, wherever
options come from: a flag (flows/cli.py), a --config TOML key (curate/runtime/config_file.py) or a Python
or Prefect caller (the `RenamedOptions` validator).
"""

from __future__ import annotations

import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

AUTO_DEVICE = "auto"
DEVICE_HELP = "torch device: auto (cuda when available, else cpu), cpu, cuda or cuda:N"


class OptionRenamed(FutureWarning):
    """An option was given by its old spelling; it still works until the next release."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def renamed_message(old: str, new: str, where: str = "flag") -> str:
    """One line: which spelling was used, which to use instead."""
    if where == "flag":
        old, new = flag(old), flag(new)
    else:
        old, new = f"key {old!r}", repr(new)
    return f"{old} is deprecated, use {new} (the old spelling is accepted until the next release)"


def warn_renamed(old: str, new: str, where: str = "flag", prefix: str = "") -> None:
    warnings.warn(OptionRenamed(prefix + renamed_message(old, new, where)), stacklevel=3)


def rename_keys(values: dict[str, Any], renamed: dict[str, str], where: str, prefix: str = ""):
    """VALUES with each old key moved to its new name (warned once each); both given is an error."""
    values = dict(values)
    for old, new in renamed.items():
        if old not in values:
            continue
        if new in values:
            raise ValueError(f"{prefix}{old} and {new} are the same option: give only {new}")
        warn_renamed(old, new, where, prefix)
        values[new] = values.pop(old)
    return values


class RenamedOptions(BaseModel):
    """Accepts the old spellings listed in the class's RENAMED, with an OptionRenamed warning."""

    RENAMED: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _old_spellings(cls, values: Any) -> Any:
        if isinstance(values, dict) and cls.RENAMED:
            return rename_keys(values, cls.RENAMED, "key", f"{cls.__name__}: ")
        return values


def resolve_device(device: str | None) -> str:
    """--device auto: cuda when torch sees a GPU, else cpu; any other name as given."""
    if device in (None, AUTO_DEVICE):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def device_option(use: str = "") -> Any:
    """The --device field of every stage that runs a torch model."""
    return Field(AUTO_DEVICE, description=DEVICE_HELP + (f" ({use})" if use else ""))


def resume_value(value: Any) -> str | None:
    """--resume's value: 'latest', a checkpoint folder, or 'none'/None (start fresh). The old dpo
    switch (true/false) still means latest/none, with a warning."""
    if isinstance(value, bool):
        warnings.warn(
            OptionRenamed(
                f"resume = {str(value).lower()} is deprecated, use resume = "
                f"{'latest' if value else 'none'} (accepted until the next release)"
            ),
            stacklevel=3,
        )
        return "latest" if value else None
    if isinstance(value, str) and value.lower() == "none":
        return None
    return value


# ----------------------------------------------------------------------------- the vocabulary

DTYPE = Literal["fp32", "fp16", "bf16"]
BASE_DTYPE = Literal["auto", "fp32", "fp16", "bf16"]


@dataclass(frozen=True)
class SharedOption:
    """One idea's option: its type (None allowed on top where a stage leaves it unset) and
    default wherever it appears. DEFAULTS lists the commands whose default differs on purpose,
    REASON says why; RENAMED the old spelling per command."""

    idea: str
    type: Any
    default: Any
    commands: tuple[str, ...]
    defaults: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    renamed: dict[str, str] = field(default_factory=dict)
    old_forms: str = ""  # an old form that is not a plain rename (docs/options.md says it)

    def default_for(self, command: str) -> Any:
        return self.defaults.get(command, self.default)


TRAINERS = ("train", "dpo")
TORCH_STAGES = ("curate", "caption", "serve-captioner", "precompute", "train", "dpo", "sample")

VOCABULARY: dict[str, SharedOption] = {
    "device": SharedOption(
        "torch device the stage's models run on",
        str,
        AUTO_DEVICE,
        TORCH_STAGES,
        reason="auto = cuda when torch sees a GPU, else cpu (`accelerate launch` for several GPUs)",
    ),
    "lora_rank": SharedOption(
        "LoRA rank",
        int,
        128,
        TRAINERS,
        {"train": None},
        "train trains every weight unless --lora-rank is given",
        {"dpo": "rank"},
    ),
    "lora_alpha": SharedOption(
        "LoRA alpha: the update is scaled by alpha / rank",
        float,
        None,
        TRAINERS,
        reason="unset = the rank",
        renamed={"dpo": "alpha"},
    ),
    "lora_targets": SharedOption(
        "module-name suffixes of the transformer's layers that get a LoRA; shorthands attention, "
        "all-linears, embedders, final-layer",
        list[str],
        "all-linears",
        TRAINERS,
        {"dpo": "attention"},
        "dpo's default was measured (benchmarks/RESULTS.md, issue 11): LoRAs on every linear "
        "moved prompts outside the preference set far more",
        {"dpo": "target_modules"},
    ),
    "lora_base_dtype": SharedOption(
        "dtype of the frozen base under a LoRA",
        BASE_DTYPE,
        "auto",
        TRAINERS,
        reason="auto = the autocast precision: bf16 on GPUs that support it, fp32 without autocast",
        renamed={"dpo": "base_dtype"},
    ),
    "resume": SharedOption(
        "continue from a checkpoint: latest, a checkpoint folder, or none; a bare --resume = latest",
        str,
        None,
        TRAINERS,
        {"dpo": "latest"},
        "dpo keeps its checkpoints under a key of its own options, so the latest one is always "
        "this run's; train refuses to write over an earlier run's checkpoints unless told",
        old_forms="dpo: the switch `--resume` / `--no-resume` (now latest / none)",
    ),
    "t5_length": SharedOption(
        "T5 tokens per caption",
        int,
        77,
        ("precompute", "dpo", "sample"),
        {"sample": None},
        "sample: unset = the length --model was trained with (its manifest), else 256",
        {"dpo": "max_sequence_length", "sample": "max_sequence_length"},
    ),
    "variant": SharedOption(
        "weight variant of --model (e.g. fp16)",
        str,
        None,
        ("precompute", "train", "dpo", "sample", "export-single-file", "merge-lora"),
    ),
    "transformer_file": SharedOption(
        "Stability single-file transformer used in place of --model's",
        str,
        None,
        ("train", "dpo", "sample"),
    ),
    "save_dtype": SharedOption(
        "dtype of exported weights (a LoRA; export-single-file: the transformer)",
        DTYPE,
        "bf16",
        ("train", "dpo", "lora-convert", "export-single-file", "merge-lora"),
        {"merge-lora": "fp32"},
        "an exact merge, the reference DPO starts from",
    ),
    "mixed_precision": SharedOption(
        "autocast precision",
        Literal["auto", "no", "bf16", "fp16"],
        "auto",
        TRAINERS,
        reason="auto = bf16 on a GPU that supports it, else none (fp32)",
    ),
    "report_to": SharedOption(
        "where the scalars and sample grids of a training run go",
        Literal["tensorboard", "wandb", "all", "none"],
        "tensorboard",
        TRAINERS,
    ),
    "lr": SharedOption("AdamW learning rate", float, 1e-4, TRAINERS),
    "weight_decay": SharedOption("AdamW weight decay", float, 0.0, TRAINERS),
    "grad_clip": SharedOption("clip of the global gradient norm", float, 1.0, TRAINERS),
    "grad_accum": SharedOption("micro-batches per optimizer step", int, 1, TRAINERS),
    "gradient_checkpointing": SharedOption(
        "recompute activations in backward to save memory", bool, False, TRAINERS
    ),
    "shift": SharedOption(
        "timestep shift alpha of SD3 Eq. 23",
        float,
        None,
        TRAINERS,
        reason="unset = the base scheduler's shift (train --preset: from the set's resolution)",
    ),
}


def type_name(annotation: Any) -> str:
    """An option's type as docs/options.md writes it."""
    if typing.get_origin(annotation) is Literal:
        return " / ".join(map(str, typing.get_args(annotation)))
    if typing.get_origin(annotation) is list:
        return "list of " + type_name(typing.get_args(annotation)[0])
    return {str: "text", int: "integer", float: "number", bool: "switch"}[annotation]


def _shown(value: Any) -> str:
    return (
        "unset" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )


def options_table() -> str:
    """The option table of docs/options.md (a test checks that the page holds it verbatim)."""
    lines = [
        "| option | idea | type | default | commands | notes | old spelling (until the next release) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, option in VOCABULARY.items():
        others = "; ".join(f"{c}: {_shown(v)}" for c, v in option.defaults.items())
        differs = f"{others} ({option.reason})" if others else option.reason
        old = "; ".join(
            [f"{c}: `{flag(o)}`" for c, o in option.renamed.items()] + [option.old_forms]
        )
        old = old.strip("; ")
        row = [f"`{flag(name)}`", option.idea, type_name(option.type), _shown(option.default)]
        row += [", ".join(option.commands), differs, old]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
