"""The `t2i` command line: one subcommand per stage, options generated from the stage's config model.

Each stage's options are a pydantic model (field description = help text, default = the paper's
number), the same model that Prefect renders as a form and that the stage records in its
manifest. This module only parses, calls the stage and prints where the output is.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    description: str
    config: str  # "module:ConfigClass"
    run: str  # "module:function", called as function(*positionals, config=ConfigClass(...))
    positionals: tuple[tuple[str, str], ...] = ()
    optional_positionals: tuple[str, ...] = field(default=())


STAGE_PACKAGES = ("curate", "captioning", "model", "dpo", "flows")


def stage_commands() -> list[Command]:
    """Every subcommand, in stage order.

    Each stage package declares its command-line surface as plain data in
    `<package>/commands.py` (a list of dicts with Command's fields), so stage packages never
    import the orchestration layer.
    """
    commands = []
    for package in STAGE_PACKAGES:
        try:
            module = importlib.import_module(f"{package}.commands")
        except ModuleNotFoundError as error:
            if error.name != f"{package}.commands":
                raise
            continue
        for spec in module.COMMANDS:
            spec = dict(spec)
            spec["positionals"] = tuple(tuple(p) for p in spec.get("positionals", ()))
            spec["optional_positionals"] = tuple(spec.get("optional_positionals", ()))
            commands.append(Command(**spec))
    return commands


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def add_config_options(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One --flag per field: type, choices and help text (with its default) from the model."""
    for name, info in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation, _ = _unwrap_optional(info.annotation)
        help_text = (info.description or "").rstrip(".")
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if info.is_required():
            kwargs["required"] = True
        else:
            default = info.get_default(call_default_factory=True)
            if default not in (None, "", []):
                kwargs["help"] += (
                    f" (default: {' '.join(map(str, default)) if isinstance(default, list) else default})"
                )
        origin = typing.get_origin(annotation)
        if annotation is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif origin is Literal:
            parser.add_argument(flag, choices=list(typing.get_args(annotation)), **kwargs)
        elif origin in (list, tuple):
            parser.add_argument(
                flag, nargs="+", type=_scalar(typing.get_args(annotation)[0]), **kwargs
            )
        else:
            parser.add_argument(flag, type=_scalar(annotation), metavar=name.upper(), **kwargs)


def _scalar(annotation: Any):
    if annotation in (int, float, str):
        return annotation
    if annotation is Path:
        return str
    return str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="t2i",
        description=(
            "Prepare data for and align Stable-Diffusion-3-style models. Stages, in order: "
            "demo-data/curate -> caption -> precompute -> train -> dpo -> sample. Each reads one "
            "directory and writes another; rerunning a finished stage with the same inputs and "
            "parameters is skipped."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in stage_commands():
        sub_parser = sub.add_parser(
            command.name,
            help=command.summary,
            description=command.description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for name, help_text in command.positionals:
            nargs = "?" if name in command.optional_positionals else None
            sub_parser.add_argument(name, help=help_text, nargs=nargs)
        add_config_options(sub_parser, _load(command.config))
        sub_parser.set_defaults(_command=command)
    return parser


def _quiet_libraries() -> None:
    """Models come from local folders only; keep library chatter off the console."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command: Command = args.pop("_command")
    args.pop("command")
    positionals = [args.pop(name) for name, _ in command.positionals]
    config_model = _load(command.config)
    try:
        config = config_model(**args)
    except Exception as error:  # pydantic.ValidationError: show it the way argparse would
        parser.exit(2, f"t2i {command.name}: invalid options:\n{error}\n")
    from curate.store import StoreError

    try:
        result = _load(command.run)(*positionals, config=config)
    except (FileNotFoundError, ValueError, StoreError) as error:
        print(f"t2i {command.name}: error: {error}", file=sys.stderr)
        return 1
    _report(command.name, result)
    return 0


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
