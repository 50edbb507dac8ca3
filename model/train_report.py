"""What a `t2i train` run reports while it trains: the console line and the --report-to trackers'
scalars (model/trackers.py), the validation loss at a fixed timestep grid and the sample grid of
held-out captions."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from accelerate import Accelerator

from model.conditioning import TextEncoding
from model.config import TrainConfig
from model.ema import EMA
from model.folders import load_component
from model.latent_sampling import decode_latents, sample_latents, save_grid
from model.objective import validation_loss
from model.trackers import finish_trackers, log_image, start_trackers
from model.train_data import BatchPlan, EncodedReader, load_batch
from model.train_model import ema_copy


def evaluate(
    transformer, reader: EncodedReader, val: list[int], config: TrainConfig, device
) -> torch.Tensor:
    """Validation loss at the fixed timestep grid, averaged over the held-out samples."""
    plan = BatchPlan.for_reader(reader, val, config.batch_size, config.seed)
    totals, count = torch.zeros(len(config.val_timesteps)), 0
    for indices in plan.epoch_batches(0):
        batch = load_batch(reader, indices, 0, config.seed, p_synthetic=0.0).to(device)
        losses = validation_loss(
            transformer, batch.latents, batch.text, batch.ids, config.val_timesteps, config.seed
        )
        totals += losses.float().cpu() * len(indices)
        count += len(indices)
    return totals / count


def sample_grid(
    transformer, vae, reader: EncodedReader, indices: list[int], config: TrainConfig, shift, path
):
    """PNG grid: the same held-out captions and seeds at every call."""
    batch = load_batch(reader, indices, 0, config.seed, p_synthetic=0.0)
    negative = reader.empty_text()
    if config.unconditional == "zeros":
        negative = TextEncoding(
            **{k: v if k == "t5_mask" else torch.zeros_like(v) for k, v in vars(negative).items()}
        )
    seeds, size = list(range(len(indices))), tuple(batch.latents.shape[1:])
    latents = sample_latents(
        transformer,
        batch.text,
        negative,
        seeds,
        size,
        steps=config.sample_steps,
        shift=shift,
        guidance=config.sample_guidance,
    )
    return save_grid(decode_latents(vae, latents), path)


class TrainReport:
    """The run's trackers (--report-to), its console line every --log-every steps, and the
    validation loss and sample grid of `evaluate(step)`."""

    def __init__(
        self,
        accelerator: Accelerator,
        reader: EncodedReader,
        config: TrainConfig,
        work: Path,
        val_idx: list[int],
        train_idx: list[int],
        shift: float,
        start: int,
    ) -> None:
        self.accelerator, self.reader, self.config, self.work = accelerator, reader, config, work
        self.val_idx, self.shift = val_idx, shift
        self.vae = None
        run_name = work.parent.name  # the output folder
        start_trackers(
            accelerator, config.report_to, work, "train", run_name, config.model_dump(), start
        )
        if accelerator.is_main_process and config.sample_count > 0:
            self.vae = load_component(config.model, "vae", config.variant)
            self.vae = self.vae.to(accelerator.device).eval()
        # The grid's captions: held-out ones (else training ones) of the first one's bucket.
        grid = (val_idx or train_idx)[: config.sample_count]
        bucket = tuple(reader.bucket(grid[0])) if grid else None
        self.grid_idx = [i for i in grid if tuple(reader.bucket(i)) == bucket]
        self.window_loss = torch.zeros((), device=accelerator.device)
        self.window_start, self.window_steps = time.time(), 0

    def add(self, step_loss: torch.Tensor) -> None:
        """One optimizer step's mean loss into the logging window (stays on the device)."""
        self.window_loss += step_loss
        self.window_steps += 1

    def log(self, done: int, lr: float, progress) -> None:
        """The window's mean loss, the learning rate and steps/s as scalars and a console line."""
        rate = self.window_steps / max(time.time() - self.window_start, 1e-9)
        mean_loss = self.window_loss.item() / self.window_steps
        scalars = {"train/loss": mean_loss, "train/lr": lr, "train/steps_per_s": rate}
        self.accelerator.log(scalars, step=done)
        if self.accelerator.is_main_process:
            progress.write(
                f"step {done}/{self.config.max_steps}  loss {mean_loss:.4f}  lr {lr:.2e}  {rate:.2f} steps/s"
            )
        self.window_loss.zero_()
        self.window_start, self.window_steps = time.time(), 0

    def evaluate(self, transformer: torch.nn.Module, ema: EMA, step: int) -> None:
        """Validation loss (EMA weights unless --no-val-ema; SD3 section 5.3.3: it tracks sample
        quality) and the sample grid of the EMA weights."""
        config, accelerator = self.config, self.accelerator
        model = accelerator.unwrap_model(transformer)
        model.eval()
        if self.val_idx:
            judged = ema_copy(model, ema) if config.val_ema else model
            losses = evaluate(judged, self.reader, self.val_idx, config, accelerator.device)
            scalars = {"val/loss": losses.mean().item()}
            for t, value in zip(config.val_timesteps, losses.tolist(), strict=True):
                scalars[f"val/loss_t{t:.3f}"] = value
            accelerator.log(scalars, step=step)
            accelerator.print(
                f"step {step}: validation loss ({'EMA' if config.val_ema else 'raw'} weights) "
                f"{losses.mean().item():.4f} over {len(self.val_idx)} samples"
            )
        if self.vae is not None and self.grid_idx:
            png = self.work / "samples" / f"step-{step:08d}.png"
            grid = (self.vae, self.reader, self.grid_idx, config, self.shift, png)
            path = sample_grid(ema_copy(model, ema), *grid)
            log_image(accelerator, "samples", path, step)
            accelerator.print(f"step {step}: sample grid {path}")
        model.train()

    def close(self) -> None:
        finish_trackers(self.accelerator, self.work)
