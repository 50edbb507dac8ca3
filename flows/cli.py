"""The `t2i` command line: one table of commands, each an imported config class and a runner.

Every stage's options are one pydantic model (field description = help text, default = the
paper's number): the same model the Prefect form renders and the stage records in its
manifest. `COMMANDS` below is the whole command surface, in pipeline order; each runner is a
small function here that imports its stage only when called, so `t2i --help` stays fast.

    t2i STAGE POSITIONALS [--config FILE.toml] [--option VALUE ...] [--debug]

Options given as flags override the file. Expected failures (bad input, missing files, a full
disk, a busy output) end in a one-line message and a non-zero exit; `--debug` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import types
import typing
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from captioning.config import CaptionConfig, InitCaptionerConfig, ServeCaptionerConfig
from curate.config import CurateConfig, DemoDataConfig
from curate.options import OptionRenamed, warn_renamed
from dpo.config import DPOConfig, IngestPrefsConfig, MakePrefsConfig
from flows.config import RunAllConfig, ServeConfig
from model.config import (
    ExportSingleFileConfig,
    InitModelConfig,
    LoraConvertConfig,
    PrecomputeConfig,
    SampleConfig,
    TrainConfig,
)


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    description: str
    config: type[BaseModel]
    run: Callable[..., Any]  # run(*positionals, config=ConfigModel(...))
    positionals: tuple[tuple[str, str], ...] = ()
    flow: bool = True  # served as a Prefect flow; False for services and the orchestrator

    @property
    def positional_names(self) -> list[str]:
        return [name for name, _ in self.positionals]


# ---- runners: import the stage only when it runs -------------------------------------------


def demo_data(output: str, config: DemoDataConfig) -> Path:
    from curate.demo_data import run_demo_data

    return run_demo_data(output, config=config)


def curate(input: str, output: str, config: CurateConfig) -> Path:
    from curate.stage import run_curate

    return run_curate(input, output, config)


def init_captioner(output: str, config: InitCaptionerConfig) -> Path:
    from captioning.tiny import run_init_captioner

    return run_init_captioner(output, config=config)


def caption(input: str, output: str, config: CaptionConfig) -> Path:
    from captioning.stage import run_caption

    return run_caption(input, output, config)


def serve_captioner(model: str, config: ServeCaptionerConfig) -> None:
    from captioning.server import run_server

    return run_server(model, config=config)


def init_model(output: str, config: InitModelConfig) -> Path:
    from model.build import run_init_model

    return run_init_model(output, config=config)


def precompute(input: str, output: str, config: PrecomputeConfig) -> Path:
    from model.precompute import run_precompute

    return run_precompute(input, output, config)


def train(encoded: str, output: str, config: TrainConfig) -> Path:
    from model.train import run_train

    return run_train(encoded, output, config)


def prefs(source: str, output: str, config: IngestPrefsConfig) -> Path:
    from dpo.ingest import ingest_prefs

    return ingest_prefs(source, output, config)


def make_prefs(output: str, config: MakePrefsConfig) -> Path:
    from dpo.synthetic import make_prefs as run

    return run(output, config)


def dpo(prefs: str, output: str, config: DPOConfig) -> Path:
    from dpo.trainer import run_dpo

    return run_dpo(prefs, output, config)


def sample(config: SampleConfig) -> Path:
    from model.sampling import run_sample

    return run_sample(config)


def lora_convert(input: str, output: str, config: LoraConvertConfig) -> Path:
    from model.lora_formats import run_lora_convert

    return run_lora_convert(input, output, config)


def export_single_file(model: str, output: str, config: ExportSingleFileConfig) -> Path:
    from model.single_file import run_export_single_file

    return run_export_single_file(model, output, config)


def serve(config: ServeConfig) -> None:
    from flows.serve import run_serve

    return run_serve(config)


def run_all(workdir: str, config: RunAllConfig) -> Path:
    from flows.serve import run_all as run

    return run(workdir, config)


# ---- the command table, in pipeline order ----------------------------------------------------

OUT = ("output", "directory to write")

COMMANDS: tuple[Command, ...] = (
    Command(
        "demo-data",
        "write a small real image-text collection with planted trouble",
        "Writes real images shipped by scikit-image, scikit-learn and matplotlib, each with a "
        "caption, plus near-duplicates (resized, re-encoded, cropped, flipped), an exact copy, "
        "truncated/empty/non-image files, a 16x16 image, an extreme aspect ratio and a "
        "decompression-bomb header, and valid CMYK, palette, 16-bit and EXIF-rotated images. "
        "OUTPUT/DEMO_TRUTH.json says what curation should do with each file. Never uses the "
        "network.",
        DemoDataConfig,
        demo_data,
        (("output", "directory to write the collection to"),),
    ),
    Command(
        "init-model",
        "write a random-weight SD3 pipeline folder built from configs (offline)",
        "Builds SD3Transformer2DModel (QK RMS-norm), a 16-channel AutoencoderKL, CLIP-L, CLIP-G, "
        "T5 and their tokenizers from configs alone, with random weights, and saves a diffusers "
        "folder that StableDiffusion3Pipeline.from_pretrained(OUTPUT) loads with no model hub.",
        InitModelConfig,
        init_model,
        (("output", "directory for the diffusers pipeline folder"),),
    ),
    Command(
        "curate",
        "validate, NSFW/aesthetic-filter and deduplicate an image-text collection",
        "Reads INPUT (an image folder with sidecar .txt/.json captions, webdataset .tar shards, "
        "parquet with image bytes, a saved `datasets` dir, or a stage output) and writes OUTPUT: "
        "the sample table (id, image, caption, source, width, height, nsfw_score, "
        "aesthetic_score, aesthetic_kind, cluster_id), a `rejected` table with one row and "
        "reason per dropped file, report.md with contact sheets and score histograms. "
        "Steps (SD3 section 5.3.1, appendix E): decode and validate; drop exact copies; NSFW "
        "score (open_nsfw by default); aesthetic score (LAION v2 on a local CLIP, or BRISQUE "
        "quality offline); near-duplicates by pHash and FAISS k-means + per-cluster range "
        "search (Algorithm 1). Resumable after a kill; skipped when already done. Offline.",
        CurateConfig,
        curate,
        (("input", "collection to curate (never modified)"), OUT),
    ),
    Command(
        "init-captioner",
        "write a random-weight tiny VLM folder (LLaVA, Florence-2 or Qwen2-VL) built offline",
        "Builds a VLM with random weights and its processor (PIL image processor, WordPiece "
        "tokenizer, chat template where the family has one), all made locally, and saves a "
        "folder that AutoProcessor + AutoModelForImageTextToText load offline: --preset tiny "
        "is a LLaVA (CLIP vision tower + Llama decoder), tiny-florence2 a Florence-2 "
        "(encoder-decoder, task-token prompts such as <MORE_DETAILED_CAPTION>), tiny-qwen2vl "
        "a Qwen2-VL (dynamic resolution; --processor-kwargs '{\"max_pixels\": N}'). They "
        "generate word salad: they exist so tests and the demo run the real captioning code path.",
        InitCaptionerConfig,
        init_captioner,
        (("output", "directory for the VLM folder"),),
    ),
    Command(
        "caption",
        "recaption a curated store with a VLM (local model or OpenAI-compatible server)",
        "Reads INPUT (a finished stage output with id and image columns, e.g. `t2i curate` "
        "output) and writes OUTPUT: every row, all columns kept, plus caption_synthetic (the "
        "VLM's caption with boilerplate openings removed, cut to --max-caption-tokens, default "
        "77 = the T5 length SD3 trained with) and captioner (model@hash of model, prompt and "
        "decoding settings). Backend transformers runs a local image-text-to-text folder "
        "(AutoProcessor + AutoModelForImageTextToText); backend openai posts each image to an "
        "OpenAI-compatible chat-completions server (vLLM, SGLang, `t2i serve-captioner`) with "
        "bounded concurrency and retries on 429/5xx; the API key comes from --api-key-env. "
        "Failed rows are kept with null captions and listed in OUTPUT/report.md. Work is saved "
        "in chunks: rerunning after a kill continues where it stopped.",
        CaptionConfig,
        caption,
        (("input", "curated store to caption"), OUT),
    ),
    Command(
        "serve-captioner",
        "serve a local VLM folder over a minimal OpenAI-compatible chat API",
        "Serves GET /v1/models and POST /v1/chat/completions (one image as a base64 data URL "
        "plus a text prompt) from MODEL, a local image-text-to-text folder, until interrupted. "
        "A stand-in for vLLM/SGLang where they are not installed; `t2i caption --backend "
        "openai --endpoint http://HOST:PORT/v1 --model NAME` talks to it. If "
        "$T2I_SERVER_API_KEY is set, requests must carry it as a Bearer token.",
        ServeCaptionerConfig,
        serve_captioner,
        (("model", "local VLM folder to serve"),),
        flow=False,
    ),
    Command(
        "precompute",
        "pre-encode VAE latents and CLIP-L/CLIP-G/T5 embeddings of a captioned set (16-bit, memory-mapped)",
        "Reads a curated or captioned store (id, image, caption, optional caption_synthetic) and "
        "encodes every image (square center crop at --resolution, or aspect-ratio buckets) with "
        "the VAE of --model (latents after its shift and scaling factors), and the original "
        "caption, the synthetic caption when present and the empty prompt with CLIP-L, CLIP-G "
        "(penultimate states + pooled projections) and T5 (last hidden states, --t5-length "
        "tokens, with the mask), exactly as StableDiffusion3Pipeline.encode_prompt does (SD3 "
        "section 5.3.1). One encoder is loaded at a time; output is safetensors shards plus an "
        "index, resumable per shard. Images that fail are listed in OUTPUT/rejected. Read the "
        "result with model.encoded.EncodedDataset.",
        PrecomputeConfig,
        precompute,
        (
            ("input", "a curated or captioned store (a stage output directory)"),
            ("output", "directory for the pre-encoded set"),
        ),
    ),
    Command(
        "train",
        "train the SD3 MMDiT with rectified flow on a pre-encoded set",
        "Reads ENCODED (output of `t2i precompute`) and trains --model's transformer, or a fresh "
        "one from --preset, with the SD3 recipe: logit-normal(0, 1) timesteps with the "
        "resolution shift, velocity loss eps - x0, each text encoder dropped with p = 0.464, "
        "original or synthetic caption with p = 0.5, AdamW (lr 1e-4, eps 1e-15, 1000 warmup "
        "steps), EMA. Writes OUTPUT as a diffusers SD3 folder (EMA weights, training shift in "
        "the scheduler) and OUTPUT/training/{checkpoints,logs,samples}. Resume with --resume "
        "latest. With --lora-rank R it trains a LoRA on the frozen transformer instead (16-bit "
        "base under 16-bit autocast; --optimizer adamw8bit, --gradient-checkpointing) and writes "
        "OUTPUT/pytorch_lora_weights.safetensors. Multi-GPU/FSDP: `accelerate launch -m "
        "flows.cli train ...` with accelerate's own config.",
        TrainConfig,
        train,
        (
            ("encoded", "pre-encoded set written by `t2i precompute`"),
            ("output", "directory for the trained diffusers pipeline folder"),
        ),
    ),
    Command(
        "prefs",
        "ingest preference pairs (Pick-a-Pic v2, generic, or a folder of pairs)",
        "Reads Pick-a-Pic v2 (caption, jpg_0, jpg_1, label_0; parquet or a saved dataset), a "
        "generic layout (caption, image_w, image_l) or a folder with one sub-folder per pair "
        "(caption.txt, winner.*, loser.*) and writes a preference table. Ties (label 0.5), rows "
        "with has_label or are_different false or labels not summing to 1, identical images, "
        "undecodable images and empty captions go to rejected/ with their reason. A hub-layout "
        "folder (data/SPLIT-00000-of-NNNNN.parquet) is read one --split at a time.",
        IngestPrefsConfig,
        prefs,
        (("source", "preference data in any supported layout"), ("output", "output directory")),
    ),
    Command(
        "make-prefs",
        "build synthetic preference pairs from a folder of images",
        "Makes two edited copies of each image, one with a measurable attribute (a warm tint, "
        "or brightness) and one with its opposite, and writes them as a folder of pairs "
        "(winner = the attribute) that `t2i dpo` reads. For demos and for checking that DPO "
        "moves a model the right way; --swap makes the control with the labels reversed.",
        MakePrefsConfig,
        make_prefs,
        (("output", "directory for the pair folders"),),
    ),
    Command(
        "dpo",
        "align a model with rank-128 LoRA Diffusion-DPO on preference pairs",
        "Diffusion-DPO (Wallace et al. 2023) on a rectified-flow model, errors in noise-prediction "
        "units so beta means Diffusion-DPO's beta, with a LoRA (rank 128, alpha 128) on the "
        "attention projections of the MMDiT blocks. Winner and loser share t and noise; the "
        "reference is the same network with the adapter disabled. PREFS is raw preference data "
        "(any layout `t2i prefs` reads) or its output. Writes OUTPUT/pytorch_lora_weights."
        "safetensors (StableDiffusion3Pipeline.load_lora_weights reads it), report.md (base vs "
        "LoRA samples for held-out captions, the --scorer win rate, then training diagnostics), "
        "metrics.jsonl (loss, implicit accuracy, margin, winner drift, saturation) and "
        "summary.json. Rerunning an interrupted run resumes from its last checkpoint.",
        DPOConfig,
        dpo,
        (("prefs", "preference data or a `t2i prefs` output"), ("output", "output directory")),
    ),
    Command(
        "sample",
        "generate images from a diffusers SD3 folder",
        "Loads --model (any local SD3/SD3.5 diffusers folder, e.g. stable-diffusion-3-medium-"
        "diffusers or `t2i init-model` output) and writes one PNG per prompt and seed to --out.",
        SampleConfig,
        sample,
    ),
    Command(
        "lora-convert",
        "convert an SD3 LoRA between diffusers, kohya and ComfyUI key styles",
        "Reads a LoRA file (or a folder holding one) in diffusers, kohya (sd-scripts lora_sd3), "
        "ComfyUI, OneTrainer or peft key style, detected from its keys, and writes it in --to's "
        "style. kohya and ComfyUI use Stability's MMDiT module names with q/k/v fused (downs "
        "stacked, ups block-diagonal, alpha scaled with the rank); diffusers files carry alpha "
        "folded into B. Converting back gives the same matrices. OUTPUT is a .safetensors path "
        "or a folder (then OUTPUT/pytorch_lora_weights.safetensors).",
        LoraConvertConfig,
        lora_convert,
        (
            ("input", "LoRA .safetensors file or a folder with one"),
            ("output", "a .safetensors path or a folder"),
        ),
    ),
    Command(
        "export-single-file",
        "write a trained SD3 transformer as one Stability-layout .safetensors file (ComfyUI)",
        "Reads MODEL's transformer (a diffusers SD3 folder: `t2i train` output, or any SD3/SD3.5 "
        "folder) and writes it under Stability's MMDiT names, model.diffusion_model.joint_blocks.N"
        ".x_block.attn.qkv.weight and so on (q/k/v fused, the (shift, scale) modulations in "
        "Stability's order): the file ComfyUI's Load Diffusion Model and sd-scripts read, and "
        "diffusers' SD3Transformer2DModel.from_single_file(OUTPUT, config=MODEL) loads back. The "
        "VAE and text encoders stay in MODEL (ComfyUI loads them separately).",
        ExportSingleFileConfig,
        export_single_file,
        (
            ("model", "diffusers SD3 folder whose transformer to export"),
            ("output", "the .safetensors file to write"),
        ),
    ),
    Command(
        "serve",
        "serve every stage flow and end_to_end as deployments for the Prefect UI",
        "Registers one deployment per stage flow (demo-data, init-model, curate, caption, "
        "precompute, train, make-prefs, dpo, sample, ...) and end_to_end, all named FLOW/NAME, "
        "with the Prefect API configured in this shell (PREFECT_API_URL, or the active "
        "profile), and runs the flow runs people trigger from the UI until interrupted. Start a "
        "server first: `prefect server start --host 127.0.0.1`, then "
        "`PREFECT_API_URL=http://127.0.0.1:4200/api t2i serve`.",
        ServeConfig,
        serve,
        flow=False,
    ),
    Command(
        "run-all",
        "run the end_to_end flow here (Prefect's ephemeral mode when no server is configured)",
        "Runs end_to_end in this process: demo data (or SOURCE) -> curate -> caption -> "
        "precompute -> train -> preference pairs -> DPO LoRA -> samples with and without the "
        "LoRA, each stage in a subfolder of WORKDIR; stages already finished there with the "
        "same inputs and parameters are skipped. Prints where each output is.",
        RunAllConfig,
        run_all,
        (("workdir", "working directory; each stage writes a subfolder"),),
        flow=False,
    ),
)


def command(name: str) -> Command:
    for entry in COMMANDS:
        if entry.name == name:
            return entry
    raise ValueError(f"unknown command {name!r}; commands: {', '.join(c.name for c in COMMANDS)}")


def stage_commands() -> list[Command]:
    """Every command, in pipeline order (the services and the orchestrator last)."""
    return list(COMMANDS)


# ---- parsing --------------------------------------------------------------------------------


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_options(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One --flag per field: type, choices and help text (with its default) from the model; the
    old spellings in the model's RENAMED as hidden flags that warn (curate/options.py).

    Required fields are checked after merging --config, so a file may supply them."""
    options = {name: _option(name, info) for name, info in model.model_fields.items()}
    for name, kwargs in options.items():
        parser.add_argument(flag(name), **kwargs)
    for old, new in getattr(model, "RENAMED", {}).items():
        hidden = {**options[new], "help": argparse.SUPPRESS, "action": _old_spelling(old, new)}
        parser.add_argument(flag(old), **hidden)
    if "resume" in options:  # dpo's old switch: --no-resume = --resume none
        switch = _old_spelling("no_resume", "resume none")
        hidden = {"default": argparse.SUPPRESS, "help": argparse.SUPPRESS}
        parser.add_argument(
            "--no-resume", dest="resume", nargs=0, const="none", action=switch, **hidden
        )


def _option(name: str, info) -> dict[str, Any]:
    """add_argument's keywords for one field."""
    annotation, _ = _unwrap_optional(info.annotation)
    help_text = (info.description or "").rstrip(".")
    kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
    if info.is_required():
        kwargs["help"] += " (required)"
    else:
        default = info.get_default(call_default_factory=True)
        if default not in (None, "", [], {}):
            shown = " ".join(map(str, default)) if isinstance(default, list) else default
            kwargs["help"] += f" (default: {shown})"
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return {**kwargs, "action": argparse.BooleanOptionalAction}
    if origin is Literal:
        return {**kwargs, "choices": list(typing.get_args(annotation))}
    if origin in (list, tuple):
        return {**kwargs, "nargs": "+", "type": _scalar(typing.get_args(annotation)[0])}
    if origin is dict or annotation is dict:
        return {**kwargs, "type": _json_object, "metavar": "JSON"}
    if name == "resume":  # a bare --resume continues from the latest checkpoint
        return {**kwargs, "nargs": "?", "const": "latest", "metavar": "latest|FOLDER|none"}
    return {**kwargs, "type": _scalar(annotation), "metavar": name.upper()}


def _old_spelling(old: str, new: str) -> type[argparse.Action]:
    """An argparse action that stores under the new name and warns that OLD is deprecated."""

    class OldSpelling(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            warn_renamed(old, new)
            setattr(namespace, self.dest, self.const if self.nargs == 0 else values)

    return OldSpelling


def _scalar(annotation: Any):
    return annotation if annotation in (int, float, str) else str


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _add_common(parser: argparse.ArgumentParser, top: bool) -> None:
    default = False if top else argparse.SUPPRESS
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="show the full traceback of an error instead of a one-line message",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="t2i",
        description=(
            "Prepare data for and align Stable-Diffusion-3-style models. Stages, in order: "
            "demo-data/curate -> caption -> precompute -> train -> dpo -> sample. Each reads one "
            "directory and writes another; rerunning a finished stage with the same inputs and "
            "parameters is skipped. Every stage takes --config FILE.toml (its options; flags "
            "override the file) and writes the options it ran with to OUTPUT/config.toml."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for entry in COMMANDS:
        sub_parser = sub.add_parser(
            entry.name,
            help=entry.summary,
            description=entry.description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for name, help_text in entry.positionals:
            sub_parser.add_argument(name, help=help_text)
        sub_parser.add_argument(
            "--config",
            dest="_config_file",
            metavar="FILE.toml",
            default=None,
            help="TOML file of this command's options (keys = option names with underscores); "
            "flags given here override it",
        )
        _add_common(sub_parser, top=False)
        add_config_options(sub_parser, entry.config)
        sub_parser.set_defaults(_command=entry)
    return parser


def _quiet_libraries() -> None:
    """Models come from local folders only; keep library chatter off the console."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # One progress display per stage, the stage's own: no bars from the libraries under it
    # (datasets' "Saving the dataset", transformers' "Loading weights" and "Writing model shards").
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def resolve_config(entry: Command, flags: dict[str, Any], config_file: str | None) -> BaseModel:
    """The command's config: the file's values, then the flags over them, validated."""
    from curate.config_file import read_config_file

    values = read_config_file(config_file, entry.config) if config_file else {}
    return entry.config.model_validate({**values, **flags})


def validation_message(error: ValidationError) -> str:
    """pydantic's errors on one line, named by their flags."""
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        name = flag(where) if where else "options"
        parts.append(
            f"{name}: {item['msg']}"
            + (" (or give it in --config)" if item["type"] == "missing" else "")
        )
    return "; ".join(parts)


def one_line(error: BaseException) -> str:
    """An expected failure as one line: what happened, and to which file."""
    from curate.stage_runtime import StageBusy

    if isinstance(error, ValidationError):
        return f"invalid value: {validation_message(error)}"
    if isinstance(error, StageBusy):
        return str(error)
    if isinstance(error, MemoryError):
        return (
            "out of memory"
            + (f": {error}" if str(error) else "")
            + "; try smaller batches or fewer workers"
        )
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        hint = "; free some space or choose another output" if error.errno == errno.ENOSPC else ""
        return f"{error.strerror}{where}{hint}"
    text = " ".join(str(error).split()) or type(error).__name__
    if type(error).__name__ in PLAIN_ERRORS:
        return text
    return f"{type(error).__name__}: {text}"  # e.g. JSONDecodeError, ReadError, UnicodeDecodeError


# Errors whose message says it all; others are prefixed with their type's name.
PLAIN_ERRORS = {
    "ValueError",
    "RuntimeError",
    "Exception",
    "OSError",
    "FileNotFoundError",
    "StoreError",
    "UnbalancedOutput",
    "StageBusy",
}


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), "")
    with _renamed_options_reported(command):  # an old option spelling: one line on stderr
        args = vars(parser.parse_args(argv))
        entry: Command = args.pop("_command")
        args.pop("command")
        debug = args.pop("debug", False)
        config_file = args.pop("_config_file", None)
        positionals = [args.pop(name) for name in entry.positional_names]
        try:
            config = resolve_config(entry, args, config_file)
        except ValidationError as error:
            if debug:
                raise
            parser.exit(2, f"t2i {entry.name}: invalid options: {validation_message(error)}\n")
        except (OSError, ValueError) as error:
            if debug:
                raise
            parser.exit(2, f"t2i {entry.name}: {one_line(error)}\n")
    try:
        result = entry.run(*positionals, config=config)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"t2i {entry.name}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        print(f"t2i {entry.name}: error: {one_line(error)}", file=sys.stderr)
        if not _expected(error):
            print(
                f"t2i {entry.name}: (an unexpected error; rerun with --debug for the traceback)",
                file=sys.stderr,
            )
        return 1
    _report(entry.name, result)
    return 0


@contextmanager
def _renamed_options_reported(command: str) -> Iterator[None]:
    """Each OptionRenamed warning inside as a `t2i COMMAND: message` line on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OptionRenamed)
        try:
            yield
        finally:
            for item in caught:
                if issubclass(item.category, OptionRenamed):
                    print(f"t2i {command}: {item.message}", file=sys.stderr)
                else:
                    warnings.showwarning(item.message, item.category, item.filename, item.lineno)


def _expected(error: BaseException) -> bool:
    """Failures a user can cause and fix: bad input, missing or unreadable files, full disks."""
    import tarfile

    from curate.store import StoreError

    expected = (OSError, MemoryError, ValueError, tarfile.TarError, StoreError, LookupError)
    return isinstance(error, expected)


def _report(name: str, result: Any) -> None:
    if result is None:
        return
    if isinstance(result, (str, Path)):
        path = Path(result)
        manifest = path / "manifest.json"
        if manifest.is_file():
            counts = json.loads(manifest.read_text()).get("counts", {})
            summary = ", ".join(f"{k} {v}" for k, v in counts.items())
            print(f"{name}: wrote {path}" + (f" ({summary})" if summary else ""))
        else:
            print(f"{name}: wrote {path}")
    else:
        print(f"{name}: {result}")


if __name__ == "__main__":
    sys.exit(main())
