"""One optimizer step of `t2i train`: the clipped gradient, the non-finite guard and AdamW's update.

A step whose loss or gradient norm is NaN or infinite never reaches the weights: with torch's fused
AdamW the kernel skips it (no host sync; fp16's GradScaler skips its own), otherwise the run stops
before the update. The first such step is kept on the device and read when the loop reads the
host anyway (`first_bad_step`), where `nonfinite_stop` names the step, micro-batches and samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from accelerate import Accelerator

from model.toolbox import NonFiniteGuard, NonFiniteLossError, nonfinite


def micro_batch(step: int, k: int, grad_accum: int, rank: int, world: int) -> int:
    """The index j of process RANK's K-th micro-batch in optimizer step STEP (from 0): the
    processes of a step take consecutive j, so every j is trained on once."""
    return (step * grad_accum + k) * world + rank


def warmup_schedule(warmup_steps: int, decay: str = "constant", max_steps: int = 0):
    """The learning-rate multiplier of optimizer step STEP (from 0): a linear warmup to the full
    rate over WARMUP_STEPS, then constant (SD3 section 5.1), or a cosine / linear decay that
    reaches 0 at MAX_STEPS (short runs end on a settled model)."""

    def multiplier(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant" or max_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
        if decay == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if decay == "linear":
            return 1.0 - progress
        raise ValueError(
            f"unknown learning-rate schedule {decay!r}; choose constant, cosine or linear"
        )

    return multiplier


def gradient_norm(
    accelerator: Accelerator, transformer: torch.nn.Module, clip: float
) -> torch.Tensor:
    """The global gradient norm, clipped to CLIP when CLIP > 0; stays on the device."""
    if clip > 0:
        return accelerator.clip_grad_norm_(transformer.parameters(), clip)
    grads = [p.grad for p in transformer.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads)


class GuardedStep:
    """accelerate's optimizer step behind the non-finite guard. ON_STOP() raises the run's
    NonFiniteLossError; it is called at once when no fused kernel can skip the step."""

    def __init__(
        self,
        accelerator: Accelerator,
        transformer: torch.nn.Module,
        optimizer,
        raw_optimizer: torch.optim.Optimizer,
        grad_clip: float,
        on_stop: Callable[[], None],
    ) -> None:
        self.accelerator, self.transformer, self.optimizer = accelerator, transformer, optimizer
        self.raw_optimizer, self.grad_clip, self.on_stop = raw_optimizer, grad_clip, on_stop
        self.guard = NonFiniteGuard(accelerator.device)
        self.skip_in_kernel = (
            isinstance(raw_optimizer, torch.optim.AdamW)
            and bool(raw_optimizer.defaults.get("fused"))
            and accelerator.scaler is None
        )

    def __call__(self, step_loss: torch.Tensor, step: int) -> None:
        """After a micro-batch's backward: at the last micro-batch of STEP, clip, guard, update."""
        if self.accelerator.sync_gradients:
            norm = gradient_norm(self.accelerator, self.transformer, self.grad_clip)
            bad = nonfinite(step_loss, norm, accelerator=self.accelerator)  # same on every process
            if self.skip_in_kernel:
                self.raw_optimizer.found_inf = bad.to(torch.float32)
            elif bad.item():  # no fused kernel to skip in: stop before the update
                self.guard.record(bad, step)
                self.on_stop()
            self.guard.record(bad, step)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def end(self) -> None:
        """The step is over: the fused kernel's skip flag must not reach the next one."""
        if self.skip_in_kernel:
            del self.raw_optimizer.found_inf

    def first_bad_step(self) -> int | None:
        return self.guard.first_bad_step()


def nonfinite_stop(
    bad_step: int, micro_batch_ids: list[str], micro_batches: list[int], last_good: str
) -> NonFiniteLossError:
    """The one-line error of a run stopped at BAD_STEP, with what to try next."""
    return NonFiniteLossError(
        f"the loss or its gradient became non-finite at step {bad_step} (micro-batches {micro_batches}, "
        f"samples {micro_batch_ids}); the weights were not updated with it. The last good checkpoint "
        f"is {last_good}. Lower --lr, check the encoded set for NaN/inf, or try --mixed-precision no, "
        "then --resume latest."
    )
