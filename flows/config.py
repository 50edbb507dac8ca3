"""Options of the orchestration commands and the end_to_end form (light: no torch, no Prefect).

The end_to_end flow's parameters hold one section per stage, each the stage's own config model
(the `t2i STAGE --help` options), except that the fields the chain fills in itself (the model a
stage reads, where it writes) become optional: left empty, the chain points them at the previous
stage's output. The sections follow the stages that are installed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, create_model

from flows.cli import _load, stage_commands

# Stages chained by end_to_end, in order: (section name, command name).
CHAIN = (
    ("demo_data", "demo-data"),
    ("init_model", "init-model"),
    ("curate", "curate"),
    ("init_captioner", "init-captioner"),
    ("caption", "caption"),
    ("precompute", "precompute"),
    ("train", "train"),
    ("make_prefs", "make-prefs"),
    ("dpo", "dpo"),
    ("sample", "sample"),
)
# Fields the chain fills from earlier stages when left empty.
CHAINED_FIELDS = ("model", "captioner", "lora", "out", "source")

# The offline tiny kit: small enough that the whole chain runs in minutes on 2 CPU cores.
# Keys a stage's config does not have are ignored.
TINY_KIT: dict[str, dict[str, Any]] = {
    "demo_data": {"format": "folder"},
    "init_model": {"preset": "tiny"},
    "curate": {"workers": 1},  # 31 images: a second worker process costs more than it saves
    "init_captioner": {"preset": "tiny"},
    "caption": {"max_new_tokens": 8, "batch_size": 8},
    "precompute": {"resolution": 64, "batch_size": 8},
    "train": {
        "max_steps": 20,
        "batch_size": 4,
        "warmup_steps": 2,
        "log_every": 2,
        "val_every": 10,
        "sample_every": 10,
        "sample_count": 2,
        "sample_steps": 4,
        "checkpoint_every": 10,
    },  # fmt: skip
    "make_prefs": {"pairs_per_image": 1},
    "dpo": {
        "max_steps": 10,
        "batch_size": 2,
        "rank": 8,
        "alpha": 8.0,
        "lr": 1e-3,
        "log_every": 2,
        "checkpoint_every": 5,
    },
    "sample": {
        "prompt": ["a photo of a red cat", "a rocket on a launch pad"],
        "seed": [0, 1],
        "steps": 4,
    },
}


def installed_chain() -> list[tuple[str, str]]:
    known = {command.name for command in stage_commands()}
    return [(section, name) for section, name in CHAIN if name in known]


def _command(name: str):
    return next(c for c in stage_commands() if c.name == name)


def chain_section_model(name: str) -> type[BaseModel]:
    """The stage's config model with the chained fields (and any required one) made optional."""
    model: type[BaseModel] = _load(_command(name).config)
    overrides = {}
    for field_name, info in model.model_fields.items():
        if field_name in CHAINED_FIELDS or info.is_required():
            overrides[field_name] = (
                info.annotation | None,
                Field(
                    None, description=f"{info.description or field_name} (empty: set by the chain)"
                ),
            )
    if not overrides:
        return model
    return create_model(
        f"{model.__name__}InChain", __base__=model, __module__=__name__, **overrides
    )


def _end_to_end_model() -> type[BaseModel]:
    fields: dict[str, Any] = {
        "workdir": (str, Field(..., description="working directory; each stage writes a subfolder of it")),
        "source": (str, Field("", description="raw image-text collection (folder, webdataset tars, parquet); empty: write the demo collection")),
        "base_model": (str, Field("", description="local SD3 diffusers folder to start from; empty: write a random-weight tiny one")),
        "captioner": (str, Field("", description="local image-text-to-text model folder; empty: write a random-weight tiny VLM")),
    }  # fmt: skip
    for section, name in installed_chain():
        section_model = chain_section_model(name)
        globals()[section_model.__name__] = section_model  # importable, so it pickles by reference
        fields[section] = (
            section_model,
            Field(default_factory=section_model, description=_command(name).summary),
        )
    return create_model("EndToEndConfig", __module__=__name__, **fields)


EndToEndConfig = _end_to_end_model()


def tiny_kit(workdir: str, **top: Any) -> dict[str, Any]:
    """end_to_end parameters for the offline tiny kit (JSON-ready)."""
    parameters: dict[str, Any] = {"workdir": workdir, **top}
    for section, _ in installed_chain():
        model = EndToEndConfig.model_fields[section].annotation
        values = {k: v for k, v in TINY_KIT.get(section, {}).items() if k in model.model_fields}
        parameters[section] = model(**values).model_dump(mode="json")
    return EndToEndConfig.model_validate(parameters).model_dump(mode="json")


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
