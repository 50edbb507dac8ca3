"""The stage contract every runner goes through (curate, caption, precompute, train, prefs,
make-prefs, dpo, sample).

    with StageRun(out, "curate", config, reads={"input": inp}) as run:
        if run.finished:
            return run.skip()
        work = run.work_log()                 # chunks that survive a kill, keyed by this run
        with run.writer() as writer:          # assembled beside OUT, renamed into place
            ...
            writer.counts["input"] = n        # checked: input = kept + rejected

A run holds an exclusive lock on OUT (curate/runtime/output_lock.py) from the skip check to the
commit: a second run on the same OUT waits for the first and then sees its finished output.
Everything the stage reads (input stores, model folders, tokenizers) is fingerprinted; a
finished output is skipped only when its manifest has the same stage, parameters and
fingerprints. The resolved config is written beside the output as config.toml.

Before anything is locked or written, `check_output` (curate/runtime/output_guard.py) guards OUT
against the stage's inputs and against folders the pipeline did not write.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from curate.runtime.config_file import CONFIG_FILE, config_toml
from curate.runtime.output_guard import (
    ENTRIES,
    check_output,
    check_output_folder,
    claim_in_place,
    same_files,
)
from curate.runtime.output_lock import output_lock
from curate.runtime.store import (
    MANIFEST,
    REJECTED,
    SAMPLES,
    Manifest,
    StoreError,
    canonical_json,
    fingerprint,
    library_versions,
    params_hash,
)
from curate.runtime.store_writer import StageWriter, WorkLog, share_like_umask


class UnbalancedOutput(StoreError):
    """A stage tried to commit an output where input != kept + rejected."""


# -- the output guard ---------------------------------------------------------------------


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
            if output.is_dir() and same_files(fresh, output):
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
