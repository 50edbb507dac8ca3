"""Options of the orchestration commands, `t2i serve` and `t2i run-all` (light: no torch, no Prefect).

The end_to_end form (one section per stage) is built in flows/end_to_end.py, beside the chain.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, Field


class ServeConfig(BaseModel):
    # `t2i serve`: its one-line summary, its --help text and its positional arguments
    summary: ClassVar[str] = (
        "serve every stage flow and end_to_end as deployments for the Prefect UI"
    )
    description: ClassVar[str] = (
        "Registers one deployment per stage flow (demo-data, init-model, curate, caption, "
        "precompute, train, make-prefs, dpo, sample, ...) and end_to_end, all named FLOW/NAME, "
        "with the Prefect API configured in this shell (PREFECT_API_URL, or the active "
        "profile), and runs the flow runs people trigger from the UI until interrupted. Start a "
        "server first: `prefect server start --host 127.0.0.1`, then "
        "`PREFECT_API_URL=http://127.0.0.1:4200/api t2i serve`."
    )
    positionals: ClassVar[tuple[tuple[str, str], ...]] = ()

    workdir: str = Field(
        "t2i-runs",
        description="default working directory of end_to_end runs (a form field; each run may change it)",
    )
    kit: Literal["tiny", "stage-defaults"] = Field(
        "tiny",
        description="defaults of the end_to_end form: 'tiny' = the offline tiny kit (minutes on CPU); 'stage-defaults' = every stage's own defaults",
    )
    source: str = Field(
        "", description="default raw collection of the end_to_end form; empty: the demo collection"
    )
    base_model: str = Field(
        "", description="default SD3 folder of the end_to_end form; empty: a random-weight tiny one"
    )
    captioner: str = Field(
        "", description="default VLM folder of the end_to_end form; empty: a random-weight tiny one"
    )
    name: str = Field(
        "t2i",
        description="tag of every deployment; deployments are titled by what they do (flows/serve.py "
        "TITLES), with ' - NAME' appended when NAME is not t2i (several servers side by side)",
    )
    dask_address: str | None = Field(
        None,
        description="address of a running Dask scheduler (tcp://HOST:PORT) to run tasks on; default: local threads",
    )
    limit: int | None = Field(
        None, ge=1, description="most flow runs executed at once by this process"
    )


class RunAllConfig(BaseModel):
    # `t2i run-all`: its one-line summary, its --help text and its positional arguments
    summary: ClassVar[str] = (
        "run the end_to_end flow here (Prefect's ephemeral mode when no server is configured)"
    )
    description: ClassVar[str] = (
        "Runs end_to_end in this process: demo data (or SOURCE) -> curate -> caption -> "
        "precompute -> LoRA or full fine-tune (--fine-tune) -> DPO LoRA on synthetic pairs from "
        "the curated set or on a preference dataset (--preferences dataset --preference-data "
        "DIR) -> samples with and without the LoRA, each stage in a subfolder of WORKDIR "
        "(--skip switches stages off); stages already finished there with the same inputs and "
        "parameters are skipped. Prints where each output is."
    )
    positionals: ClassVar[tuple[tuple[str, str], ...]] = (
        ("workdir", "working directory; each stage writes a subfolder"),
    )

    kit: Literal["tiny", "stage-defaults"] = Field(
        "tiny",
        description="'tiny' = the offline tiny kit (minutes on CPU); 'stage-defaults' = every stage's own defaults",
    )
    source: str = Field(
        "", description="raw image-text collection; empty: write the demo collection"
    )
    base_model: str = Field(
        "",
        description="local SD3 diffusers folder to start from; empty: write a random-weight tiny one",
    )
    captioner: str = Field(
        "",
        description="local image-text-to-text model folder; empty: write a random-weight tiny VLM",
    )
    fine_tune: Literal["kit", "none", "lora", "full"] = Field(
        "kit",
        description="before DPO: a LoRA, a full fine-tune or none; kit = the kit's choice (tiny: "
        "full, stage-defaults: lora)",
    )
    preferences: Literal["synthetic", "dataset"] = Field(
        "synthetic",
        description="DPO's pairs: synthetic (tinted copies of the curated images) or a preference "
        "dataset (--preference-data)",
    )
    preference_data: str = Field(
        "",
        description="a Pick-a-Pic v2 folder, parquet files or pair folders (`t2i prefs` reads it)",
    )
    skip: list[Literal["curate", "caption", "dpo", "evaluate"]] = Field(
        default_factory=list, description="stages to switch off"
    )
    parameters: str | None = Field(
        None,
        description="JSON file of end_to_end parameters (the UI form's fields) merged over the kit's",
    )
    dask_address: str | None = Field(
        None,
        description="address of a running Dask scheduler (tcp://HOST:PORT); default: local threads",
    )
