"""A real `prefect server start` and `t2i serve`: runs created as the UI creates them, and the UI itself.

Both tests share one server, one `t2i serve` and one working directory: the first run does the
work, the one triggered from the browser finds every stage finished and skips it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from prefect_services import PrefectServices, api

from flows.artifacts import read_scalars
from flows.end_to_end import EndToEndConfig, plan
from flows.serve import title

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RUN_TIMEOUT = 420


@pytest.fixture(scope="module")
def services(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("prefect-home")
    options = (
        "--base-model",
        tiny_model_dir,
    )  # the session's tiny SD3 kit, built once for all tests
    with PrefectServices(home, tmp_path_factory.mktemp("runs") / "work", options) as running:
        yield running


def expected_artifacts(parameters: dict) -> set[str]:
    """Artifact keys a completed end_to_end run must have made, from its plan and its outputs."""
    keys = {"end-to-end-progress", "end-to-end-outputs"}
    for name, arguments, _ in plan(EndToEndConfig.model_validate(parameters)):
        if name == "sample":
            keys.add("sample-gallery")
            continue
        keys.add(f"{name}-report")
        output = Path(arguments["output"])
        if (output / "manifest.json").is_file():
            keys |= {f"{name}-counts", f"{name}-rejections"}
        if read_scalars(output):
            keys.add(f"{name}-metrics")
    return keys


def test_end_to_end_run_created_through_the_rest_api_completes_with_all_artifacts(services):
    deployment = services.deployment
    assert deployment["parameters"]["workdir"] == str(services.workdir)
    body = {
        "state": {"type": "SCHEDULED", "message": "Run from the Prefect UI"},
        "parameters": deployment["parameters"],
    }
    run = api(f"{services.api_url}/deployments/{deployment['id']}/create_flow_run", "POST", body)

    finished = services.wait_finished(run["id"], RUN_TIMEOUT)
    assert finished["state"]["type"] == "COMPLETED", finished["state"]["message"]
    artifacts = {a["key"]: a for a in services.artifacts(run["id"]) if a["key"]}
    missing = expected_artifacts(deployment["parameters"]) - set(artifacts)
    assert not missing, f"artifacts missing: {sorted(missing)}"
    assert float(artifacts["end-to-end-progress"]["data"]) == 100.0
    stage_progress = [
        k for k, a in artifacts.items() if a["type"] == "progress" and k != "end-to-end-progress"
    ]
    assert stage_progress, "no progress artifact fed by a stage's progress bar"
    assert "data:image/jpeg;base64," in artifacts["sample-gallery"]["data"]
    if "train-metrics" in artifacts:
        assert "loss curve" in artifacts["train-report"]["data"]
    task_names = {t["name"] for t in services.task_runs(run["id"])}
    assert {
        name
        for name, _, _ in plan(EndToEndConfig.model_validate(deployment["parameters"]))
        if name != "sample"
    } <= task_names


def test_end_to_end_triggered_from_the_dashboard_completes_and_is_screenshotted(services, tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), (
        "Debian's chromium is missing: run `bash scripts/test-services.sh`"
    )
    screenshot = Path(os.environ.get("T2I_SCREENSHOT_DIR", tmp_path)) / "end_to_end_completed.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{services.url}/deployments")
        recipe = title("end_to_end")  # listed first, no search needed
        page.get_by_role("link", name=recipe).first.click(timeout=90_000)
        page.get_by_role("button", name="Run", exact=True).click(timeout=90_000)
        page.get_by_text("Quick run").first.click(timeout=30_000)
        dialog = page.get_by_role("dialog")  # the form: workdir is required, so the UI asks
        dialog.get_by_text("workdir").first.wait_for(timeout=30_000)
        with page.expect_response(
            lambda r: r.url.endswith("/create_flow_run") and r.request.method == "POST"
        ) as created:
            dialog.get_by_role("button", name="Run", exact=True).click()
        run = created.value.json()
        assert json.loads(created.value.request.post_data)["parameters"]["workdir"] == str(
            services.workdir
        )

        finished = services.wait_finished(run["id"], RUN_TIMEOUT)
        assert finished["state"]["type"] == "COMPLETED", finished["state"]["message"]
        page.goto(f"{services.url}/runs/flow-run/{run['id']}")
        page.get_by_text("Completed").first.wait_for(timeout=60_000)
        page.get_by_text("Task runs").first.wait_for(timeout=60_000)
        page.wait_for_timeout(3_000)  # the run graph draws after the header
        page.screenshot(path=str(screenshot))
        browser.close()
    assert screenshot.stat().st_size > 10_000
    skipped = [t for t in services.task_runs(run["id"]) if t["state"]["name"] == "Skipped"]
    assert skipped, "the second run over the same workdir should skip finished stages"
