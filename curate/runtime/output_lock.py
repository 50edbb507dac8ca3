"""One run at a time per output: an exclusive lock file beside OUT, held from the skip check to the commit.

A second run on the same OUT waits for the first (or, with T2I_LOCK_WAIT_S=SECONDS, gives up
after that long with a one-line message); a nested run on an output this process holds fails
instead of deadlocking.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from curate.runtime.store import (
    StoreError,
)

LOCK_WAIT_ENV = "T2I_LOCK_WAIT_S"
_HELD: set[Path] = set()  # outputs this process holds, so a nested run fails instead of deadlocking
_HELD_GUARD = threading.Lock()


class StageBusy(StoreError):
    """Another run holds the output."""


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
