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
from flows.registry import stages
from flows.serve import deep_merge
from flows.stages import is_transient, run_stage, stage_flow


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
    config = {
        "model": tiny_model_dir,
        "prompt": ["a red cat", "a blue dog"],
        "seed": [3],
        "steps": 2,
        "out": str(tmp_path / "samples"),
    }
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
    # each stage once, in the chain's order; the tiny kit's pairs are synthetic (no `prefs`)
    assert names == [link.command for link in CHAIN if link.command not in ("prefs", "merge-lora")]
    written: list[str] = []
    for name, arguments, config in steps:
        read = [v for k, v in arguments.items() if k not in ("output", "out")]
        read += [
            getattr(config, f)
            for f in ("model", "lora", "source", "init_lora")
            if getattr(config, f, None)
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
        result = flow(
            config={
                "model": tiny_model_dir,
                "prompt": ["a red cat"],
                "seed": [0, 1],
                "steps": 2,
                "out": str(tmp_path / "samples"),
            }
        )
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


def recipe_plan(tmp_path, **recipe) -> dict[str, tuple[dict, object]]:
    """{stage: (arguments, config)} of an end_to_end run on a given base model with RECIPE."""
    parameters = {
        "workdir": str(tmp_path / "w"),
        "base_model": "/models/sd3.5-medium",
        "source": "/data/raw",
        "captioner": "/models/vlm",
        "recipe": recipe,
    }
    return {n: (a, c) for n, a, c in plan(EndToEndConfig.model_validate(parameters))}


def test_the_default_recipe_is_lora_then_dpo_on_pairs_from_the_curated_set(tmp_path):
    steps = recipe_plan(tmp_path)
    assert list(steps) == [
        "curate",
        "caption",
        "precompute",
        "train",
        "merge-lora",
        "make-prefs",
        "dpo",
        "sample",
    ]
    base = "/models/sd3.5-medium"  # given once, used by every stage that loads a model
    assert steps["precompute"][1].model == base and steps["train"][1].model == base
    curated = steps["curate"][0]["output"]
    assert steps["make-prefs"][1].source == curated  # synthetic pairs from the curated set
    assert steps["train"][1].lora_rank == 64
    # DPO runs a fresh LoRA on base + the fine-tune LoRA merged: its reference is the SFT model
    merge = steps["merge-lora"][0]
    assert (merge["base"], merge["lora"]) == (base, steps["train"][0]["output"])
    assert steps["dpo"][1].model == merge["output"] and steps["dpo"][1].init_lora is None
    assert steps["sample"][1].model == merge["output"]  # evaluated against the SFT model
    assert steps["dpo"][1].scorer == "attribute:warm"  # the pairs' attribute judges the samples
    assert steps["sample"][1].lora == steps["dpo"][0]["output"]


def test_recipe_switches_leave_stages_out(tmp_path):
    none = recipe_plan(tmp_path, fine_tune="none", caption=False)
    assert list(none) == ["curate", "make-prefs", "dpo", "sample"]
    assert none["dpo"][1].model == "/models/sd3.5-medium" and none["dpo"][1].init_lora is None
    full = recipe_plan(tmp_path, fine_tune="full", caption=False)
    assert full["precompute"][0]["input"] == full["curate"][0]["output"]  # no captions: curated
    assert full["dpo"][1].model == full["train"][0]["output"] and full["train"][1].lora_rank is None
    assert full["sample"][1].model == full["train"][0]["output"]
    only_tune = recipe_plan(tmp_path, dpo=False, evaluate=False)
    assert list(only_tune) == ["curate", "caption", "precompute", "train"]
    no_dpo = recipe_plan(tmp_path, dpo=False)
    assert no_dpo["sample"][1].lora == no_dpo["train"][0]["output"]  # the fine-tune is evaluated
    assert "merge-lora" not in no_dpo and no_dpo["sample"][1].model == "/models/sd3.5-medium"


def test_a_real_preference_dataset_goes_through_prefs(tmp_path):
    steps = recipe_plan(tmp_path, preferences="dataset", preference_data="/data/pickapic")
    assert "make-prefs" not in steps
    assert steps["prefs"][0]["source"] == "/data/pickapic"
    assert steps["dpo"][0]["prefs"] == steps["prefs"][0]["output"]
    assert steps["dpo"][1].scorer is None  # no attribute to judge by; the form may name a scorer


def test_recipes_that_do_not_fit_together_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="curated store"):
        recipe_plan(tmp_path, curate=False)
    with pytest.raises(ValueError, match="preference_data"):
        recipe_plan(tmp_path, preferences="dataset")
    assert recipe_plan(tmp_path, curate=False, caption=False, fine_tune="none")  # DPO on raw pairs
    assert not (tmp_path / "w").exists()


def test_the_form_has_a_recipe_section_first_and_no_null_typed_fields():
    import json

    schema = end_to_end.parameters.model_dump()
    assert list(schema["properties"])[:5] == [
        "workdir",
        "base_model",
        "source",
        "captioner",
        "recipe",
    ]
    assert '"null"' not in json.dumps(schema)  # the UI shows `Property is type "None"` for those
    recipe = schema["definitions"]["Recipe"]["properties"]
    assert recipe["fine_tune"]["enum"] == ["none", "lora", "full"]
    assert all(
        field.get("description")
        for d in schema["definitions"].values()
        for field in d.get("properties", {}).values()
    )


def test_deployments_are_titled_by_what_they_do_with_the_recipe_first():
    from flows.config import ServeConfig
    from flows.serve import deployments

    served = deployments(ServeConfig())
    recipe = served[0].parameters  # the server checks them against the null-free form
    assert recipe["recipe"]["fine_tune"] == "full" and "None" not in repr(recipe)
    names = [d.name for d in served]
    assert len(set(names)) == len(names) and "t2i" not in names
    assert sorted(names)[0] == served[0].name and served[0].flow_name == "end_to_end"
    assert all(d.tags == ["t2i"] for d in served)


def _form_values(schema: dict, node: dict) -> dict:
    """What the Prefect UI fills the end_to_end form with before a person types: each field's
    schema default, section by section (the deployment's parameters then go over these)."""
    values = {}
    for name, field in node.get("properties", {}).items():
        ref = field.get("$ref") or next(
            (b["$ref"] for b in field.get("allOf", []) if "$ref" in b), None
        )
        if ref:  # a section: the UI fills its fields one by one
            values[name] = _form_values(schema, schema["definitions"][ref.rsplit("/", 1)[-1]])
        elif "default" in field:
            values[name] = field["default"]
    return values


def test_the_dashboard_form_validates_as_filled_in_by_the_ui():
    from prefect.utilities.schema_tools.validation import validate

    from flows.config import ServeConfig
    from flows.serve import deployments

    schema = end_to_end.parameters.model_dump()
    values = deep_merge(_form_values(schema, schema), deployments(ServeConfig())[0].parameters)
    values["workdir"] = "/tmp/work"
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validate(values, schema)]
    assert not errors, errors[:5]  # the UI's Run button sends nothing while any error stands
