"""A real Dask cluster for tests: `dask scheduler` and worker processes on 127.0.0.1, stopped by PID."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.prefect_services import ROOT, free_port, start, stop, wait_for


class DaskCluster:
    """`dask scheduler` at a free port plus WORKERS `dask worker` processes (one thread each)."""

    def __init__(self, logs: Path, workers: int = 2) -> None:
        self.logs = logs
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.count = workers
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "3",
        }
        self.scheduler: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []

    def _dask(self) -> str:
        return str(Path(sys.executable).parent / "dask")

    def __enter__(self) -> DaskCluster:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / "scheduler.log"
        self.scheduler = start(
            [
                self._dask(),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--no-dashboard",
            ],
            self.env,
            log,
        )
        wait_for(
            "dask scheduler", lambda: "Scheduler at" in log.read_text(), 120, self.scheduler, log
        )
        for index in range(self.count):
            self.add_worker(index)
        self.wait_workers(self.count)
        return self

    def add_worker(self, index: int) -> subprocess.Popen:
        log = self.logs / f"worker-{index}.log"
        worker = start(
            [
                self._dask(),
                "worker",
                self.address,
                "--nworkers",
                "1",
                "--nthreads",
                "1",
                "--no-dashboard",
                "--host",
                "127.0.0.1",
                "--name",
                f"w{index}",
            ],
            self.env,
            log,
        )
        self.workers.append(worker)
        return worker

    def wait_workers(self, count: int) -> None:
        from distributed import Client

        with Client(self.address, timeout="60s") as client:
            client.wait_for_workers(count, timeout=180)

    def kill_worker(self, worker: subprocess.Popen) -> None:
        """SIGKILL a worker and its nanny (its own process group): no goodbye to the scheduler."""
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)

    def __exit__(self, *exc) -> None:
        for worker in self.workers:
            stop(worker)
        if self.scheduler is not None:
            stop(self.scheduler)
