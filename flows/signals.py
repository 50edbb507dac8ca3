"""Stopping on Ctrl-C (SIGINT) and SIGTERM: the command, and every process it started.

`stopping_cleanly()` wraps a command. Both signals raise an exception in the main thread (SIGINT
Python's own KeyboardInterrupt, SIGTERM `Terminated`, a KeyboardInterrupt too), so the stage
unwinds as it does on Ctrl-C: locks released, temporary folders removed, Prefect's runner and
ephemeral server shut down by their own code. At the moment the signal arrives the handler notes
every descendant process (Prefect's flow-run engine and server, curate's worker pool, a local
Dask cluster); at exit, after the libraries' own shutdown, any of them still running gets
SIGTERM, then SIGKILL after a grace period, so nothing is left behind even where a child
outlived its parent (then it no longer shows in the process tree, but it was noted). A noted
process is only signalled while it is the same process (same start time), never a reused pid.
A watchdog ends the process EXIT_BOUND_S after the signal if a shutdown hangs.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

GRACE_S = 5.0  # how long children get to exit after SIGTERM before SIGKILL
EXIT_BOUND_S = 20.0  # after a signal, the process ends within this long, whatever hangs


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived; unwinds like Ctrl-C (exit status 143 = 128 + SIGTERM)."""


_noted: dict[int, int] = {}  # pid -> start time, of descendants seen when a signal came


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name, in parentheses, may hold spaces
    return int(fields[19])


def descendants(pid: int | None = None) -> dict[int, int]:
    """{pid: start time} of every live descendant of PID (default: this process), from /proc."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    try:
        entries = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:  # no /proc (not Linux): nothing to note
        return {}
    for entry in entries:
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(entry)
    found: dict[int, int] = {}
    stack = list(children.get(root, []))
    while stack:
        child = stack.pop()
        started = _start_time(child)
        if started is not None and child not in found:
            found[child] = started
            stack += children.get(child, [])
    return found


def _alive(noted: dict[int, int]) -> dict[int, int]:
    return {pid: t for pid, t in noted.items() if _start_time(pid) == t and not _zombie(pid)}


def _zombie(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    if text[text.rindex(")") + 2 :].split()[0] != "Z":
        return False
    with suppress(ChildProcessError):  # our own child: reap it
        os.waitpid(pid, os.WNOHANG)
    return True


def stop_children(noted: dict[int, int], grace_s: float = GRACE_S) -> None:
    """SIGTERM each noted process still running, then SIGKILL what is left after GRACE_S."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        left = _alive(noted)
        for pid in left:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = _alive(left)
        if not left:
            return


_signalled: list[int] = []  # the signals received while a command ran


def note_signal(signum: int) -> None:
    """Record that SIGNUM arrived: the process tree as it is now, and the exit watchdog."""
    _noted.update(descendants())
    if not _signalled:
        _start_watchdog(128 + signum)
    _signalled.append(signum)


def interruption(signum: int) -> KeyboardInterrupt:
    """The exception SIGNUM unwinds a command with."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def first_signal() -> int | None:
    return _signalled[0] if _signalled else None


def on_signal(signum: int, frame) -> None:
    """The handler for SIGINT and SIGTERM: note them, then unwind like Ctrl-C."""
    note_signal(signum)
    raise interruption(signum)


def _start_watchdog(status: int) -> None:
    """Past EXIT_BOUND_S after the first signal, stop the children and exit with STATUS, even if
    some library's shutdown waits on something that will not come (Prefect's log service
    draining to a server that is gone, a worker that does not answer)."""

    def watch() -> None:
        time.sleep(EXIT_BOUND_S)
        stop_children(dict(_noted), grace_s=2.0)
        os._exit(status)

    threading.Thread(target=watch, name="t2i-exit-watchdog", daemon=True).start()


def _stop_noted_at_exit() -> None:
    if _noted:
        stop_children(dict(_noted))


@contextmanager
def stopping_cleanly() -> Iterator[None]:
    """Run a command so that SIGINT and SIGTERM stop it and everything it started.

    After a signal the command unwinds; its children are stopped at interpreter exit, after the
    libraries' own shutdown (Prefect drains its logs to its ephemeral server, then stops it), and
    a watchdog ends the process EXIT_BOUND_S after the signal whatever happens."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, on_signal)
    try:
        yield
    except KeyboardInterrupt:
        if _signalled:
            _noted.update(descendants())
            atexit.register(_stop_noted_at_exit)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
