"""Every stage as a Prefect task and a Prefect flow.

Each stage (runner, config model, positional inputs) is a `t2i` subcommand (flows/commands.py)
and, here, a flow whose parameters are the positionals plus the stage's pydantic
config model, so the Prefect UI renders the same form the CLI exposes as flags. Prefect
validates the parameters against the model before the flow starts, so an invalid value fails
with pydantic's message and no work done. Each stage skips itself when its output is finished
(curate/runtime/stage_runtime.py); a task whose stage skipped ends in state Skipped.

Tasks pass paths and small manifest summaries between each other, never tensors or tables:
Prefect keeps task results in memory for the whole flow run.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import Flow, flow, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State
from pydantic import BaseModel

from captioning.config import CaptionConfig, InitCaptionerConfig
from curate.config import CurateConfig, DemoDataConfig
from curate.runtime.store import Manifest, fingerprint
from dpo.config import DPOConfig, IngestPrefsConfig, MakePrefsConfig
from flows import artifacts
from flows.progress import tqdm_progress
from flows.registry import stage
from model.config import (
    InitModelConfig,
    PrecomputeConfig,
    SampleConfig,
    TrainConfig,
)
from model.interop_config import ExportSingleFileConfig, LoraConvertConfig, MergeLoraConfig

# Stage code is not thread-safe: diffusers loads models under a process-global meta-device
# context. Under the local thread runner a process runs one stage call at a time; Dask workers
# are separate processes and run mapped shards in parallel.
_STAGE_LOCK = threading.Lock()


# ---- the one task every stage runs through ------------------------------------------------


TRANSIENT_ERRNOS = {4, 5, 11, 16, 24, 28, 70, 110, 111, 112, 113, 116}  # EINTR EIO EAGAIN EBUSY ...


def is_transient(error: BaseException) -> bool:
    """I/O errors worth retrying (a busy or flaky disk or share); bad input never is."""
    if isinstance(
        error, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
    ):
        return False
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    return isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS


def _retry_on_transient_io(task, task_run, state) -> bool:
    try:
        state.result()
    except BaseException as error:  # the task's own exception, re-raised by result()
        return is_transient(error)
    return False


def summary(stage_name: str, output: Path, skipped: bool) -> dict[str, Any]:
    """What a stage task hands the next one: where its output is, and its manifest's counts."""
    manifest = Manifest.read(output) if output.is_dir() else None
    return {
        "stage": stage_name,
        "output": str(output),
        "skipped": skipped,
        "counts": manifest.counts if manifest else {},
        "wall_time_s": manifest.wall_time_s if manifest else None,
        "worker": f"{socket.gethostname()}:{os.getpid()}",
    }


def _run_stage(
    stage_name: str, arguments: dict[str, str], config: dict[str, Any], label: str
) -> dict[str, Any]:
    """Run one stage (it skips itself when its output is finished), then publish its artifacts."""
    spec = stage(stage_name)
    cfg = spec.config_model.model_validate(config)
    output = spec.output_of(arguments, cfg)
    before = fingerprint(output) if output.exists() else None
    inputs = [arguments[name] for name in spec.inputs]
    with _STAGE_LOCK, tqdm_progress(label):
        written = Path(spec.run(*inputs, str(output), on_flow_cluster(cfg)) or output)
    skipped = before is not None and before == fingerprint(written)  # the stage skipped itself
    artifacts.publish_stage(label, written)
    result = summary(stage_name, written, skipped=skipped)
    if skipped:
        return Completed(
            message=f"{stage_name}: {written} is already finished", name="Skipped", data=result
        )
    return result


def on_flow_cluster(config: BaseModel) -> BaseModel:
    """A sharded stage's config pointed at the flow's Dask cluster, when the flow runs on one
    and the config names no executor itself: its shards then fan out across that cluster."""
    from prefect.context import FlowRunContext

    if (
        "dask_address" not in type(config).model_fields
        or config.dask_address
        or config.dask_workers
    ):
        return config
    runner = getattr(FlowRunContext.get(), "task_runner", None)
    if type(runner).__name__ != "DaskTaskRunner":
        return config
    return config.model_copy(update={"dask_address": runner.client.scheduler.address})


def run_sample_shards(
    arguments: dict[str, str], config: BaseModel, label: str = ""
) -> dict[str, Any]:
    """Sampling mapped over seeds, one task per seed writing OUT/seed-N, on the flow's task runner."""
    label = label or "sample"
    seeds = list(getattr(config, "seed", []) or [])
    if len(seeds) <= 1:
        return call_stage("sample", arguments, config.model_dump(mode="json"), label=label)
    out = Path(config.out)
    shards = [
        config.model_copy(update={"seed": [s], "out": str(out / f"seed-{s}")}).model_dump(
            mode="json"
        )
        for s in seeds
    ]
    futures = run_stage.map(
        unmapped("sample"), unmapped(arguments), shards, [f"{label}-seed-{s}" for s in seeds]
    )
    results = [_unwrap(r) for r in futures.result()]
    images = sorted(p for p in out.rglob("*.png"))
    artifacts.publish_gallery(label, out, images)
    return {
        "stage": label,
        "output": str(out),
        "skipped": all(r["skipped"] for r in results),
        "counts": {"images": len(images), "shards": len(shards)},
        "wall_time_s": None,
        "worker": ", ".join(sorted({r["worker"] for r in results})),
    }


run_stage = task(
    task_run_name="{label}",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=_retry_on_transient_io,
    cache_policy=NO_CACHE,
)(_run_stage)
"""The task every stage runs through (module-level function, so Dask workers import it)."""


def call_stage(
    stage_name: str, arguments: dict[str, str], config: dict[str, Any], label: str
) -> dict[str, Any]:
    """run_stage's summary, also when the task finished as Skipped (a state carrying it)."""
    return _unwrap(run_stage(stage_name, arguments, config, label=label))


def _unwrap(value: Any) -> Any:
    return value.result() if isinstance(value, State) else value


# ---- one flow per stage ---------------------------------------------------------------------
# Each flow is a module attribute named like its function (curate_flow, train_flow, ...), so a
# deployment's entrypoint (flows/stages.py:curate_flow) loads the flow itself. Its parameters
# are the stage's positionals plus its config model: the Prefect form is the CLI's flags.


def stage_flow_of(name: str) -> Callable[[Callable[..., dict[str, Any]]], Flow]:
    """Make a function the Prefect flow of stage `name`: named for its command, its --help text
    as the flow's description, its positionals' help as the form's parameter descriptions."""
    spec = stage(name)

    def make(function: Callable[..., dict[str, Any]]) -> Flow:
        args = "\n".join(f"    {arg}: {help}" for arg, help in spec.config_model.positionals)
        function.__doc__ = f"{spec.summary}\n\nArgs:\n{args}\n    config: options of `t2i {name}`\n"
        return flow(
            function,
            name=name,
            description=spec.description,
            validate_parameters=True,
            log_prints=False,
        )

    return make


def run_flow_stage(
    name: str, arguments: dict[str, Any], config: BaseModel | None
) -> dict[str, Any]:
    """A stage flow's body: its config validated, then the stage run as one task."""
    config = stage(name).config_model.model_validate(config if config is not None else {})
    arguments = {key: str(value) for key, value in arguments.items()}
    return call_stage(name, arguments, config.model_dump(mode="json"), label=name)


@stage_flow_of("demo-data")
def demo_data_flow(*, output: str, config: DemoDataConfig = DemoDataConfig()) -> dict:
    return run_flow_stage("demo-data", {"output": output}, config)


@stage_flow_of("init-model")
def init_model_flow(*, output: str, config: InitModelConfig = InitModelConfig()) -> dict:
    return run_flow_stage("init-model", {"output": output}, config)


@stage_flow_of("curate")
def curate_flow(*, input: str, output: str, config: CurateConfig = CurateConfig()) -> dict:
    return run_flow_stage("curate", {"input": input, "output": output}, config)


@stage_flow_of("init-captioner")
def init_captioner_flow(
    *, output: str, config: InitCaptionerConfig = InitCaptionerConfig()
) -> dict:
    return run_flow_stage("init-captioner", {"output": output}, config)


@stage_flow_of("caption")
def caption_flow(*, input: str, output: str, config: CaptionConfig) -> dict:
    return run_flow_stage("caption", {"input": input, "output": output}, config)


@stage_flow_of("precompute")
def precompute_flow(*, input: str, output: str, config: PrecomputeConfig) -> dict:
    return run_flow_stage("precompute", {"input": input, "output": output}, config)


@stage_flow_of("train")
def train_flow(*, encoded: str, output: str, config: TrainConfig) -> dict:
    return run_flow_stage("train", {"encoded": encoded, "output": output}, config)


@stage_flow_of("prefs")
def prefs_flow(
    *, source: str, output: str, config: IngestPrefsConfig = IngestPrefsConfig()
) -> dict:
    return run_flow_stage("prefs", {"source": source, "output": output}, config)


@stage_flow_of("make-prefs")
def make_prefs_flow(*, output: str, config: MakePrefsConfig) -> dict:
    return run_flow_stage("make-prefs", {"output": output}, config)


@stage_flow_of("merge-lora")
def merge_lora_flow(
    *, base: str, lora: str, output: str, config: MergeLoraConfig = MergeLoraConfig()
) -> dict:
    return run_flow_stage("merge-lora", {"base": base, "lora": lora, "output": output}, config)


@stage_flow_of("dpo")
def dpo_flow(*, prefs: str, output: str, config: DPOConfig) -> dict:
    return run_flow_stage("dpo", {"prefs": prefs, "output": output}, config)


@stage_flow_of("sample")
def sample_flow(*, config: SampleConfig) -> dict:
    # its output is the --out option; several seeds fan out as one task per seed
    return run_sample_shards({}, SampleConfig.model_validate(config))


@stage_flow_of("lora-convert")
def lora_convert_flow(*, input: str, output: str, config: LoraConvertConfig) -> dict:
    return run_flow_stage("lora-convert", {"input": input, "output": output}, config)


@stage_flow_of("export-single-file")
def export_single_file_flow(
    *, model: str, output: str, config: ExportSingleFileConfig = ExportSingleFileConfig()
) -> dict:
    return run_flow_stage("export-single-file", {"model": model, "output": output}, config)


STAGE_FLOWS: dict[str, Flow] = {
    "demo-data": demo_data_flow,
    "init-model": init_model_flow,
    "curate": curate_flow,
    "init-captioner": init_captioner_flow,
    "caption": caption_flow,
    "precompute": precompute_flow,
    "train": train_flow,
    "prefs": prefs_flow,
    "make-prefs": make_prefs_flow,
    "merge-lora": merge_lora_flow,
    "dpo": dpo_flow,
    "sample": sample_flow,
    "lora-convert": lora_convert_flow,
    "export-single-file": export_single_file_flow,
}


def stage_flow(name: str) -> Flow:
    """The Prefect flow of one stage, named after its command (`curate`, `train`, ...)."""
    stage(name)  # an unknown name is a one-line error naming the stages
    return STAGE_FLOWS[name]


def stage_flows() -> dict[str, Flow]:
    return dict(STAGE_FLOWS)


def describe(result: dict[str, Any]) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in result.get("counts", {}).items())
    note = " (skipped: already finished)" if result.get("skipped") else ""
    return f"{result['stage']}: {result['output']}" + (f" ({counts})" if counts else "") + note


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)
