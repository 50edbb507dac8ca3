"""The `t2i` command table: every command's name, config class and runner, in pipeline order.

A command's words (one-line summary, --help text, positional arguments) live on its config
class (`summary`, `description`, `positionals`); every runner is `run_<command>(inputs...,
output, config)` (a service has no output). Each runner below imports its stage when called:
importing every stage package takes seconds, so `t2i --help` would not stay instant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from captioning.config import CaptionConfig, InitCaptionerConfig, ServeCaptionerConfig
from curate.config import CurateConfig, DemoDataConfig
from dpo.config import DPOConfig, IngestPrefsConfig, MakePrefsConfig
from flows.config import RunAllConfig, ServeConfig
from model.config import (
    InitModelConfig,
    PrecomputeConfig,
    SampleConfig,
    TrainConfig,
)
from model.interop_config import ExportSingleFileConfig, LoraConvertConfig, MergeLoraConfig


@dataclass(frozen=True)
class Command:
    name: str
    config: type[BaseModel]
    run: Callable[..., Any]  # run(*inputs, output, config=ConfigModel(...))
    flow: bool = True  # served as a Prefect flow; False for services and the orchestrator
    writes: bool = True  # takes --overwrite (the output guard); False for the services

    @property
    def summary(self) -> str:
        return self.config.summary

    @property
    def description(self) -> str:
        return self.config.description

    @property
    def positionals(self) -> tuple[tuple[str, str], ...]:
        return self.config.positionals

    @property
    def positional_names(self) -> list[str]:
        return [name for name, _ in self.positionals]

    def arguments(self, values: dict[str, str], config: BaseModel) -> list[str]:
        """The runner's arguments before the config: its positionals, and its output when an
        option names it (`t2i sample --out`)."""
        arguments = [values[name] for name in self.positional_names]
        if "output" not in self.positional_names and "out" in type(config).model_fields:
            arguments.append(config.out)
        return arguments


# ---- runners: import the stage only when it runs -------------------------------------------


def run_demo_data(output: str, config: DemoDataConfig) -> Path:
    from curate.demo_data import run_demo_data

    return run_demo_data(output, config)


def run_curate(input: str, output: str, config: CurateConfig) -> Path:
    from curate.stage import run_curate

    return run_curate(input, output, config)


def run_init_captioner(output: str, config: InitCaptionerConfig) -> Path:
    from captioning.tiny import run_init_captioner

    return run_init_captioner(output, config)


def run_caption(input: str, output: str, config: CaptionConfig) -> Path:
    from captioning.stage import run_caption

    return run_caption(input, output, config)


def run_serve_captioner(model: str, config: ServeCaptionerConfig) -> None:
    from captioning.server import run_serve_captioner

    return run_serve_captioner(model, config)


def run_init_model(output: str, config: InitModelConfig) -> Path:
    from model.build import run_init_model

    return run_init_model(output, config)


def run_precompute(input: str, output: str, config: PrecomputeConfig) -> Path:
    from model.precompute import run_precompute

    return run_precompute(input, output, config)


def run_train(encoded: str, output: str, config: TrainConfig) -> Path:
    from model.train import run_train

    return run_train(encoded, output, config)


def run_prefs(source: str, output: str, config: IngestPrefsConfig) -> Path:
    from dpo.ingest import run_prefs

    return run_prefs(source, output, config)


def run_make_prefs(output: str, config: MakePrefsConfig) -> Path:
    from dpo.synthetic import run_make_prefs

    return run_make_prefs(output, config)


def run_dpo(prefs: str, output: str, config: DPOConfig) -> Path:
    from dpo.trainer import run_dpo

    return run_dpo(prefs, output, config)


def run_sample(output: str, config: SampleConfig) -> Path:
    from model.sampling import run_sample

    return run_sample(output, config)


def run_lora_convert(input: str, output: str, config: LoraConvertConfig) -> Path:
    from model.lora_formats import run_lora_convert

    return run_lora_convert(input, output, config)


def run_export_single_file(model: str, output: str, config: ExportSingleFileConfig) -> Path:
    from model.single_file import run_export_single_file

    return run_export_single_file(model, output, config)


def run_merge_lora(base: str, lora: str, output: str, config: MergeLoraConfig) -> Path:
    from model.merge_lora import run_merge_lora

    return run_merge_lora(base, lora, output, config)


def run_serve(config: ServeConfig) -> None:
    from flows.serve import run_serve

    return run_serve(config)


def run_run_all(workdir: str, config: RunAllConfig) -> Path:
    from flows.serve import run_run_all

    return run_run_all(workdir, config)


# ---- the command table, in pipeline order ----------------------------------------------------

COMMANDS: tuple[Command, ...] = (
    Command("demo-data", DemoDataConfig, run_demo_data),
    Command("init-model", InitModelConfig, run_init_model),
    Command("curate", CurateConfig, run_curate),
    Command("init-captioner", InitCaptionerConfig, run_init_captioner),
    Command("caption", CaptionConfig, run_caption),
    Command("serve-captioner", ServeCaptionerConfig, run_serve_captioner, flow=False, writes=False),
    Command("precompute", PrecomputeConfig, run_precompute),
    Command("train", TrainConfig, run_train),
    Command("prefs", IngestPrefsConfig, run_prefs),
    Command("make-prefs", MakePrefsConfig, run_make_prefs),
    Command("merge-lora", MergeLoraConfig, run_merge_lora),
    Command("dpo", DPOConfig, run_dpo),
    Command("sample", SampleConfig, run_sample),
    Command("lora-convert", LoraConvertConfig, run_lora_convert),
    Command("export-single-file", ExportSingleFileConfig, run_export_single_file),
    Command("serve", ServeConfig, run_serve, flow=False, writes=False),
    Command("run-all", RunAllConfig, run_run_all, flow=False),
)


def command(name: str) -> Command:
    for entry in COMMANDS:
        if entry.name == name:
            return entry
    raise ValueError(f"unknown command {name!r}; commands: {', '.join(c.name for c in COMMANDS)}")


def stage_commands() -> list[Command]:
    """Every command, in pipeline order (the services and the orchestrator last)."""
    return list(COMMANDS)
