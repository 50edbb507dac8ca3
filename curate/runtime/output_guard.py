"""Where a stage may write: OUT never touches what it reads, and an existing OUT is this pipeline's own.

`check_output` runs before anything is locked or written: OUT must not be, lie inside or contain
anything the stage reads; it must not be a file; an existing non-empty OUT must be this
pipeline's output of this stage (another stage's output only with --overwrite), and files the
pipeline did not write are never removed, with or without --overwrite.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from curate.runtime.store import (
    MANIFEST,
    Manifest,
    StoreError,
)

OVERWRITE_FLAG = "--overwrite"
OWNER_FILE = ".t2i-output"  # {"stage": ...}: an output being written in place (train), unfinished
ENTRIES = "entries"  # manifest extra: the top-level names the stage wrote into OUT


class OutputRefused(StoreError):
    """OUT would lose data: it is (or holds, or sits in) an input, a file, or someone else's."""


_OVERWRITE = False  # set by the CLI's --overwrite for the duration of one command


@contextlib.contextmanager
def overwrite_allowed(allowed: bool = True) -> Iterator[None]:
    """Within the body, an OUT that is another stage's output may be replaced (--overwrite)."""
    global _OVERWRITE
    previous, _OVERWRITE = _OVERWRITE, bool(allowed)
    try:
        yield
    finally:
        _OVERWRITE = previous


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def check_paths(
    output: str | os.PathLike, stage: str, reads: Mapping[str, str | os.PathLike | None]
) -> Path:
    """OUT's real path, refused when it is, lies inside or contains something the stage reads."""
    out = _real(output)
    for name, path in reads.items():
        if path in (None, ""):
            continue
        real = _real(path)
        if real == out:
            why = f"it is the {name} {path}"
        elif real in out.parents:
            why = f"it lies inside the {name} {path}"
        elif out in real.parents:
            why = f"it contains the {name} {path}"
        else:
            continue
        raise OutputRefused(
            f"{stage}: refusing to write {out}: {why} (a stage never writes over what it "
            "reads); choose an output folder outside it"
        )
    return out


def output_owner(output: Path) -> tuple[str | None, set[str] | None]:
    """(stage, names it wrote) of OUT when this pipeline wrote it, else (None, None).

    names is None when not recorded (outputs from before the record, or written in place)."""
    manifest_path = output / MANIFEST
    if manifest_path.is_file():
        try:
            manifest = Manifest.read(output)
        except (ValueError, TypeError, OSError):
            manifest = None  # some other program's manifest.json
        if manifest is not None and isinstance(manifest.stage, str) and manifest.stage:
            entries = manifest.extra.get(ENTRIES) if isinstance(manifest.extra, dict) else None
            names = set(entries) if isinstance(entries, list) else None
            return manifest.stage, names
    marker = output / OWNER_FILE
    if marker.is_file():
        try:
            stage = json.loads(marker.read_text()).get("stage")
        except (ValueError, OSError, AttributeError):
            stage = None
        if isinstance(stage, str) and stage:
            return stage, None
    return None, None


def check_output(
    output: str | os.PathLike,
    stage: str,
    reads: Mapping[str, str | os.PathLike | None] = {},  # read only
) -> Path:
    """Refuse, in one line, an OUT whose writing could lose data; return its real path.

    - OUT is, lies inside or contains something the stage reads;
    - OUT is a file (or anything but a folder);
    - OUT is a non-empty folder this pipeline did not write (no manifest or in-place marker of
      ours), or one holding entries its manifest does not list: refused even with --overwrite,
      since replacing OUT would remove them;
    - OUT is another stage's output: refused unless --overwrite.
    An empty folder, and this stage's own output, are fine."""
    out = check_paths(output, stage, reads)
    if not _existing_folder(out, stage):
        return out
    present = sorted(entry.name for entry in os.scandir(out))
    if not present:
        return out
    owner, written = output_owner(out)
    if owner is None:
        raise OutputRefused(
            f"{stage}: refusing to write {out}: it holds files this pipeline did not write "
            f"({present[0]}{_more(present)}); choose another output or empty it "
            f"({OVERWRITE_FLAG} never removes files the pipeline did not write)"
        )
    if written is not None:
        foreign = [n for n in present if n not in written and n not in (MANIFEST, OWNER_FILE)]
        if foreign:
            raise OutputRefused(
                f"{stage}: refusing to write {out}: it holds files `t2i {owner}` did not write "
                f"({foreign[0]}{_more(foreign)}); move them out or choose another "
                f"output ({OVERWRITE_FLAG} never removes files the pipeline did not write)"
            )
    if owner != stage and not _OVERWRITE:
        raise OutputRefused(
            f"{stage}: refusing to write {out}: it is the output of `t2i {owner}`; pass "
            f"{OVERWRITE_FLAG} to replace it, or choose another output"
        )
    return out


def check_output_file(
    output: str | os.PathLike,
    stage: str,
    reads: Mapping[str, str | os.PathLike | None],
    target: str | os.PathLike,
) -> Path:
    """The guard for a stage that writes one file TARGET (OUTPUT itself, or a file inside the
    folder OUTPUT; lora-convert): OUTPUT apart from what it reads; an existing TARGET is
    replaced only with --overwrite, and nothing else in the folder is touched."""
    check_paths(output, stage, reads)
    out, target = _real(output), _real(target)
    if target != out and out.exists() and not out.is_dir():
        raise OutputRefused(
            f"{stage}: refusing to write into {out}: it is a file, not a folder; "
            "name a .safetensors file or a folder"
        )
    if os.path.lexists(target):
        if target.is_dir() or not target.is_file():
            raise OutputRefused(f"{stage}: refusing to write {target}: it is not a regular file")
        if not _OVERWRITE:
            raise OutputRefused(
                f"{stage}: refusing to write {target}: it exists; pass {OVERWRITE_FLAG} to "
                "replace it, or choose another output"
            )
    return target


def _more(names: list[str]) -> str:
    return f" and {len(names) - 1} more" if len(names) > 1 else ""


def claim_in_place(output: Path, stage: str) -> None:
    """Mark OUT as this stage's output before writing into it in place (train)."""
    output.mkdir(parents=True, exist_ok=True)
    marker = output / OWNER_FILE
    tmp = output / f"{OWNER_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps({"stage": stage}) + "\n")
    os.replace(tmp, marker)


def check_output_folder(
    output: str | os.PathLike, stage: str, foreign: Callable[[Path], list[str]] | None
) -> Path:
    """The guard for a generator's raw-data OUT (no manifest): not a file; empty, or holding
    only what the generator writes (FOREIGN(OUT) lists the rest)."""
    out = check_paths(output, stage, {})
    if not _existing_folder(out, stage):
        return out
    present = _listing(out, every=True)
    if not present:
        return out
    others = present if foreign is None else foreign(out)
    if others:
        raise OutputRefused(
            f"{stage}: refusing to write {out}: it holds files `t2i {stage}` did not write "
            f"({others[0]}{_more(others)}); move them out or choose another output "
            f"({OVERWRITE_FLAG} never removes files the pipeline did not write)"
        )
    return out


def _existing_folder(out: Path, stage: str) -> bool:
    """Whether OUT is a folder that exists; False when nothing is there; refused when it is a
    broken link, a file or anything but a folder."""
    if not out.exists():
        if os.path.lexists(out):
            raise OutputRefused(f"{stage}: refusing to write {out}: it is a broken link")
        return False
    if not out.is_dir():
        raise OutputRefused(
            f"{stage}: refusing to write {out}: it is a file, not a folder; "
            "choose a folder name (the stage never replaces a file)"
        )
    return True


def _listing(root: Path, every: bool = False) -> list[str]:
    """Relative paths of the files under ROOT; EVERY: also links, special files and empty
    folders (NAME/), links not followed."""
    names = []
    for path in sorted(root.rglob("*")):
        real_dir = path.is_dir() and not path.is_symlink()
        if not real_dir and (every or path.is_file()):
            names.append(path.relative_to(root).as_posix())
        elif every and real_dir and not any(path.iterdir()):
            names.append(path.relative_to(root).as_posix() + "/")
    return names


def same_files(a: Path, b: Path) -> bool:
    names = _listing(a)
    if names != _listing(b):
        return False
    return all(filecmp.cmp(a / name, b / name, shallow=False) for name in names)
