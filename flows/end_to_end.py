"""The end_to_end flow: raw data -> curated -> captioned -> encoded -> trained -> DPO LoRA -> samples.

`CHAIN` is the only description of the chain: each stage once, in order, with the folder it
writes under the run's workdir and the offline tiny kit's options. `plan` is the recipe, read
top to bottom: each stage fed the outputs of earlier ones. Every stage's config is validated
before the first one starts; each then runs as its own task (`flows.stages.run_stage`), and a
stage whose output is already finished for the same inputs and parameters skips itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from pydantic import BaseModel, Field

from captioning.config import CaptionConfig, InitCaptionerConfig
from curate.config import CurateConfig, DemoDataConfig
from dpo.config import DPOConfig, MakePrefsConfig
from flows.stages import call_stage, describe, run_sample_shards, stage
from model.config import InitModelConfig, PrecomputeConfig, SampleConfig, TrainConfig


@dataclass(frozen=True)
class Link:
    command: str  # the `t2i` command
    folder: str  # where it writes, under the workdir
    tiny: dict[str, Any]  # the offline tiny kit's options (minutes on 2 CPU cores)

    @property
    def section(self) -> str:
        """Its section of the end_to_end form."""
        return self.command.replace("-", "_")


CHAIN = (
    Link("demo-data", "raw", {"format": "folder"}),
    Link("init-model", "base-model", {"preset": "tiny"}),
    # 31 demo images: a second curate worker process costs more than it saves
    Link("curate", "curated", {"workers": 1}),
    Link("init-captioner", "captioner", {"preset": "tiny"}),
    Link("caption", "captioned", {"max_new_tokens": 8, "batch_size": 8}),
    Link("precompute", "encoded", {"resolution": 64, "batch_size": 8}),
    Link(
        "train",
        "trained",
        {
            "max_steps": 20,
            "batch_size": 4,
            "warmup_steps": 2,
            "log_every": 2,
            "val_every": 10,
            "sample_every": 10,
            "sample_count": 2,
            "sample_steps": 4,
            "checkpoint_every": 10,
        },
    ),
    Link("make-prefs", "prefs", {"pairs_per_image": 1}),
    Link(
        "dpo",
        "lora",
        {
            "max_steps": 10,
            "batch_size": 2,
            "lora_rank": 8,
            "lora_alpha": 8.0,
            "lr": 1e-3,
            "log_every": 2,
            "checkpoint_every": 5,
        },
    ),
    Link(
        "sample",
        "samples",
        {
            "prompt": ["a photo of a red cat", "a rocket on a launch pad"],
            "seed": [0, 1],
            "steps": 4,
        },
    ),
)
LINKS = {link.command: link for link in CHAIN}


Step = tuple[str, dict[str, str], BaseModel]  # (command, positional arguments, validated config)


class _Recipe:
    """Collects validated steps; `add` returns where the step writes."""

    def __init__(self, config: BaseModel) -> None:
        self.config = config
        self.work = Path(config.workdir).resolve()
        self.steps: list[Step] = []

    def add(self, name: str, **chained: str | None) -> str:
        spec, link = stage(name), LINKS[name]
        folder = str(self.work / link.folder)
        arguments = {p: chained.pop(p) for p in spec.positionals if p in chained}
        arguments |= {p: folder for p in spec.positionals if p in ("output", "out")}
        section = getattr(self.config, link.section).model_dump()
        values = {k: v for k, v in section.items() if v is not None}
        values |= {k: v for k, v in chained.items() if section.get(k) is None}
        if "out" in spec.config_model.model_fields and section.get("out") is None:
            values["out"] = folder
        try:
            config = spec.config_model.model_validate(values)
        except Exception as error:
            raise ValueError(
                f"end_to_end: invalid parameters for stage {name!r}:\n{error}"
            ) from None
        self.steps.append((name, arguments, config))
        return str(spec.output_of(arguments, config))


def plan(config: BaseModel) -> list[Step]:
    """The recipe: every stage once, each on earlier outputs; raises before any work."""
    recipe = _Recipe(config)
    raw = config.source or recipe.add("demo-data")
    base = config.base_model or recipe.add("init-model")
    curated = recipe.add("curate", input=raw)
    captioner = config.captioner or recipe.add("init-captioner")
    captioned = recipe.add("caption", input=curated, model=captioner)
    encoded = recipe.add("precompute", input=captioned, model=base)
    trained = recipe.add("train", encoded=encoded, model=base)
    prefs = recipe.add("make-prefs", source=raw)
    lora = recipe.add("dpo", prefs=prefs, model=trained)
    recipe.add("sample", model=trained, lora=lora)  # base/ and lora/ images, same seeds, a grid
    return recipe.steps


# ---- the form: one section per stage, its own config model ------------------------------------
# A section is the stage's config model, with the fields the chain fills (model, lora, out,
# source, and any required one) optional: empty means "the output of an earlier stage".


def chained(model: type[BaseModel], name: str) -> Any:
    """A field of `model` the chain fills from an earlier stage when the form leaves it empty."""
    description = model.model_fields[name].description or name
    return Field(None, description=f"{description} (empty: set by the chain)")


class CaptionConfigInChain(CaptionConfig):
    model: str | None = chained(CaptionConfig, "model")


class PrecomputeConfigInChain(PrecomputeConfig):
    model: str | None = chained(PrecomputeConfig, "model")


class TrainConfigInChain(TrainConfig):
    model: str | None = chained(TrainConfig, "model")


class MakePrefsConfigInChain(MakePrefsConfig):
    source: str | None = chained(MakePrefsConfig, "source")


class DPOConfigInChain(DPOConfig):
    model: str | None = chained(DPOConfig, "model")


class SampleConfigInChain(SampleConfig):
    model: str | None = chained(SampleConfig, "model")
    out: str | None = chained(SampleConfig, "out")
    lora: str | None = chained(SampleConfig, "lora")


def section(model: type[BaseModel]) -> Any:
    """A stage's section of the form: its defaults, described by the stage's summary."""
    return Field(default_factory=model, description=model.summary)


class EndToEndConfig(BaseModel):
    workdir: str = Field(..., description="working directory; each stage writes a subfolder of it")
    source: str = Field(
        "",
        description="raw image-text collection (folder, webdataset tars, parquet); empty: write the demo collection",
    )
    base_model: str = Field(
        "",
        description="local SD3 diffusers folder to start from; empty: write a random-weight tiny one",
    )
    captioner: str = Field(
        "",
        description="local image-text-to-text model folder; empty: write a random-weight tiny VLM",
    )
    demo_data: DemoDataConfig = section(DemoDataConfig)
    init_model: InitModelConfig = section(InitModelConfig)
    curate: CurateConfig = section(CurateConfig)
    init_captioner: InitCaptionerConfig = section(InitCaptionerConfig)
    caption: CaptionConfigInChain = section(CaptionConfigInChain)
    precompute: PrecomputeConfigInChain = section(PrecomputeConfigInChain)
    train: TrainConfigInChain = section(TrainConfigInChain)
    make_prefs: MakePrefsConfigInChain = section(MakePrefsConfigInChain)
    dpo: DPOConfigInChain = section(DPOConfigInChain)
    sample: SampleConfigInChain = section(SampleConfigInChain)


def tiny_kit(workdir: str, **top: Any) -> dict[str, Any]:
    """end_to_end parameters for the offline tiny kit (JSON-ready)."""
    parameters: dict[str, Any] = {"workdir": workdir, **top}
    for link in CHAIN:
        model = EndToEndConfig.model_fields[link.section].annotation
        parameters[link.section] = model(**link.tiny).model_dump(mode="json")
    return EndToEndConfig.model_validate(parameters).model_dump(mode="json")


# ---- the flow ---------------------------------------------------------------------------------


def documented_by(model: type[BaseModel]):
    """Give a flow function an Args section from `model`'s field descriptions (the form's help)."""

    def document(function):
        args = "\n".join(f"    {n}: {i.description}" for n, i in model.model_fields.items())
        function.__doc__ = f"{function.__doc__.strip()}\n\nArgs:\n{args}"
        return function

    return document


# The flow object takes the function's name, so the deployment's entrypoint
# (flows/end_to_end.py:end_to_end) loads the flow itself.
@flow(
    name="end_to_end",
    description=(
        "Raw image-text data -> curate -> caption -> precompute -> train -> preference pairs -> "
        "DPO LoRA -> samples with and without the LoRA. Finished stages skip themselves."
    ),
    validate_parameters=True,
    log_prints=False,  # stage libraries print freely; the run log keeps our own lines
)
@documented_by(EndToEndConfig)
def end_to_end(
    *,
    workdir: str,
    source: str = "",
    base_model: str = "",
    captioner: str = "",
    demo_data: DemoDataConfig = DemoDataConfig(),
    init_model: InitModelConfig = InitModelConfig(),
    curate: CurateConfig = CurateConfig(),
    init_captioner: InitCaptionerConfig = InitCaptionerConfig(),
    caption: CaptionConfigInChain = CaptionConfigInChain(),
    precompute: PrecomputeConfigInChain = PrecomputeConfigInChain(),
    train: TrainConfigInChain = TrainConfigInChain(),
    make_prefs: MakePrefsConfigInChain = MakePrefsConfigInChain(),
    dpo: DPOConfigInChain = DPOConfigInChain(),
    sample: SampleConfigInChain = SampleConfigInChain(),
) -> dict:
    """Run every stage in order, each on the previous one's output."""
    parameters = {
        "workdir": workdir,
        "source": source,
        "base_model": base_model,
        "captioner": captioner,
        "demo_data": demo_data,
        "init_model": init_model,
        "curate": curate,
        "init_captioner": init_captioner,
        "caption": caption,
        "precompute": precompute,
        "train": train,
        "make_prefs": make_prefs,
        "dpo": dpo,
        "sample": sample,
    }
    config = EndToEndConfig.model_validate(
        {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in parameters.items()}
    )
    steps = plan(config)
    progress = create_progress_artifact(
        0.0, key="end-to-end-progress", description="end_to_end: starting"
    )
    results: list[dict[str, Any]] = []
    for index, (name, arguments, cfg) in enumerate(steps):
        if name == "sample":
            result = run_sample_shards(arguments, cfg)
        else:
            result = call_stage(name, arguments, cfg.model_dump(mode="json"), label=name)
        results.append(result)
        get_run_logger().info(describe(result))
        update_progress_artifact(
            progress,
            100.0 * (index + 1) / len(steps),
            description=f"end_to_end: {name} done ({index + 1}/{len(steps)})",
        )
    lines = [
        "# end_to_end outputs",
        "",
        "| stage | output | counts | skipped |",
        "| --- | --- | --- | --- |",
    ]
    for r in results:
        counts = ", ".join(f"{k} {v}" for k, v in r.get("counts", {}).items())
        lines.append(
            f"| {r['stage']} | `{r['output']}` | {counts} | {'yes' if r.get('skipped') else 'no'} |"
        )
    create_markdown_artifact(
        "\n".join(lines), key="end-to-end-outputs", description="where each stage wrote"
    )
    return {"workdir": str(Path(config.workdir).resolve()), "stages": results}
