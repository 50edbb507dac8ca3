"""`t2i serve` (every flow as a deployment for the Prefect UI) and `t2i run-all` (end_to_end here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import Flow, serve
from prefect.settings import (
    PREFECT_SERVER_ANALYTICS_ENABLED,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)

from flows.config import RunAllConfig, ServeConfig
from flows.end_to_end import EndToEndConfig, end_to_end, tiny_kit
from flows.stages import describe, stage_flows


def task_runner(dask_address: str | None):
    """Local threads by default; a running Dask cluster through prefect-dask when given."""
    if not dask_address:
        return None
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=dask_address)


def with_runner(flow: Flow, dask_address: str | None) -> Flow:
    runner = task_runner(dask_address)
    return flow.with_options(task_runner=runner) if runner is not None else flow


def end_to_end_defaults(workdir: str, kit: str, **top: Any) -> dict[str, Any]:
    if kit == "tiny":
        return tiny_kit(workdir, **top)
    return EndToEndConfig.model_validate({"workdir": workdir, **top}).model_dump(mode="json")


def deployments(config: ServeConfig) -> list:
    """One deployment per stage flow plus end_to_end, all named FLOW/config.name."""
    flows = {**stage_flows(), "end_to_end": end_to_end}
    result = []
    for name, flow in flows.items():
        parameters = None
        if name == "end_to_end":
            top = {
                "source": config.source,
                "base_model": config.base_model,
                "captioner": config.captioner,
            }
            parameters = end_to_end_defaults(str(Path(config.workdir).resolve()), config.kit, **top)
        result.append(
            with_runner(flow, config.dask_address).to_deployment(
                name=config.name, parameters=parameters, tags=["t2i"], description=flow.description
            )
        )
    return result


def run_serve(config: ServeConfig) -> None:
    serve(*deployments(config), limit=config.limit)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (
            _merge(merged[key], value)
            if isinstance(value, dict) and isinstance(merged.get(key), dict)
            else value
        )
    return merged


def run_run_all(workdir: str, config: RunAllConfig) -> Path:
    top = {"source": config.source, "base_model": config.base_model, "captioner": config.captioner}
    parameters = end_to_end_defaults(workdir, config.kit, **top)
    if config.parameters:
        path = Path(config.parameters)
        if not path.is_file():
            raise FileNotFoundError(f"--parameters {path}: no such JSON file")
        parameters = _merge(parameters, json.loads(path.read_text()))
    try:
        EndToEndConfig.model_validate(parameters)
    except Exception as error:
        raise ValueError(f"invalid end_to_end parameters:\n{error}") from None
    # Ephemeral mode starts a local API server; on 2 busy cores it can take longer than Prefect's 20 s.
    patience = {
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 120,
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
    }
    with temporary_settings(updates=patience):
        result = with_runner(end_to_end, config.dask_address)(**parameters)
    print("\nwhere each output is:")
    for stage_result in result["stages"]:
        print("  " + describe(stage_result))
    return Path(result["workdir"])
