"""Options of the curation package's commands (the CLI, Prefect forms and manifests share them)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class DemoDataConfig(BaseModel):
    format: Literal["folder", "webdataset", "parquet", "all"] = Field(
        "folder", description="layout to write; 'all' writes each layout into a subfolder"
    )
    shard_size: int = Field(10, ge=1, description="samples per webdataset tar shard")
