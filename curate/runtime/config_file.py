"""Stage configs as TOML files: `--config FILE.toml` in, OUT/config.toml out.

A stage's options are one pydantic model. `read_config_file` turns a TOML file into that
model's fields (unknown keys are an error naming them), and `config_toml` writes a resolved
config back, so `t2i STAGE ... --config OUT/config.toml` repeats a run.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from curate.runtime.options import rename_keys
from curate.runtime.redact import strip_credentials

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CONFIG_FILE = "config.toml"
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def read_config_file(path: str | Path, model: type[BaseModel]) -> dict[str, Any]:
    """The fields a TOML file sets for MODEL; a missing file, bad TOML or an unknown key raise ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        values = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--config {path}: not valid TOML: {error}") from None
    # old spellings of renamed options (curate/runtime/options.py), accepted with a warning for one release
    values = rename_keys(values, getattr(model, "RENAMED", {}), "key", f"--config {path}: ")
    unknown = sorted(set(values) - set(model.model_fields))
    if unknown:
        raise ValueError(
            f"--config {path}: unknown key(s) {', '.join(unknown)} for {model.__name__}; "
            f"known: {', '.join(model.model_fields)}"
        )
    return values


def config_toml(config: BaseModel, header: str = "") -> str:
    """The config as TOML, one line per field; unset (None) fields are left as comments."""
    lines = [f"# {line}" for line in header.splitlines()]
    recorded = strip_credentials(config.model_dump(mode="json"))  # no user:password@ of a URL
    for name, value in recorded.items():
        if value is None:
            lines.append(f"# {name}: unset")
        else:
            lines.append(f"{_key(name)} = {_value(value)}")
    return "\n".join(lines) + "\n"


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are valid in TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        items = [f"{_key(str(k))} = {_value(v)}" for k, v in value.items() if v is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    return json.dumps(str(value))
