"""Helpers for tests that need a real Prefect server and `t2i serve` as separate processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from flows.serve import title

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, method: str = "GET", body: Any = None, timeout: float = 30) -> Any:
    """One API call. A 503 (Prefect answers it while its SQLite database is busy, e.g. while
    `t2i serve` registers deployments) is retried a few times; any other error is raised."""
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(5):
        request = urllib.request.Request(
            url, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read().decode()
            return json.loads(text) if text else None
        except urllib.error.HTTPError as error:
            if error.code != 503 or attempt == 4:
                raise
            time.sleep(1 + attempt)


def wait_for(
    what: str,
    check: Callable[[], Any],
    timeout: float,
    process: subprocess.Popen | None = None,
    log: Path | None = None,
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: process exited with {process.returncode}\n{tail}")
        try:
            value = check()
        except (urllib.error.URLError, ConnectionError, OSError):
            value = None
        if value:
            return value
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what}: not ready after {timeout:.0f} s\n{tail}")


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    handle = log.open("w")
    return subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(process: subprocess.Popen) -> None:
    """Stop a process we started, and its children (its own session), by its process group."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


class PrefectServices:
    """`prefect server start` on 127.0.0.1 at a free port (fresh database), then `t2i serve`."""

    def __init__(self, home: Path, workdir: Path, serve_options: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.url}/api"
        self.home = home
        self.workdir = workdir
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(self.port),
            "PREFECT_UI_API_URL": self.api_url,
            "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1",
        }
        self.serve_options = list(serve_options)
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> PrefectServices:
        try:
            return self._start()
        except BaseException:  # a failed start must not leave the server running
            self.__exit__()
            raise

    def _start(self) -> PrefectServices:
        prefect = str(Path(sys.executable).parent / "prefect")
        server_log = self.home / "server.log"
        server = start(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            self.env,
            server_log,
        )
        self.processes.append(server)
        wait_for(
            "prefect server",
            lambda: api(f"{self.api_url}/health", timeout=5) is True,
            180,
            server,
            server_log,
        )
        serve_log = self.home / "serve.log"
        serve = start(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "serve",
                "--workdir",
                str(self.workdir),
                "--name",
                "t2i",
                *self.serve_options,
            ],
            self.env,
            serve_log,
        )
        self.processes.append(serve)
        self.deployment = wait_for(
            "t2i serve",
            lambda: self.read_deployment("end_to_end", title("end_to_end")),
            180,
            serve,
            serve_log,
        )
        self.serve_log = serve_log
        return self

    def __exit__(self, *exc) -> None:
        for process in reversed(self.processes):
            stop(process)

    def read_deployment(self, flow: str, name: str) -> dict | None:
        try:
            path = f"{quote(flow, safe='')}/{quote(name, safe='')}"
            return api(f"{self.api_url}/deployments/name/{path}", timeout=5)
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise

    def flow_run(self, run_id: str) -> dict:
        return api(f"{self.api_url}/flow_runs/{run_id}")

    def wait_finished(self, run_id: str, timeout: float) -> dict:
        def finished():
            run = self.flow_run(run_id)
            return (
                run
                if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
                else None
            )

        return wait_for(f"flow run {run_id}", finished, timeout, log=self.serve_log)

    def artifacts(self, run_id: str) -> list[dict]:
        body = {"artifacts": {"flow_run_id": {"any_": [run_id]}}, "limit": 200}
        return api(f"{self.api_url}/artifacts/filter", "POST", body)

    def task_runs(self, run_id: str) -> list[dict]:
        body = {"flow_runs": {"id": {"any_": [run_id]}}, "limit": 200}
        return api(f"{self.api_url}/task_runs/filter", "POST", body)
