"""`--report-to`: where `t2i train` and `t2i dpo` send their scalars and sample grids while they run.

Both go through accelerate's trackers (`accelerate.tracking`): TensorBoard event files in the
run's `logs/` folder, and Weights & Biases (optional: `pip install wandb`; `WANDB_MODE=offline`
writes the run to disk for a later `wandb sync`, nothing leaves the machine). `accelerator.log`
is a no-op without trackers, so `--report-to none` costs nothing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from PIL import Image

LOGS = "logs"  # TensorBoard's folder inside a run's work folder
WANDB_PROJECT = "t2i-pipeline"


def tracker_names(report_to: str) -> list[str]:
    return {"all": ["tensorboard", "wandb"], "none": []}.get(report_to, [report_to])


def require_trackers(report_to: str) -> None:
    """Fail in one line, before any work, when a chosen tracker's package is missing."""
    if "wandb" in tracker_names(report_to):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError(
                f"--report-to {report_to} needs Weights & Biases, which is not installed: pip install "
                "wandb (or pip install 't2i-pipeline[wandb]'), or use --report-to tensorboard"
            ) from None


def start_trackers(
    accelerator: Accelerator,
    report_to: str,
    work: Path,
    job: str,
    run_name: str,
    config: dict,
    start_step: int = 0,
) -> None:
    """Start REPORT_TO's trackers for a run whose work folder is WORK: TensorBoard in WORK/logs
    (events past START_STEP, left by a killed run, are dropped), wandb in WORK/wandb as run
    RUN_NAME of job type JOB with CONFIG as its config."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    trackers = []
    for name in tracker_names(report_to):
        if name == "tensorboard":
            purge = {"purge_step": start_step + 1} if start_step else {}
            trackers.append(TensorBoardTracker(LOGS, work, **purge))
        else:
            settings = dict(dir=str(work), job_type=job, name=run_name, config=_flat(config))
            trackers.append(
                WandBTracker(os.environ.get("WANDB_PROJECT", WANDB_PROJECT), **settings)
            )
    # What Accelerator(log_with=...) would hold; set here, once the run's folder and step are known.
    accelerator.log_with = trackers
    accelerator.init_trackers(job)


def log_image(accelerator: Accelerator, tag: str, image: Image.Image | str | Path, step: int):
    """One image (a sample grid) to every tracker, under TAG at STEP."""
    if not accelerator.is_main_process or not accelerator.trackers:
        return
    if not isinstance(image, Image.Image):
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: np.asarray(image)[None]}, step, dataformats="NHWC")
        else:
            tracker.log_images({tag: [image]}, step)


def finish_trackers(accelerator: Accelerator, work: Path, destination: Path | None = None) -> None:
    """Close the trackers (their files complete) and copy WORK's logs/ and wandb/ into DESTINATION
    (a DPO run's work folder is removed once its output is written)."""
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        tracker.finish()
        if tracker.name == "wandb":
            import wandb

            wandb.teardown()  # finish() returns before wandb's service has written the run out
    accelerator.trackers = []  # end_training() finishes what is left: nothing
    if destination is not None:
        for name in (LOGS, "wandb"):
            if (work / name).is_dir():
                shutil.copytree(work / name, destination / name, symlinks=True, dirs_exist_ok=True)


def _flat(config: dict) -> dict:
    """Options as tracker config values: scalars and strings kept, the rest as strings."""
    return {
        k: v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
        for k, v in config.items()
    }
