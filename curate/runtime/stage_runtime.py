"""The stage contract every runner goes through (curate, caption, precompute, train, prefs,
make-prefs, dpo, sample).

    with StageRun(out, "curate", config, reads={"input": inp}) as run:
        if run.finished:
            return run.skip()
        work = run.work_log()                 # chunks that survive a kill, keyed by this run
        with run.writer() as writer:          # assembled beside OUT, renamed into place
            ...
            writer.counts["input"] = n        # checked: input = kept + rejected

A run holds an exclusive lock on OUT (a lock file beside it) from the skip check to the commit:
a second run on the same OUT waits for the first (or, with T2I_LOCK_WAIT_S=SECONDS, gives up
after that long with a one-line message) and then sees the first run's finished output.
Everything the stage reads (input stores, model folders, tokenizers) is fingerprinted; a
finished output is skipped only when its manifest has the same stage, parameters and
fingerprints. The resolved config is written beside the output as config.toml.

Before anything is locked or written, `check_output` guards OUT: it must not be, lie inside or
contain anything the stage reads; it must not be a file; an existing non-empty OUT must be this
pipeline's output of this stage (another stage's output only with --overwrite), and files the
pipeline did not write are never removed, with or without --overwrite.
"""

from __future__ import annotations

import contextlib
import fcntl
import filecmp
import hashlib
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from curate.runtime.config_file import CONFIG_FILE, config_toml
from curate.runtime.store import (
    MANIFEST,
    REJECTED,
    SAMPLES,
    Manifest,
    StageWriter,
    StoreError,
    WorkLog,
    canonical_json,
    fingerprint,
    library_versions,
    params_hash,
    share_like_umask,
)

LOCK_WAIT_ENV = "T2I_LOCK_WAIT_S"
OVERWRITE_FLAG = "--overwrite"
OWNER_FILE = ".t2i-output"  # {"stage": ...}: an output being written in place (train), unfinished
ENTRIES = "entries"  # manifest extra: the top-level names the stage wrote into OUT
_HELD: set[Path] = set()  # outputs this process holds, so a nested run fails instead of deadlocking
_HELD_GUARD = threading.Lock()


class StageBusy(StoreError):
    """Another run holds the output."""


class UnbalancedOutput(StoreError):
    """A stage tried to commit an output where input != kept + rejected."""


class OutputRefused(StoreError):
    """OUT would lose data: it is (or holds, or sits in) an input, a file, or someone else's."""


# -- the output guard ---------------------------------------------------------------------

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
    reads: Mapping[str, str | os.PathLike | None] = {},  # noqa: B006 - read only
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
    if not out.exists():
        if os.path.lexists(out):
            raise OutputRefused(f"{stage}: refusing to write {out}: it is a broken link")
        return out
    if not out.is_dir():
        raise OutputRefused(
            f"{stage}: refusing to write {out}: it is a file, not a folder; "
            "choose a folder name (the stage never replaces a file)"
        )
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


def lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.lock"


def _lock_wait_s() -> float | None:
    value = os.environ.get(LOCK_WAIT_ENV, "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        raise ValueError(f"{LOCK_WAIT_ENV}={value!r} is not a number of seconds") from None


@contextlib.contextmanager
def output_lock(output: str | os.PathLike, stage: str) -> Iterator[None]:
    """Hold OUTPUT exclusively (fcntl lock on a file beside it) for the body."""
    output = Path(output).resolve()
    with _HELD_GUARD:
        if output in _HELD:
            raise StageBusy(f"{stage}: {output} is already being written by this process")
        _HELD.add(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        path = lock_path(output)
        fd = _open_locked(path, output, stage)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{stage} pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # while still held: a waiter then sees its file gone and retries
            os.close(fd)
    finally:
        with _HELD_GUARD:
            _HELD.discard(output)


def _open_locked(path: Path, output: Path, stage: str) -> int:
    """An open, locked descriptor of PATH, the file that is at PATH now (the previous holder
    removes it when done, so a lock taken on a removed file is dropped and taken again)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _acquire(fd, path, output, stage)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            held = os.fstat(fd)
            if current is not None and (current.st_ino, current.st_dev) == (
                held.st_ino,
                held.st_dev,
            ):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _acquire(fd: int, path: Path, output: Path, stage: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    try:
        holder = path.read_text(errors="replace").strip() or "another run"
    except FileNotFoundError:
        holder = "another run"
    wait = _lock_wait_s()
    if wait == 0:
        raise StageBusy(
            f"{stage}: {output} is being written by another run ({holder}); "
            "wait for it to finish or choose another output"
        )
    limit = "" if wait is None else f" (at most {wait:g} s)"
    print(f"{stage}: {output} is being written by {holder}; waiting{limit}", file=sys.stderr)
    deadline = None if wait is None else time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                raise StageBusy(
                    f"{stage}: {output} is still being written by {holder} after {wait:g} s; "
                    "try again later or choose another output"
                ) from None
            time.sleep(0.2)


def reads_fingerprint(reads: Mapping[str, str | os.PathLike | None]) -> tuple[str, dict[str, Any]]:
    """One fingerprint over everything a stage reads, and the record of each part."""
    record = {
        name: {"path": str(Path(path).resolve()), "fingerprint": fingerprint(path)}
        for name, path in sorted(reads.items())
        if path not in (None, "")
    }
    digest = hashlib.sha256(canonical_json(record).encode()).hexdigest()[:32]
    return digest, record


class StageRun:
    """One run of a stage on one output: lock, fingerprints, skip, work log, commit.

    output: the directory the stage writes.
    stage: the stage's name, recorded in the manifest.
    config: the stage's pydantic config (written as OUT/config.toml).
    reads: name -> path of everything the stage reads; a path that is None or "" is left out.
    parameters: what the manifest records (default: the config's fields); `volatile` names the
      ones that do not change the result (worker counts, --resume), left out of the skip test.
    accounting: the stage turns records into kept + rejected rows and must declare `input`.
    """

    def __init__(
        self,
        output: str | os.PathLike,
        stage: str,
        config: BaseModel,
        reads: Mapping[str, str | os.PathLike | None],
        *,
        parameters: dict[str, Any] | None = None,
        volatile: Iterable[str] = (),
        accounting: bool = True,
    ) -> None:
        self.output = Path(output).resolve()
        self.stage = stage
        self.config = config
        self.reads = dict(reads)
        self.parameters = parameters if parameters is not None else config.model_dump(mode="json")
        self.volatile = tuple(volatile)
        self.accounting = accounting
        self.input_fingerprint = ""
        self.read_record: dict[str, Any] = {}
        self._lock: contextlib.AbstractContextManager | None = None

    # -- lock -----------------------------------------------------------------------------

    def __enter__(self) -> StageRun:
        for name, path in self.reads.items():
            if path not in (None, "") and not Path(path).exists():
                raise FileNotFoundError(f"{self.stage}: {name} {path} does not exist")
        check_output(self.output, self.stage, self.reads)  # before anything is created
        if self._holds_lock():
            self._lock = output_lock(self.output, self.stage)
            self._lock.__enter__()
        try:
            check_output(self.output, self.stage, self.reads)  # again, now that OUT is ours
            self.input_fingerprint, self.read_record = reads_fingerprint(self.reads)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._lock is not None:
            lock, self._lock = self._lock, None
            lock.__exit__(exc_type, exc, tb)

    @staticmethod
    def _holds_lock() -> bool:
        """In a multi-process launch (accelerate, torchrun) only rank 0 locks and commits."""
        return os.environ.get("RANK", "0") == "0"

    # -- skip -----------------------------------------------------------------------------

    def _key(self, parameters: Mapping[str, Any]) -> str:
        return canonical_json({k: v for k, v in parameters.items() if k not in self.volatile})

    @property
    def finished(self) -> bool:
        """OUT is this stage's finished output for these parameters and these reads."""
        manifest = Manifest.read(self.output)
        return (
            manifest is not None
            and manifest.stage == self.stage
            and manifest.input_fingerprint == self.input_fingerprint
            and self._key(manifest.parameters) == self._key(self.parameters)
        )

    def skip(self) -> Path:
        print(
            f"{self.stage}: {self.output} is already finished for these inputs and parameters; skipped",
            file=sys.stderr,
        )
        return self.output

    # -- work in progress -----------------------------------------------------------------

    def work_key(self, ignore: Iterable[str] = (), **extra: Any) -> str:
        """A key for unfinished work: stage, parameters (less volatile and IGNORE), reads, EXTRA.

        IGNORE names parameters a rerun may change and still continue the work (DPO's --steps:
        a longer run continues from the shorter one's checkpoints)."""
        parameters = {k: v for k, v in self.parameters.items() if k not in set(ignore)}
        return params_hash(
            {
                "stage": self.stage,
                "parameters": self._key(parameters),
                "reads": self.input_fingerprint,
                **extra,
            }
        )

    def work_log(self, ignore: Iterable[str] = (), **extra: Any) -> WorkLog:
        """Chunks of finished work beside OUT that a rerun of this same run reuses."""
        return WorkLog(self.output, self.work_key(ignore, **extra))

    # -- commit ---------------------------------------------------------------------------

    def writer(self, *, tables: bool = True) -> StageWriter:
        """Assemble the output beside OUT; on a clean exit it is checked and renamed into place."""
        return _ContractWriter(self, tables=tables)

    def invalidate(self) -> None:
        """For stages that write into OUT itself (train): drop a manifest that does not match
        this run before writing anything, so a killed run never looks finished."""
        manifest = self.output / MANIFEST
        if manifest.is_file() and not self.finished:
            manifest.unlink(missing_ok=True)  # every rank of a multi-process launch may try
        claim_in_place(self.output, self.stage)

    def commit_in_place(
        self, counts: dict[str, int], extra: dict[str, Any], wall_time_s: float
    ) -> Path:
        """For stages that write into OUT itself: config.toml, then the manifest, last."""
        _write_config(self, self.output)
        entries = sorted(entry.name for entry in os.scandir(self.output))
        Manifest(
            stage=self.stage,
            parameters=self.parameters,
            input_fingerprint=self.input_fingerprint,
            counts=counts,
            versions=library_versions(),
            wall_time_s=round(wall_time_s, 3),
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            host=socket.gethostname(),
            extra={**extra, "reads": self.read_record, ENTRIES: entries},
        ).write(self.output)
        share_like_umask(self.output)
        return self.output


def _write_config(run: StageRun, directory: Path) -> None:
    header = (
        f"t2i {run.stage}: the resolved options of this run; repeat it with\n"
        f"t2i {run.stage} ... --config {CONFIG_FILE}"
    )
    (directory / CONFIG_FILE).write_text(config_toml(run.config, header))


class _ContractWriter(StageWriter):
    def __init__(self, run: StageRun, tables: bool) -> None:
        super().__init__(run.output, run.stage, run.parameters, run.input_fingerprint)
        self.run = run
        self.tables = tables

    def commit(self) -> Path:
        if self.tables:
            self.ensure_tables()
        if self.run.accounting:
            self._check_balance()
        self.extra["reads"] = self.run.read_record
        _write_config(self.run, self.path)
        self.extra[ENTRIES] = sorted({entry.name for entry in os.scandir(self.path)} | {MANIFEST})
        check_output(self.output, self.stage, self.run.reads)  # nothing foreign appeared meanwhile
        return super().commit()

    def _check_balance(self) -> None:
        if "input" not in self.counts:
            raise UnbalancedOutput(
                f"{self.stage}: refusing to commit {self.output}: the stage did not count its input records"
            )
        if self.tables:
            kept, rejected = self._count(SAMPLES), self._count(REJECTED)
        else:
            kept, rejected = self.counts.get("kept", 0), self.counts.get("rejected", 0)
        if self.counts["input"] != kept + rejected:
            raise UnbalancedOutput(
                f"{self.stage}: refusing to commit {self.output}: input {self.counts['input']} != "
                f"kept {kept} + rejected {rejected}"
            )
        self.counts.update(kept=kept, rejected=rejected)


def local_path(value: str | os.PathLike | None) -> str | None:
    """VALUE when it names something on this machine (a model folder, a tokenizer), else None:
    a server-side model name or an unset option is nothing the stage reads from disk."""
    if value in (None, "") or not Path(value).exists():
        return None
    return str(value)


def write_folder(
    output: str | os.PathLike, stage: str, config: Any, write: Callable[[Path], Any]
) -> Path:
    """For stages that read nothing and write a model folder (init-model, init-captioner): WRITE
    into the stage writer's folder under the contract (lock, skip when done, atomic commit)."""
    with StageRun(output, stage, config, {}, accounting=False) as run:
        if run.finished:
            return run.skip()
        with run.writer(tables=False) as writer:
            write(writer.path)
    return run.output


def generate(
    output: str | os.PathLike,
    stage: str,
    write: Callable[[Path], Any],
    foreign: Callable[[Path], list[str]] | None = None,
) -> Path:
    """For generators whose output is raw data, not a stage output (demo-data): WRITE into a
    fresh sibling under OUT's lock, then keep OUT untouched when it already holds exactly those
    files (so what reads it sees no change), or swap the new files in.

    An existing non-empty OUT is replaced only when FOREIGN(OUT), the files in it the generator
    did not write, is empty: such files are never removed (with or without --overwrite)."""
    output = check_output_folder(output, stage, foreign)
    with output_lock(output, stage):
        fresh = output.parent / f".{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            check_output_folder(output, stage, foreign)
            write(fresh)
            share_like_umask(fresh)
            if output.is_dir() and _same_files(fresh, output):
                print(
                    f"{stage}: {output} already holds this output; kept as it was", file=sys.stderr
                )
                return output
            check_output_folder(output, stage, foreign)
            retired = None
            if output.exists():
                retired = fresh.with_name(fresh.name + "-old")
                os.replace(output, retired)
            os.replace(fresh, output)
            if retired is not None:
                shutil.rmtree(retired, ignore_errors=True)
        finally:
            shutil.rmtree(fresh, ignore_errors=True)
    return output


def check_output_folder(
    output: str | os.PathLike, stage: str, foreign: Callable[[Path], list[str]] | None
) -> Path:
    """The guard for a generator's raw-data OUT (no manifest): not a file; empty, or holding
    only what the generator writes (FOREIGN(OUT) lists the rest)."""
    out = check_paths(output, stage, {})
    if not out.exists():
        if os.path.lexists(out):
            raise OutputRefused(f"{stage}: refusing to write {out}: it is a broken link")
        return out
    if not out.is_dir():
        raise OutputRefused(
            f"{stage}: refusing to write {out}: it is a file, not a folder; "
            "choose a folder name (the stage never replaces a file)"
        )
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


def _same_files(a: Path, b: Path) -> bool:
    names = _listing(a)
    if names != _listing(b):
        return False
    return all(filecmp.cmp(a / name, b / name, shallow=False) for name in names)
