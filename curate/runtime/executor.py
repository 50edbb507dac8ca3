"""Run a stage's per-shard function on local worker processes or on a Dask cluster.

A stage plans its input as shards (a name and a payload), and the executor runs
`task(state, payload)` for each one on a worker. `state` (the models) is built by
`setup.build(setup.spec)` the first time a worker meets that setup and is reused for every
later shard with the same setup, so model loading is paid once per worker, not once per shard.
Results come back to the driver as shards finish, with at most a few shards per worker in
flight, so the driver's memory stays flat in the number of shards; the stage writes each result
to its work log under the shard's name, or the task writes its own (curate: a payload names
input to read, and the worker writes each chunk's table itself and returns only the names). A shard's result depends on its payload and setup alone,
so a shard lost with its worker reruns elsewhere and gives the same result.

Executors: in this process (one worker, no Dask), local worker processes (`workers` > 1), a Dask
cluster at `dask_address`, or a local Dask cluster of `dask_workers` processes. A stage that
itself runs as a task on a Dask worker (a Prefect flow on prefect-dask) maps its shards over
that worker's cluster.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

# Options that choose where the work runs, never what it produces.
EXECUTION_FIELDS = ("workers", "dask_address", "dask_workers")
PER_WORKER = 2  # shards in flight per worker: one running, one queued behind it
LOCAL_RESTARTS = 3  # times a broken local pool is rebuilt before the run gives up


class ExecutorOptions(BaseModel):
    """Where a stage's shards run (the fields every sharded stage's config shares)."""

    workers: int = Field(
        1, ge=1, description="local worker processes, each with one intra-op thread"
    )
    dask_address: str | None = Field(
        None,
        description="run the shards on the Dask cluster whose scheduler is at this address (tcp://HOST:PORT)",
    )
    dask_workers: int | None = Field(
        None,
        ge=1,
        description="start a local Dask cluster of this many worker processes (one thread each) for this run",
    )


@dataclass(frozen=True)
class Setup:
    """How a worker builds its state: `build(spec)`; `key` names the state (same key, same state)."""

    build: Callable[[Any], Any]  # a module-level function, so workers import it by name
    spec: Any
    key: str


@dataclass
class Result:
    name: str
    value: Any
    load_s: float  # seconds this shard's worker spent building its state first (0 when reused)
    worker: str = ""


# ---- the worker side ---------------------------------------------------------------------------

_STATE: dict[str, Any] = {}  # at most one entry: this process's current state, by setup key
_STATE_LOCK = threading.Lock()


def _release(state: Any) -> None:
    for method in ("release", "close"):
        if callable(getattr(state, method, None)):
            getattr(state, method)()
            return


def worker_state(setup: Setup) -> tuple[Any, float]:
    """This process's state for SETUP, built on first use; a different setup replaces it."""
    with _STATE_LOCK:
        if setup.key in _STATE:
            return _STATE[setup.key], 0.0
        _heap_for_tensors()
        for old in list(_STATE):
            _release(_STATE.pop(old))
        started = time.monotonic()
        _STATE[setup.key] = setup.build(setup.spec)
        return _STATE[setup.key], time.monotonic() - started


def release_state() -> None:
    with _STATE_LOCK:
        for old in list(_STATE):
            _release(_STATE.pop(old))


# glibc's mallopt parameters and the sizes restored (its own ceilings for the sliding thresholds)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD


def _heap_for_tensors() -> bool:
    """Undo a small MALLOC_TRIM_THRESHOLD_ in this process (Dask's nanny starts workers with 64 KiB).

    Setting that variable switches off glibc's sliding mmap threshold, so every buffer above
    128 KiB (most image tensors and activations) is mmapped, zero-filled by page faults and
    unmapped again on every use: the scorers took twice the CPU time per chunk on a Dask worker
    than in a local process (benchmarks/RESULTS.md). Fixed thresholds at glibc's own ceilings
    keep such buffers on the heap, at the cost of up to 64 MiB per worker not handed back.
    Returns whether anything was changed.
    """
    import ctypes
    import os
    import sys

    small = os.environ.get("MALLOC_TRIM_THRESHOLD_", "")
    if not sys.platform.startswith("linux") or not small.isdigit() or int(small) >= TRIM_THRESHOLD:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl): nothing to undo
        return False
    changed = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    changed &= libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    os.environ["MALLOC_TRIM_THRESHOLD_"] = str(TRIM_THRESHOLD)  # done once per process
    return changed


def run_shard(setup: Setup, task: Callable[[Any, Any], Any], name: str, payload: Any) -> Result:
    """What a worker runs for one shard."""
    import os
    import socket

    state, load_s = worker_state(setup)
    return Result(name, task(state, payload), load_s, f"{socket.gethostname()}:{os.getpid()}")


def _init_local_worker() -> None:
    import torch

    torch.set_num_threads(1)


# ---- the driver side ---------------------------------------------------------------------------


@dataclass
class Executor:
    """`with executor_for(options) as ex: for result in ex.map(setup, task, shards): ...`"""

    workers: int = 1
    dask_address: str | None = None
    dask_workers: int | None = None
    label: str = "shard"
    _pool: Any = field(default=None, init=False, repr=False)
    _client: Any = field(default=None, init=False, repr=False)
    _cluster: Any = field(default=None, init=False, repr=False)
    _inside: Any = field(default=None, init=False, repr=False)

    @property
    def kind(self) -> str:
        if self._client is not None:
            return "dask"
        return "processes" if self.workers > 1 else "in-process"

    def __enter__(self) -> Executor:
        if self.dask_address or self.dask_workers:
            self._connect()
        elif _on_dask_worker():
            from distributed import worker_client

            self._inside = worker_client()  # leaves the worker's thread free for our shards
            self._client = self._inside.__enter__()
        return self

    def _connect(self) -> None:
        from distributed import Client

        if self.dask_address:
            try:
                self._client = Client(self.dask_address, timeout="30s", set_as_default=False)
            except OSError as error:
                raise ValueError(
                    f"no Dask scheduler answers at {self.dask_address} ({error}); start one with "
                    "`dask scheduler` or drop --dask-address"
                ) from None
            return
        from distributed import LocalCluster

        self._cluster = LocalCluster(
            n_workers=self.dask_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            host="127.0.0.1",
        )
        self._client = Client(self._cluster, set_as_default=False)

    def __exit__(self, *exc: Any) -> None:
        if self._client is None and self._pool is None:
            release_state()  # in this process: the models go with the run
        if self._pool is not None:
            processes = list((getattr(self._pool, "_processes", None) or {}).values())
            self._pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.terminate()
            self._pool = None
        if self._inside is not None:
            self._inside.__exit__(*exc)
        elif self._client is not None:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()
        self._client = self._cluster = self._inside = None

    def describe(self) -> str:
        """Where the shards run, for the manifest: 'in-process x1', 'processes x4', 'dask x8'."""
        return f"{self.kind} x{self.capacity()}"

    def capacity(self) -> int:
        """Shards that can run at once."""
        if self._client is not None:
            threads = self._client.nthreads()
            return max(1, sum(threads.values()))
        return self.workers

    def map(
        self, setup: Setup, task: Callable[[Any, Any], Any], shards: Iterable[tuple[str, Any]]
    ) -> Iterator[Result]:
        """Run TASK on every (name, payload) of SHARDS; results in the order they finish."""
        if self._client is not None:
            yield from self._map_dask(setup, task, shards)
        elif self.workers > 1:
            yield from self._map_local(setup, task, shards)
        else:
            for name, payload in shards:
                yield run_shard(setup, task, name, payload)

    def _map_local(self, setup, task, shards) -> Iterator[Result]:
        limit = PER_WORKER * self.workers
        shards = iter(shards)
        pending: dict[concurrent.futures.Future, tuple[str, Any]] = {}
        restarts = 0
        while True:
            while len(pending) < limit:
                item = next(shards, None)
                if item is None:
                    break
                pending[self._local_pool().submit(run_shard, setup, task, *item)] = item
            if not pending:
                return
            done, _ = concurrent.futures.wait(
                pending, return_when=concurrent.futures.FIRST_COMPLETED
            )
            broken = False
            for future in done:
                try:
                    result = future.result()
                except concurrent.futures.process.BrokenProcessPool:
                    broken = True
                    continue
                del pending[future]
                yield result
            if broken:  # a worker died (killed, out of memory): rerun its shards on a new pool
                restarts += 1
                if restarts > LOCAL_RESTARTS:
                    raise RuntimeError(
                        f"{self.label}: local worker processes died {restarts} times "
                        "(out of memory? try fewer --workers or smaller chunks)"
                    )
                items = list(pending.values())
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
                pending = {self._local_pool().submit(run_shard, setup, task, *i): i for i in items}

    def _local_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_local_worker,
            )
        return self._pool

    def _map_dask(self, setup, task, shards) -> Iterator[Result]:
        from distributed import as_completed

        client, token = self._client, uuid.uuid4().hex[:8]
        shards = iter(shards)

        def submit(item: tuple[str, Any]):
            return client.submit(
                run_shard, setup, task, *item, key=f"{self.label}-{item[0]}-{token}", pure=False
            )

        first = []
        for item in shards:
            first.append(submit(item))
            if len(first) >= PER_WORKER * self.capacity():
                break
        if not first:
            return
        finished = as_completed(first, loop=client.loop)
        for future in finished:
            result = future.result()
            future.release()
            yield result
            item = next(shards, None)
            if item is not None:
                finished.add(submit(item))


def _on_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


def executor_for(options: BaseModel, label: str) -> Executor:
    """The executor a stage config asks for (its `workers`, `dask_address`, `dask_workers`)."""
    return Executor(
        workers=getattr(options, "workers", 1),
        dask_address=getattr(options, "dask_address", None),
        dask_workers=getattr(options, "dask_workers", None),
        label=label,
    )
