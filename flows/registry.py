"""Every stage the orchestrator runs, by command name: its config model and its runner (services and the orchestrator itself are `t2i` commands, not stages: flows/commands.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from captioning.config import CaptionConfig, InitCaptionerConfig
from captioning.stage import run_caption
from captioning.tiny import run_init_captioner
from curate.config import CurateConfig, DemoDataConfig
from curate.demo_data import run_demo_data
from curate.stage import run_curate
from dpo.config import DPOConfig, IngestPrefsConfig, MakePrefsConfig
from dpo.ingest import run_prefs
from dpo.synthetic import run_make_prefs
from dpo.trainer import run_dpo
from model.build import run_init_model
from model.config import (
    InitModelConfig,
    PrecomputeConfig,
    SampleConfig,
    TrainConfig,
)
from model.interop_config import ExportSingleFileConfig, LoraConvertConfig, MergeLoraConfig
from model.lora_formats import run_lora_convert
from model.merge_lora import run_merge_lora
from model.precompute import run_precompute
from model.sampling import run_sample
from model.single_file import run_export_single_file
from model.train import run_train

OUTPUT_NAMES = ("output", "out")


@dataclass(frozen=True)
class Stage:
    """A stage seen by the orchestrator: what it reads, what it writes, how to run it."""

    name: str  # the `t2i` command
    config_model: type[BaseModel]
    run: Callable[..., Path]  # run(*inputs, output, config)

    @property
    def summary(self) -> str:
        return self.config_model.summary

    @property
    def description(self) -> str:
        return self.config_model.description

    @property
    def positionals(self) -> list[str]:
        return [name for name, _ in self.config_model.positionals]

    @property
    def inputs(self) -> list[str]:
        return [name for name in self.positionals if name not in OUTPUT_NAMES]

    def output_of(self, arguments: dict[str, str], config: BaseModel) -> Path:
        for name in OUTPUT_NAMES:
            if name in arguments:
                return Path(arguments[name])
        return Path(config.out)


# Every stage the orchestrator runs, in pipeline order (services and the orchestrator itself
# are `t2i` commands, not stages: flows/commands.py).
STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("demo-data", DemoDataConfig, run_demo_data),
        Stage("init-model", InitModelConfig, run_init_model),
        Stage("curate", CurateConfig, run_curate),
        Stage("init-captioner", InitCaptionerConfig, run_init_captioner),
        Stage("caption", CaptionConfig, run_caption),
        Stage("precompute", PrecomputeConfig, run_precompute),
        Stage("train", TrainConfig, run_train),
        Stage("prefs", IngestPrefsConfig, run_prefs),
        Stage("make-prefs", MakePrefsConfig, run_make_prefs),
        Stage("merge-lora", MergeLoraConfig, run_merge_lora),
        Stage("dpo", DPOConfig, run_dpo),
        Stage("sample", SampleConfig, run_sample),
        Stage("lora-convert", LoraConvertConfig, run_lora_convert),
        Stage("export-single-file", ExportSingleFileConfig, run_export_single_file),
    )
}


def stages() -> dict[str, Stage]:
    """The stages (not the services or the orchestrator), by command name."""
    return dict(STAGES)


def stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[name]
