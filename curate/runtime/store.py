"""The on-disk format of a stage output (docs/stage-contract.md).

A stage reads one directory and writes another:

    OUT/
      manifest.json   stage, parameters, input fingerprint, counts, versions, wall time
      samples/        the sample table: a `datasets` dataset keyed by `id` (sha256 of image bytes)
      rejected/       one row per rejected id: id, stage, reason, score, threshold, detail
      ...             stage extras (report.md, contact sheets, shards)

How an output is written (assembled beside OUT, renamed into place at commit) and the work log
that survives a kill are curate/runtime/store_writer.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import datasets

from curate.runtime.redact import strip_credentials

MANIFEST = "manifest.json"
SAMPLES = "samples"
REJECTED = "rejected"

VERSIONED_PACKAGES = (
    "t2i-pipeline",
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "faiss-cpu",
    "prefect",
    "numpy",
    "pillow",
)

REJECTED_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "stage": datasets.Value("string"),
        "reason": datasets.Value("string"),
        "score": datasets.Value("float64"),
        "threshold": datasets.Value("float64"),
        "detail": datasets.Value("string"),
    }
)


class StoreError(RuntimeError):
    """A directory is not a finished stage output, or cannot become one."""


def sample_id(image_bytes: bytes) -> str:
    """The key of every row in every stage: sha256 of the original image bytes."""
    return hashlib.sha256(image_bytes).hexdigest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def params_hash(parameters: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(parameters).encode()).hexdigest()[:16]


@dataclass
class Rejection:
    id: str
    stage: str
    reason: str
    score: float | None = None
    threshold: float | None = None
    detail: str = ""


@dataclass
class Manifest:
    stage: str
    parameters: dict[str, Any]
    input_fingerprint: str
    counts: dict[str, int] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    wall_time_s: float = 0.0
    created: str = ""
    host: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def matches(self, stage: str, parameters: dict[str, Any], input_fingerprint: str) -> bool:
        return (
            self.stage == stage
            and canonical_json(strip_credentials(self.parameters))
            == canonical_json(strip_credentials(parameters))
            and self.input_fingerprint == input_fingerprint
        )

    @classmethod
    def read(cls, directory: str | os.PathLike) -> Manifest | None:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def write(self, directory: str | os.PathLike) -> None:
        recorded = strip_credentials(asdict(self))  # never write down user:password@ of a URL
        write_text_atomic(Path(directory) / MANIFEST, json.dumps(recorded, indent=2, default=str))


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def fingerprint(path: str | os.PathLike) -> str:
    """Identify an input cheaply and deterministically.

    A finished stage output is identified by its manifest (which already pins its own input
    and parameters) plus the dataset state; anything else (a raw image folder, tar shards,
    parquet files) by the relative path, size and modification time of every file.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"input {root} does not exist")
    digest = hashlib.sha256()
    manifest = root / MANIFEST if root.is_dir() else None
    if manifest is not None and manifest.is_file():
        digest.update(b"store\0" + manifest.read_bytes())
        for state in sorted(root.glob("*/state.json")):
            digest.update(state.read_bytes())
        return digest.hexdigest()[:32]
    # lstat: a link is fingerprinted as itself, never followed outside the input
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if not p.is_dir())
    for file in files:
        stat = file.lstat()
        rel = file.name if file == root else file.relative_to(root).as_posix()
        line = f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
        digest.update(line.encode("utf-8", "surrogateescape"))  # non-UTF-8 names stay distinct
    return digest.hexdigest()[:32]


def is_done(
    output: str | os.PathLike, stage: str, parameters: dict[str, Any], input_fingerprint: str
) -> bool:
    """True when OUTPUT is a finished output of this stage for these parameters and input."""
    manifest = Manifest.read(output)
    return manifest is not None and manifest.matches(stage, parameters, input_fingerprint)


def require_store(directory: str | os.PathLike) -> Manifest:
    manifest = Manifest.read(directory)
    if manifest is None:
        raise StoreError(
            f"{directory} is not a finished stage output (no {MANIFEST}); "
            "run the previous stage first, or point at its output directory"
        )
    return manifest


STATE_MAX_BYTES = 1 << 20  # a state.json or dataset_dict.json larger than this is not one


def _small_json(path: Path) -> Any:
    if path.stat().st_size > STATE_MAX_BYTES:
        raise StoreError(f"{path} is {path.stat().st_size} bytes; not a saved dataset's metadata")
    try:
        return json.loads(path.read_text())
    except (ValueError, RecursionError) as error:
        raise StoreError(f"{path} is not valid JSON: {error}") from None


def check_saved_dataset(path: str | os.PathLike) -> None:
    """Refuse a saved dataset whose metadata names files outside its folder.

    `datasets.load_from_disk` opens every `_data_files[].filename` of state.json joined to the
    folder, so `../../x.arrow` or an absolute name would read anything on the machine; the same
    holds for the split names of a DatasetDict. Each must be a plain name that resolves (links
    followed) inside the folder."""
    from curate.runtime.cells import inside

    root = Path(path)
    if (root / "dataset_dict.json").is_file():
        splits = _small_json(root / "dataset_dict.json")
        names = splits.get("splits") if isinstance(splits, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise StoreError(f"{root / 'dataset_dict.json'} has no list of split names")
        for name in names:
            _plain_inside(root, name, "split")
            check_saved_dataset(root / name)
        return
    state_path = root / "state.json"
    if not state_path.is_file():
        return  # load_from_disk says what is missing
    state = _small_json(state_path)
    files = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(files, list):
        raise StoreError(f"{state_path} has no list of data files (_data_files)")
    for entry in files:
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise StoreError(f"{state_path}: a data file entry has no file name")
        _plain_inside(root, name, "data file")
        if not inside(root / name, root):
            raise StoreError(
                f"{state_path} names the data file {name!r}, a link leading outside {root}; not read"
            )


def _plain_inside(root: Path, name: str, what: str) -> None:
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or len(parts) != 1:
        raise StoreError(
            f"{root} names the {what} {name!r}, outside its folder; not read "
            "(a saved dataset reads only files inside itself)"
        )


def load_saved(path: str | os.PathLike) -> datasets.Dataset | datasets.DatasetDict:
    """`datasets.load_from_disk` of a folder, after `check_saved_dataset`."""
    check_saved_dataset(path)
    return datasets.load_from_disk(str(path))


def load_samples(directory: str | os.PathLike) -> datasets.Dataset:
    """The sample table of a finished stage output, memory-mapped."""
    require_store(directory)
    return load_saved(Path(directory) / SAMPLES)


def load_rows(
    directory: str | os.PathLike, start: int, stop: int, columns: Iterable[str]
) -> list[dict[str, Any]]:
    """Rows [START, STOP) of a finished stage output's sample table, as stored (an image cell is
    `{"bytes", "path"}`, never decoded); only the COLUMNS the table has. What a shard's worker
    reads, so that rows never travel from the driver."""
    rows = load_samples(directory).with_format("arrow")[start:stop]
    return rows.select([c for c in columns if c in rows.column_names]).to_pylist()


def load_rejected(directory: str | os.PathLike) -> datasets.Dataset:
    require_store(directory)
    path = Path(directory) / REJECTED
    if not path.exists():
        return datasets.Dataset.from_list([], features=REJECTED_FEATURES)
    return datasets.load_from_disk(str(path))


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
