"""The end_to_end flow: curate -> caption -> precompute -> fine-tune -> DPO -> evaluation samples.

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
from pydantic import BaseModel

from flows.form import (
    CaptionConfigInChain,
    CurateInForm,
    DemoDataInForm,
    DPOConfigInChain,
    EndToEndConfig,
    InitCaptionerInForm,
    InitModelInForm,
    MakePrefsConfigInChain,
    PrecomputeConfigInChain,
    PrefsConfigInChain,
    Recipe,
    SampleConfigInChain,
    TrainConfigInChain,
)
from flows.registry import stage
from flows.stages import call_stage, describe, run_sample_shards


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
    Link("merge-lora", "fine-tuned", {}),  # no form section: its defaults (an fp32 merge)
    Link("prefs", "prefs-ingested", {}),
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
        section = getattr(self.config, link.section, None)
        section = section.model_dump() if section is not None else {}
        values = {k: v for k, v in section.items() if v is not None}
        values |= {
            k: v for k, v in chained.items() if v is not None and section.get(k) in (None, "")
        }
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
    """The recipe, as the form's `recipe` section switches it: each stage on earlier outputs.

    curate -> caption -> precompute -> fine-tune (LoRA, full or none) -> DPO on synthetic pairs
    made from the curated set or on a real preference dataset -> evaluation samples with and
    without the final LoRA. One base model feeds every stage that loads one. Raises before any
    work when the switches do not fit together."""
    recipe = config.recipe
    steps = _Recipe(config)
    fine_tune = recipe.fine_tune
    if (recipe.caption or fine_tune != "none") and not recipe.curate:
        raise ValueError(
            "end_to_end: caption and fine-tuning read a curated store; switch curate on, or "
            "set fine_tune none and caption off"
        )
    if recipe.dpo and recipe.preferences == "dataset" and not recipe.preference_data:
        raise ValueError(
            "end_to_end: preferences 'dataset' needs preference_data (a Pick-a-Pic folder, "
            "parquet files or pair folders that `t2i prefs` reads)"
        )
    raw = config.source or steps.add("demo-data")
    base = config.base_model or steps.add("init-model")
    curated = steps.add("curate", input=raw) if recipe.curate else None
    store = curated
    if recipe.caption:
        captioner = config.captioner or steps.add("init-captioner")
        store = steps.add("caption", input=curated, model=captioner)
    # what DPO starts from, and what the evaluation compares against
    model, lora = base, None
    if fine_tune != "none":
        encoded = steps.add("precompute", input=store, model=base)
        rank = config.train.lora_rank or (DEFAULT_LORA_RANK if fine_tune == "lora" else None)
        trained = steps.add("train", encoded=encoded, model=base, lora_rank=rank)
        if fine_tune == "full":
            model = trained  # DPO's reference is then the fine-tuned model, as in Diffusion-DPO
        elif recipe.dpo:  # merged, so DPO's reference (adapter off) is the fine-tuned model too
            model = steps.add("merge-lora", base=base, lora=trained)
        else:
            lora = trained  # evaluation: the base with and without the fine-tune LoRA
    if recipe.dpo:
        if recipe.preferences == "dataset":
            prefs = steps.add("prefs", source=recipe.preference_data)
            scorer = None
        else:  # synthetic pairs from the curated set: its attribute is the judge of the samples
            prefs = steps.add("make-prefs", source=curated or raw)
            scorer = f"attribute:{config.make_prefs.attribute}"
        lora = steps.add("dpo", prefs=prefs, model=model, scorer=scorer)
    if recipe.evaluate:
        steps.add("sample", model=model, lora=lora)  # base/ and lora/ images, same seeds, a grid
    return steps.steps


# ---- the form: one section per stage, its own config model ------------------------------------
# A section is the stage's config model, with the fields the chain fills (model, lora, out,
# source, and any required one) optional: empty means "the output of an earlier stage".


DEFAULT_LORA_RANK = 64  # fine_tune "lora" with no --lora-rank given in the train section


def tiny_kit(workdir: str, **top: Any) -> dict[str, Any]:
    """end_to_end parameters for the offline tiny kit (JSON-ready)."""
    parameters: dict[str, Any] = {"workdir": workdir, **top}
    parameters["recipe"] = {"fine_tune": "full"}  # the demo: DPO on a fully fine-tuned model
    for link in (link for link in CHAIN if link.section in EndToEndConfig.model_fields):
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
        "The recipe: raw image-text data -> curate -> caption -> precompute -> LoRA or full "
        "fine-tune (or none) -> Diffusion-DPO on synthetic pairs from the curated set or a real "
        "preference dataset -> evaluation samples with and without the LoRA. Each stage can be "
        "switched off in the recipe section; one base model feeds them all; finished stages "
        "skip themselves."
    ),
    validate_parameters=True,
    log_prints=False,  # stage libraries print freely; the run log keeps our own lines
)
@documented_by(EndToEndConfig)
def end_to_end(
    *,
    workdir: str,
    base_model: str = "",
    source: str = "",
    captioner: str = "",
    recipe: Recipe = Recipe(),
    demo_data: DemoDataInForm = DemoDataInForm(),
    init_model: InitModelInForm = InitModelInForm(),
    curate: CurateInForm = CurateInForm(),
    init_captioner: InitCaptionerInForm = InitCaptionerInForm(),
    caption: CaptionConfigInChain = CaptionConfigInChain(),
    precompute: PrecomputeConfigInChain = PrecomputeConfigInChain(),
    train: TrainConfigInChain = TrainConfigInChain(),
    prefs: PrefsConfigInChain = PrefsConfigInChain(),
    make_prefs: MakePrefsConfigInChain = MakePrefsConfigInChain(),
    dpo: DPOConfigInChain = DPOConfigInChain(),
    sample: SampleConfigInChain = SampleConfigInChain(),
) -> dict:
    """Run the recipe's stages in order, each on an earlier one's output."""
    parameters = {
        "workdir": workdir,
        "base_model": base_model,
        "source": source,
        "captioner": captioner,
        "recipe": recipe,
        "demo_data": demo_data,
        "init_model": init_model,
        "curate": curate,
        "init_captioner": init_captioner,
        "caption": caption,
        "precompute": precompute,
        "train": train,
        "prefs": prefs,
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
