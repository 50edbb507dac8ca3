"""The end_to_end flow: raw data -> curated -> captioned -> encoded -> trained -> DPO LoRA -> samples.

Each step is the stage's own task (`flows.stages.run_stage`), fed the previous stage's output
path; every stage's config is validated before the first one starts. Stages that are not
installed are left out of the chain (sampling then uses the latest model there is).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from pydantic import BaseModel

from flows.config import EndToEndConfig, installed_chain
from flows.stages import call_stage, describe, run_sample_shards, stage

# Where each stage writes, under the run's workdir.
FOLDERS = {
    "demo-data": "raw", "init-model": "base-model", "curate": "curated", "init-captioner": "captioner",
    "caption": "captioned", "precompute": "encoded", "train": "trained", "make-prefs": "prefs",
    "dpo": "lora", "sample": "samples",
}  # fmt: skip


def plan(config: BaseModel) -> list[tuple[str, dict[str, str], BaseModel]]:
    """(stage, arguments, validated config) for every step, paths chained; raises before any work."""
    work = Path(config.workdir).resolve()
    sections = dict((name, section) for section, name in installed_chain())
    steps: list[tuple[str, dict[str, str], BaseModel]] = []
    paths: dict[str, str] = {}

    def add(name: str, arguments: dict[str, str], chained: dict[str, Any]) -> str:
        spec = stage(name)
        section = getattr(config, sections[name]).model_dump()
        values = {
            k: v
            for k, v in chained.items()
            if k in spec.config_model.model_fields and section.get(k) is None
        }
        try:
            cfg = spec.config_model.model_validate(
                {**{k: v for k, v in section.items() if v is not None}, **values}
            )
        except Exception as error:
            raise ValueError(
                f"end_to_end: invalid parameters for stage {name!r}:\n{error}"
            ) from None
        output = str(spec.output_of(arguments, cfg))
        steps.append((name, arguments, cfg))
        paths[name] = output
        return output

    def out(name: str) -> str:
        return str(work / FOLDERS[name])

    raw = config.source or add("demo-data", {"output": out("demo-data")}, {})
    base = config.base_model or add("init-model", {"output": out("init-model")}, {})
    data = raw
    if "curate" in sections:
        data = add("curate", {"input": raw, "output": out("curate")}, {})
        if "caption" in sections:
            captioner = config.captioner
            if not captioner and "init-captioner" in sections:
                captioner = add("init-captioner", {"output": out("init-captioner")}, {})
            data = add(
                "caption",
                {"input": data, "output": out("caption")},
                {"model": captioner, "captioner": captioner},
            )
    model = base
    if "precompute" in sections and "curate" in sections:
        encoded = add("precompute", {"input": data, "output": out("precompute")}, {"model": base})
        if "train" in sections:
            model = add("train", {"encoded": encoded, "output": out("train")}, {"model": base})
    lora = None
    if "make-prefs" in sections and "dpo" in sections:
        prefs = add("make-prefs", {"output": out("make-prefs")}, {"source": raw})
        lora = add("dpo", {"prefs": prefs, "output": out("dpo")}, {"model": model})
    # With a LoRA, sampling writes base/ and lora/ images for the same seeds and a grid.
    add("sample", {}, {"model": model, "out": out("sample"), "lora": lora})
    return steps


def _signature() -> inspect.Signature:
    parameters = []
    for name, info in EndToEndConfig.model_fields.items():
        default = (
            inspect.Parameter.empty
            if info.is_required()
            else info.get_default(call_default_factory=True)
        )
        parameters.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, annotation=info.annotation, default=default
            )
        )
    return inspect.Signature(parameters, return_annotation=dict)


def end_to_end(**parameters: Any) -> dict[str, Any]:
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


end_to_end.__signature__ = _signature()
end_to_end.__annotations__ = {p.name: p.annotation for p in _signature().parameters.values()}
end_to_end.__doc__ = (
    "Run every installed stage in order, each on the previous one's output.\n\nArgs:\n"
    + "\n".join(f"    {n}: {i.description}" for n, i in EndToEndConfig.model_fields.items())
)

# The flow object takes the function's name, so the deployment's entrypoint
# (flows/end_to_end.py:end_to_end) loads the flow itself.
end_to_end = flow(
    end_to_end,
    name="end_to_end",
    description=(
        "Raw image-text data -> curate -> caption -> precompute -> train -> preference pairs -> "
        "DPO LoRA -> samples with and without the LoRA. Finished stages are skipped by manifest."
    ),
    validate_parameters=True,
    log_prints=False,  # stage libraries print freely; the run log keeps our own lines
)
