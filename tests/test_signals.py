"""Ctrl-C (SIGINT) and SIGTERM stop every long-running command, and every process it started.

Each test starts the command as a user would (its own session, like a terminal job), waits until
it is busy, notes its process tree, signals the command's process alone, and checks that it
exits within a bounded time with the usual status (130 for SIGINT, 143 for SIGTERM) and that
no process of the noted tree is left. The bound is generous (a busy 2-core box); the point is
that nothing hangs until SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from prefect_services import PrefectServices, api, wait_for

from flows.signals import _alive, descendants

ROOT = Path(__file__).resolve().parents[1]
BOUND_S = 30


def start(argv: list[str], log: Path, **env: str) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen(
        argv,
        cwd=ROOT,
        env=environment,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def signal_and_check(
    process: subprocess.Popen, sig: int, log: Path, tree: dict[int, int] | None = None
) -> dict[int, int]:
    """Send SIG to PROCESS; it must exit within BOUND_S and leave none of its tree alive."""
    tree = {**(tree or {}), **descendants(process.pid)}
    os.kill(process.pid, sig)
    try:
        status = process.wait(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"still running {BOUND_S} s after {sig!r}:\n{log.read_text()[-2000:]}")
    wait_for("children gone", lambda: not _alive(tree), 10)  # a process group may lag
    assert status == 128 + sig, (status, log.read_text()[-2000:])
    return tree


def test_a_command_with_a_child_that_ignores_sigterm_stops_it_too(tmp_path):
    script = tmp_path / "busy.py"
    script.write_text(
        textwrap.dedent(
            """
            import subprocess, sys, time
            from flows.signals import stopping_cleanly
            try:
                with stopping_cleanly():
                    subprocess.Popen(["bash", "-c", "trap '' TERM INT; sleep 600 & wait"])
                    print("ready", flush=True)
                    time.sleep(600)
            except KeyboardInterrupt:
                sys.exit(143)
            """
        )
    )
    log = tmp_path / "busy.log"
    process = start([sys.executable, str(script)], log)
    wait_for("busy", lambda: "ready" in log.read_text(), 60, process, log)
    tree = descendants(process.pid)
    assert len(tree) >= 2  # bash and its sleep
    try:
        signal_and_check(process, signal.SIGTERM, log, tree)
    finally:
        for pid in _alive(tree):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_captioner_stops(sig, tiny_captioner_dir, tmp_path):
    from prefect_services import free_port

    log = tmp_path / "server.log"
    argv = [
        sys.executable,
        "-m",
        "flows.cli",
        "serve-captioner",
        tiny_captioner_dir,
        "--port",
        str(free_port()),
    ]
    process = start(argv, log)
    wait_for("serve-captioner", lambda: "serving" in log.read_text(), 120, process, log)
    signal_and_check(process, sig, log)
    expected = "interrupted" if sig == signal.SIGINT else "terminated"
    assert f"t2i serve-captioner: {expected}" in log.read_text()


def test_run_all_stops_mid_stage_with_prefects_server_and_stages(tmp_path):
    """run-all starts Prefect's ephemeral server (a child process) and runs the stages here."""
    log = tmp_path / "run-all.log"
    argv = [sys.executable, "-m", "flows.cli", "run-all", str(tmp_path / "work"), "--kit", "tiny"]
    process = start(argv, log, PREFECT_HOME=str(tmp_path / "prefect"))
    wait_for("a stage running", lambda: "demo-data: " in log.read_text(), 240, process, log)
    tree = descendants(process.pid)
    assert tree, "run-all has no child process (Prefect's server)"
    signal_and_check(process, signal.SIGTERM, log, tree)
    assert "t2i run-all: terminated" in log.read_text()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_stops_with_a_flow_run_in_progress(sig, tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    home.mkdir()
    options = ("--base-model", tiny_model_dir)
    with PrefectServices(home, tmp_path / "work", options) as services:
        serve = services.processes[-1]
        deployment = services.deployment
        body = {"state": {"type": "SCHEDULED"}, "parameters": deployment["parameters"]}
        url = f"{services.api_url}/deployments/{deployment['id']}/create_flow_run"
        run = api(url, "POST", body)

        def running() -> bool:
            return services.flow_run(run["id"])["state"]["type"] == "RUNNING" and bool(
                descendants(serve.pid)
            )

        wait_for("flow run started", running, 240, serve, services.serve_log)
        time.sleep(3)  # into its first stages
        tree = signal_and_check(serve, sig, services.serve_log)
        assert tree  # the flow run was a child process of `t2i serve`
        text = services.serve_log.read_text()
        assert "Traceback" not in text, text[-3000:]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_train_stops_mid_run(sig, encoded, tiny_model_dir, tmp_path):
    log = tmp_path / "train.log"
    argv = [
        sys.executable,
        "-m",
        "flows.cli",
        "train",
        str(encoded),
        str(tmp_path / "out"),
        "--model",
        tiny_model_dir,
        "--device",
        "cpu",
        "--max-steps",
        "100000",
        "--log-every",
        "1",
        "--batch-size",
        "4",
        "--val-every",
        "0",
        "--sample-every",
        "0",
        "--checkpoint-every",
        "100000",
    ]
    process = start(argv, log)
    wait_for("training steps", lambda: "step 3/" in log.read_text(), 240, process, log)
    signal_and_check(process, sig, log)
    expected = "interrupted" if sig == signal.SIGINT else "terminated"
    assert f"t2i train: {expected}" in log.read_text()
    assert not (
        tmp_path / "out" / "manifest.json"
    ).exists()  # an interrupted run never looks finished
