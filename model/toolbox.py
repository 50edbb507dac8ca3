"""The training toolbox `t2i train` and `t2i dpo` share: one piece of code per idea of a run.

The accelerator and its process-wide state, the base model's timestep shift, the held-out split,
the timestep draw, the non-finite guard and the manifest of a run written in place.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from curate.runtime.options import resolve_device
from curate.runtime.seeds import seed_unit
from curate.runtime.store import Manifest, library_versions

# FlowMatchEulerDiscreteScheduler's own default: what a scheduler config without `shift` samples with.
SCHEDULER_DEFAULT_SHIFT = 1.0


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite; training stopped before applying that step.

    A ValueError, so the command line reports it as a one-line error with its advice.
    """


# ----------------------------------------------------------------------------- the accelerator


def autocast_precision(precision: str, device: str | None) -> str:
    """--mixed-precision resolved: auto = bf16 on a GPU that supports it, else no autocast."""
    if precision != "auto":
        return precision
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported() and device != "cpu"
    return "bf16" if gpu_bf16 else "no"


def make_accelerator(
    device: str | None, mixed_precision: str = "no", grad_accum: int = 1
) -> Accelerator:
    """One process per device (launch several with `accelerate launch`): the GPU when --device
    auto finds one (curate/runtime/options.py resolve_device), the CPU when it does not or for cpu."""
    on_cpu = resolve_device(device) == "cpu"
    return Accelerator(
        mixed_precision=autocast_precision(mixed_precision, "cpu" if on_cpu else device),
        gradient_accumulation_steps=grad_accum,
        cpu=on_cpu,
    )


@contextmanager
def accelerator_released() -> Iterator[None]:
    """accelerate keeps a process-wide singleton; clear it on the way out, even on an error, so a
    later stage in the same process (DPO after train) builds its own."""
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


# ----------------------------------------------------------------------------- the base model


def scheduler_shift(model_dir: str | os.PathLike) -> float:
    """The timestep shift alpha (SD3 Eq. 23) that --model's scheduler samples with: its config's
    `shift`, else 1.0, FlowMatchEulerDiscreteScheduler's default for a config that names none."""
    path = Path(model_dir) / "scheduler" / "scheduler_config.json"
    value = json.loads(path.read_text()).get("shift") if path.is_file() else None
    return float(value) if value is not None else SCHEDULER_DEFAULT_SHIFT


# ----------------------------------------------------------------------------- data


def heldout_split(
    ids: list[str], fraction: float, max_count: int | None = None, seed: int = 0
) -> tuple[list[int], list[int]]:
    """(train, held-out) indices of IDS: the ceil(FRACTION * n) ids (at most MAX_COUNT, and never
    all of them) with the lowest hash of (seed, "heldout", id). Membership hangs on the ids, not
    on their order; `t2i train`'s validation set and `t2i dpo`'s held-out pairs both come from here."""
    if not ids:
        raise ValueError("the set is empty: nothing to train on")
    n_held = math.ceil(fraction * len(ids)) if fraction > 0 else 0
    if max_count is not None:
        n_held = min(n_held, max_count)
    n_held = min(n_held, len(ids) - 1)  # always keep one sample to train on
    ranked = sorted(range(len(ids)), key=lambda i: seed_unit(seed, "heldout", ids[i]))
    return sorted(ranked[n_held:]), sorted(ranked[:n_held])


class TimestepDensity(Protocol):
    density: str
    logit_mean: float
    logit_std: float
    mode_scale: float


def draw_timesteps(
    options: TimestepDensity, batch: int, shift: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[batch] training timesteps in (0, 1) from the configured density (SD3 section 3.1, Eq. 19-21),
    then shifted by SHIFT (Eq. 23); on the CPU so every device and resume draws the same numbers."""
    from model.rectified_flow import sample_timesteps

    return sample_timesteps(
        batch,
        options.density,
        m=options.logit_mean,
        s=options.logit_std,
        mode_scale=options.mode_scale,
        shift=shift,
        generator=generator,
    )


# ----------------------------------------------------------------------------- non-finite guard


def nonfinite(*values: torch.Tensor, accelerator: Accelerator | None = None) -> torch.Tensor:
    """A 0-d bool tensor on the values' device: True when any of VALUES is NaN or infinite on any
    process (so every process skips, or stops at, the same step). No host sync."""
    bad = torch.zeros((), dtype=torch.bool, device=values[0].device)
    for value in values:
        bad = bad | ~torch.isfinite(value).all()
    if accelerator is not None and accelerator.num_processes > 1:
        bad = accelerator.reduce(bad.to(torch.float32), "sum") > 0
    return bad


class NonFiniteGuard:
    """The first step whose loss or gradient norm was non-finite, kept on the device (-1: none yet)
    and read only where the loop reads the host anyway (logging, checkpoints, evaluation, export)."""

    def __init__(self, device: torch.device | str) -> None:
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def record(self, bad: torch.Tensor, step: int) -> None:
        self.first.copy_(torch.where(bad & (self.first < 0), step, self.first))

    def first_bad_step(self) -> int | None:
        step = int(self.first.item())
        return step if step >= 0 else None


# ----------------------------------------------------------------------------- the manifest


def write_run_manifest(
    output: Path,
    stage: str,
    config,
    counts: dict[str, int],
    extra: dict[str, Any],
    started: float,
    run=None,
    input_fingerprint: str = "",
) -> Path:
    """The manifest of a run that wrote OUTPUT in place: through the stage contract (config.toml,
    then the manifest) when RUN is a StageRun, else the manifest alone (a direct library call)."""
    if run is not None:
        return run.commit_in_place(counts, extra, time.time() - started)
    Manifest(
        stage=stage,
        parameters=config.model_dump(),
        input_fingerprint=input_fingerprint,
        counts=counts,
        versions=library_versions(),
        wall_time_s=round(time.time() - started, 2),
        extra=extra,
    ).write(output)
    return output
