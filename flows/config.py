"""Options of the orchestration commands, `t2i serve` and `t2i run-all` (light: no torch, no Prefect).

The end_to_end form (one section per stage) is built in flows/end_to_end.py, beside the chain.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ServeConfig(BaseModel):
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
        "t2i", description="deployment name; deployments are FLOW/NAME, e.g. end_to_end/t2i"
    )
    dask_address: str | None = Field(
        None,
        description="address of a running Dask scheduler (tcp://HOST:PORT) to run tasks on; default: local threads",
    )
    limit: int | None = Field(
        None, ge=1, description="most flow runs executed at once by this process"
    )


class RunAllConfig(BaseModel):
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
    parameters: str | None = Field(
        None,
        description="JSON file of end_to_end parameters (the UI form's fields) merged over the kit's",
    )
    dask_address: str | None = Field(
        None,
        description="address of a running Dask scheduler (tcp://HOST:PORT); default: local threads",
    )
