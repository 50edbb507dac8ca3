"""`t2i serve` (every flow as a deployment for the Prefect UI) and `t2i run-all` (end_to_end here)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from pathlib import Path
from typing import Any

from prefect import Flow
from prefect.runner import Runner
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_ANALYTICS_ENABLED,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)

from flows.config import RunAllConfig, ServeConfig
from flows.end_to_end import EndToEndConfig, end_to_end, plan, tiny_kit
from flows.signals import first_signal, interruption, note_signal
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


# Deployment names say what each one does. The Prefect UI lists deployments by name, ten to a
# page: the numbers put the recipe first and the stages in pipeline order after it.
TITLES = {
    "end_to_end": "00 full recipe - curate caption fine-tune DPO evaluate",
    "demo-data": "01 write the demo collection",
    "curate": "02 curate a collection",
    "caption": "03 recaption with a VLM",
    "precompute": "04 pre-encode latents and text",
    "train": "05 fine-tune - full or LoRA",
    "prefs": "06 ingest preference pairs",
    "make-prefs": "07 make synthetic preference pairs",
    "dpo": "08 align with Diffusion-DPO",
    "sample": "09 generate samples",
    "lora-convert": "10 convert a LoRA",
    "export-single-file": "11 export a single-file checkpoint",
    "init-model": "12 random tiny SD3 model",
    "init-captioner": "13 random tiny captioner",
    "merge-lora": "14 merge a LoRA into its base model",
}


def title(flow_name: str, name: str = "t2i") -> str:
    """The deployment's name: what it does, plus NAME when it is not the default."""
    return TITLES.get(flow_name, flow_name) + ("" if name == "t2i" else f" - {name}")


def without_none(parameters: dict[str, Any]) -> dict[str, Any]:
    """PARAMETERS without the fields left at None, at any depth: the end_to_end form shows
    optional fields with their own type and no null branch, and the server checks a
    deployment's parameters against that schema (an absent field takes its default)."""
    return {
        key: without_none(value) if isinstance(value, dict) else value
        for key, value in parameters.items()
        if value is not None
    }


def deployments(config: ServeConfig) -> list:
    """One deployment per stage flow plus end_to_end, titled by what it does (`TITLES`), tagged
    with config.name."""
    flows = {"end_to_end": end_to_end, **stage_flows()}
    result = []
    for name, flow in flows.items():
        parameters = None
        if name == "end_to_end":
            top = {
                "source": config.source,
                "base_model": config.base_model,
                "captioner": config.captioner,
            }
            parameters = without_none(
                end_to_end_defaults(str(Path(config.workdir).resolve()), config.kit, **top)
            )
        result.append(
            with_runner(flow, config.dask_address).to_deployment(
                name=title(name, config.name),
                parameters=parameters,
                tags=sorted({"t2i", config.name}),
                description=flow.description,
            )
        )
    return result


def run_serve(config: ServeConfig) -> None:
    """Prefect's `serve`, with SIGTERM stopping the runner the way Ctrl-C does.

    Prefect's runner installs its own SIGTERM handler, which exits from inside the event loop
    (a traceback and status 0). Here SIGTERM raises like Ctrl-C: the runner pauses its
    deployments and stops its flow-run processes, and `t2i` stops anything left."""
    runner = StoppingRunner(limit=config.limit)
    served = deployments(config)
    for deployment in served:
        runner.add_deployment(deployment)
    names = ", ".join(f"{d.flow_name}/{d.name}" for d in served)
    where = PREFECT_API_URL.value() or "the active Prefect profile"
    print(f"serving {len(served)} deployments ({names}) at {where}; Ctrl-C stops", flush=True)
    asyncio.run(runner.serve_until_signalled())
    if first_signal() is not None:  # stopped by a signal: `t2i` reports it and stops the rest
        raise interruption(first_signal())


class StoppingRunner(Runner):
    """Prefect's runner, stopped by SIGINT or SIGTERM through its own `astop`: it cancels the flow
    runs in progress (their processes end, their state says Cancelled) and returns from `start`.

    Prefect's own SIGTERM handler exits from inside the event loop (a traceback, status 0), and a
    KeyboardInterrupt raised in the loop tears tasks down mid-call; both are replaced here."""

    async def serve_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, self._stop_soon, signal.SIGINT, loop)
        await self.start()

    def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:  # installed by start()
        self._stop_soon(signal.SIGTERM, asyncio.get_event_loop())

    def _stop_soon(self, signum: int, loop: asyncio.AbstractEventLoop) -> None:
        repeated = first_signal() is not None
        note_signal(signum)
        if not repeated:
            loop.call_soon_threadsafe(lambda: loop.create_task(self._stop()))

    async def _stop(self) -> None:
        for _ in range(100):  # a signal during start-up: stop once it has started
            if self.started:
                break
            await asyncio.sleep(0.1)
        with contextlib.suppress(RuntimeError):  # never started: nothing to stop
            await self.astop()


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """BASE with OVERRIDE's values, nested dictionaries merged key by key (neither is modified)."""
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (
            deep_merge(merged[key], value)
            if isinstance(value, dict) and isinstance(merged.get(key), dict)
            else value
        )
    return merged


def run_run_all(workdir: str, config: RunAllConfig) -> Path:
    top = {"source": config.source, "base_model": config.base_model, "captioner": config.captioner}
    parameters = end_to_end_defaults(workdir, config.kit, **top)
    recipe = {name: False for name in config.skip}
    recipe |= {"preferences": config.preferences, "preference_data": config.preference_data}
    if config.fine_tune != "kit":
        recipe["fine_tune"] = config.fine_tune
    parameters = deep_merge(parameters, {"recipe": recipe})
    if config.parameters:
        path = Path(config.parameters)
        if not path.is_file():
            raise FileNotFoundError(f"--parameters {path}: no such JSON file")
        parameters = deep_merge(parameters, json.loads(path.read_text()))
    try:
        checked = EndToEndConfig.model_validate(parameters)
    except Exception as error:
        raise ValueError(f"invalid end_to_end parameters:\n{error}") from None
    plan(checked)  # switches that do not fit together fail here, before Prefect starts
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
