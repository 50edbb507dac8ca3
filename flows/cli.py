"""The `t2i` command line: parse, call the command's runner, print where the output is.

The commands are the table in flows/commands.py. Every stage's options are one pydantic model
(field description = help text, default = the paper's number): the same model the Prefect form
renders and the stage records in its manifest.

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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from curate.runtime.options import OptionRenamed, warn_renamed
from flows.commands import COMMANDS, Command

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
    old spellings in the model's RENAMED as hidden flags that warn (curate/runtime/options.py).

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
        if entry.writes:
            sub_parser.add_argument(
                "--overwrite",
                dest="_overwrite",
                action="store_true",
                default=False,
                help="replace an output of another stage (e.g. a curated store given as a "
                "caption output) or an existing file; without it such an output is refused. "
                "Never removes files the pipeline did not write",
            )
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
    from curate.runtime.config_file import read_config_file

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
    from curate.runtime.output_lock import StageBusy

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
    "OutputRefused",
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
        overwrite = args.pop("_overwrite", False)
        positionals = {name: args.pop(name) for name in entry.positional_names}
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
    from curate.runtime.output_guard import overwrite_allowed
    from flows.signals import Terminated, stopping_cleanly

    try:
        with stopping_cleanly(), overwrite_allowed(overwrite):  # SIGINT/SIGTERM stop it all
            result = entry.run(*entry.arguments(positionals, config), config)
    except KeyboardInterrupt as stop:
        if debug:
            raise
        terminated = isinstance(stop, Terminated)
        print(f"t2i {entry.name}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
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

    from curate.runtime.store import StoreError

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
