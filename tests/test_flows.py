"""Prefect flows under prefect_test_harness: stage flows, validation, skip records, artifacts, Dask."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.testing.utilities import prefect_test_harness

from flows.end_to_end import CHAIN, EndToEndConfig, end_to_end, plan, tiny_kit
from flows.stages import is_transient, run_stage, stage_flow, stages


@pytest.fixture(scope="module", autouse=True)
def harness():
    with prefect_test_harness(server_startup_timeout=180):
        yield


def artifact(key: str):
    """The latest artifact with this key, read back from the API the UI reads."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert found, f"no artifact with key {key!r}"
    return found[-1]


def test_every_installed_stage_has_a_flow_whose_form_is_its_config_model():
    for name, spec in stages().items():
        schema = stage_flow(name).parameters.model_dump()
        assert set(schema["properties"]) == set(spec.positionals) | {"config"}
        definitions = schema.get("definitions", {})
        assert spec.config_model.__name__ in definitions, name
        fields = definitions[spec.config_model.__name__]["properties"]
        assert set(fields) == set(spec.config_model.model_fields)
        assert all(field.get("description") for field in fields.values()), (
            f"{name}: undocumented option"
        )


def test_invalid_stage_parameters_fail_before_any_work(tmp_path):
    output = tmp_path / "raw"
    with pytest.raises(Exception, match="format"):
        stage_flow("demo-data")(output=str(output), config={"format": "zip"})
    assert not output.exists()


def test_invalid_end_to_end_parameters_fail_before_the_first_stage(tmp_path):
    parameters = tiny_kit(str(tmp_path / "run"))
    parameters["sample"]["steps"] = 0  # SampleConfig: steps >= 1
    with pytest.raises(ValueError, match="steps"):
        plan(EndToEndConfig.model_validate(parameters))
    with pytest.raises(Exception, match="steps"):
        end_to_end(**parameters)
    assert not (tmp_path / "run").exists()


def test_stage_flow_runs_the_stage_then_skips_it_until_an_input_changes(tmp_path, tiny_model_dir):
    flow = stage_flow("demo-data")
    first = flow(output=str(tmp_path / "raw"), config={"format": "folder"})
    second = flow(output=str(tmp_path / "raw"), config={"format": "folder"})
    assert (first["skipped"], second["skipped"]) == (False, True)
    assert second["output"] == str(tmp_path / "raw")
    assert "demo-data" in artifact("demo-data-report").data

    sample = stage_flow("sample")
    config = {"model": tiny_model_dir, "prompt": ["a red cat", "a blue dog"], "seed": [3], "steps": 2,
              "out": str(tmp_path / "samples")}  # fmt: skip
    assert sample(config=config)["skipped"] is False
    assert sample(config=config)["skipped"] is True
    os.utime(Path(tiny_model_dir) / "model_index.json")  # the model changed: sample again
    assert sample(config=config)["skipped"] is False
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2
    progress = artifact("sample-progress")  # fed by the stage's own tqdm bar over prompts
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert "data:image/jpeg;base64," in artifact("sample-report").data


def test_end_to_end_plan_chains_each_stage_on_earlier_outputs_only(tmp_path):
    steps = plan(EndToEndConfig.model_validate(tiny_kit(str(tmp_path.resolve()))))
    names = [name for name, _, _ in steps]
    assert names == [link.command for link in CHAIN]  # each stage once, in the chain's order
    written: list[str] = []
    for name, arguments, config in steps:
        read = [v for k, v in arguments.items() if k not in ("output", "out")]
        read += [
            getattr(config, f) for f in ("model", "lora", "source") if getattr(config, f, None)
        ]
        assert set(read) <= set(written), f"{name} reads {read}, not all written before it"
        written.append(arguments.get("output") or config.out)
    assert steps[-1][2].model == written[names.index("train")]
    assert steps[-1][2].lora == written[names.index("dpo")]  # samples with and without the LoRA


def test_sample_flow_maps_seed_shards_over_a_local_dask_cluster(tmp_path, tiny_model_dir):
    from distributed import LocalCluster
    from prefect_dask import DaskTaskRunner

    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None
    ) as cluster:
        flow = stage_flow("sample").with_options(
            task_runner=DaskTaskRunner(address=cluster.scheduler_address)
        )
        result = flow(config={"model": tiny_model_dir, "prompt": ["a red cat"], "seed": [0, 1], "steps": 2,
                              "out": str(tmp_path / "samples")})  # fmt: skip
    assert result["counts"] == {"images": 2, "shards": 2}
    assert f":{os.getpid()}" not in result["worker"]  # ran in the cluster's worker processes
    assert sorted(p.parent.name for p in (tmp_path / "samples").rglob("*.png")) == [
        "seed-0",
        "seed-1",
    ]
    assert "data:image/jpeg;base64," in artifact("sample-gallery").data


def test_only_transient_io_errors_are_retried():
    assert is_transient(OSError(errno.EIO, "input/output error"))
    assert is_transient(OSError(errno.EBUSY, "device busy"))
    assert is_transient(TimeoutError("NFS read timed out"))
    assert not is_transient(FileNotFoundError(errno.ENOENT, "no such file"))
    assert not is_transient(PermissionError(errno.EACCES, "denied"))
    assert not is_transient(ValueError("bad parameter"))
    assert run_stage.retries == 2
