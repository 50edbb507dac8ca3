"""The end_to_end form: a recipe section (which stages run, how the base is fine-tuned), then one section per stage, each its config model with the fields the chain fills made optional."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from captioning.config import CaptionConfig, InitCaptionerConfig
from curate.config import CurateConfig, DemoDataConfig
from dpo.config import DPOConfig, IngestPrefsConfig, MakePrefsConfig
from model.config import InitModelConfig, PrecomputeConfig, SampleConfig, TrainConfig


def _without_null(schema: dict[str, Any]) -> None:
    """Optional fields as the form shows them: their own type, no `null` branch (which the
    Prefect UI renders as a `Property is type "None"` box). Empty still means the default."""
    for field in schema.get("properties", {}).values():
        branches = field.get("anyOf")
        if not branches:
            continue
        kept = [b for b in branches if b.get("type") != "null"]
        if len(kept) == 1 and len(kept) < len(branches):
            del field["anyOf"]
            field.update(kept[0])
            if "default" in field and field["default"] is None:
                # The UI fills a shown default into the values it validates: a null default
                # of a field typed `string` would fail that check. Absent means the default.
                del field["default"]


class FormSection(BaseModel):
    """A section of the end_to_end form (a stage's options)."""

    model_config = ConfigDict(json_schema_extra=_without_null)


def chained(model: type[BaseModel], name: str) -> Any:
    """A field of `model` the chain fills from an earlier stage when the form leaves it empty."""
    description = model.model_fields[name].description or name
    return Field(None, description=f"{description} (empty: set by the chain)")


class Recipe(FormSection):
    """Which stages run, and what DPO learns from."""

    curate: bool = Field(True, description="validate, filter and deduplicate the source")
    caption: bool = Field(True, description="recaption the curated set with the captioner VLM")
    fine_tune: Literal["none", "lora", "full"] = Field(
        "lora",
        description="before DPO: a LoRA on the base (train section; rank 64 unless set there), "
        "a full fine-tune, or none (DPO on the base itself)",
    )
    dpo: bool = Field(
        True, description="align with Diffusion-DPO (a LoRA) on the preference source"
    )
    preferences: Literal["synthetic", "dataset"] = Field(
        "synthetic",
        description="synthetic: warm/bright-tinted pairs made from the curated set (make_prefs "
        "section; a check that DPO moves the model); dataset: a real preference set, read by "
        "`t2i prefs` (prefs section)",
    )
    preference_data: str = Field(
        "",
        description="for preferences 'dataset': a Pick-a-Pic v2 folder or parquet files, a generic "
        "table (caption, image_w, image_l) or a folder of pair folders",
    )
    evaluate: bool = Field(
        True,
        description="sample the evaluation prompts (sample section) with and without the final "
        "LoRA, same seeds, side by side",
    )


class DemoDataInForm(FormSection, DemoDataConfig):
    pass


class InitModelInForm(FormSection, InitModelConfig):
    pass


class CurateInForm(FormSection, CurateConfig):
    pass


class InitCaptionerInForm(FormSection, InitCaptionerConfig):
    pass


class CaptionConfigInChain(FormSection, CaptionConfig):
    model: str | None = chained(CaptionConfig, "model")


class PrecomputeConfigInChain(FormSection, PrecomputeConfig):
    model: str | None = chained(PrecomputeConfig, "model")


class TrainConfigInChain(FormSection, TrainConfig):
    model: str | None = chained(TrainConfig, "model")


class PrefsConfigInChain(FormSection, IngestPrefsConfig):
    pass


class MakePrefsConfigInChain(FormSection, MakePrefsConfig):
    source: str | None = chained(MakePrefsConfig, "source")


class DPOConfigInChain(FormSection, DPOConfig):
    model: str | None = chained(DPOConfig, "model")


class SampleConfigInChain(FormSection, SampleConfig):
    model: str | None = chained(SampleConfig, "model")
    out: str | None = chained(SampleConfig, "out")
    lora: str | None = chained(SampleConfig, "lora")


def section(model: type[BaseModel]) -> Any:
    """A stage's section of the form: its defaults, described by the stage's summary."""
    return Field(default_factory=model, description=model.summary)


class EndToEndConfig(BaseModel):
    workdir: str = Field(..., description="working directory; each stage writes a subfolder of it")
    base_model: str = Field(
        "",
        description="local SD3/SD3.5 diffusers folder every stage starts from (precompute, train, "
        "DPO, samples); empty: write a random-weight tiny one",
    )
    source: str = Field(
        "",
        description="raw image-text collection (folder, webdataset tars, parquet); empty: write the demo collection",
    )
    captioner: str = Field(
        "",
        description="local image-text-to-text model folder; empty: write a random-weight tiny VLM",
    )
    recipe: Recipe = Field(default_factory=Recipe, description=Recipe.__doc__)
    demo_data: DemoDataInForm = section(DemoDataInForm)
    init_model: InitModelInForm = section(InitModelInForm)
    curate: CurateInForm = section(CurateInForm)
    init_captioner: InitCaptionerInForm = section(InitCaptionerInForm)
    caption: CaptionConfigInChain = section(CaptionConfigInChain)
    precompute: PrecomputeConfigInChain = section(PrecomputeConfigInChain)
    train: TrainConfigInChain = section(TrainConfigInChain)
    prefs: PrefsConfigInChain = section(PrefsConfigInChain)
    make_prefs: MakePrefsConfigInChain = section(MakePrefsConfigInChain)
    dpo: DPOConfigInChain = section(DPOConfigInChain)
    sample: SampleConfigInChain = section(SampleConfigInChain)
