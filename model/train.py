"""`t2i train`: rectified-flow training of an SD3 MMDiT on a pre-encoded set (SD3 paper sections 2-3, 5).

The recipe reads top to bottom in `_train`: accelerator, data, model, optimizer, timesteps, resume,
loop, export. Every random draw is a pure function of (seed, micro-batch index) (`model.train_data`,
`model.objective`), so a run killed at any point and resumed from its last checkpoint reaches the
same weights as one that never stopped. The pieces live beside it: the model a run starts from
and exports (`model.train_model`), one optimizer step behind the non-finite guard
(`model.train_step`), the logs, validation loss and sample grids (`model.train_report`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from curate.runtime.stage_runtime import StageRun
from model.checkpoint import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from model.config import TrainConfig
from model.ema import EMA
from model.lora_train import attach_lora, make_optimizer
from model.objective import FlowSettings, draw_noise_and_time, training_loss
from model.toolbox import (
    accelerator_released,
    heldout_split,
    make_accelerator,
    write_run_manifest,
)
from model.trackers import require_trackers
from model.train_data import BatchPlan, EncodedReader, load_batch
from model.train_model import (
    build_or_load_transformer,
    check_compatible,
    export_trained,
    trained_weights,
    training_shift,
)
from model.train_report import TrainReport
from model.train_step import GuardedStep, micro_batch, nonfinite_stop, warmup_schedule

STAGE = "train"
# Options that never change the trained weights: a rerun that differs only in them is skipped.
VOLATILE = ("resume", "checkpoints_total_limit", "report_to")


def train(
    reader: EncodedReader,
    output: str | Path,
    config: TrainConfig,
    input_fingerprint: str = "",
    run: StageRun | None = None,
) -> Path:
    """Train on READER's samples and write OUTPUT as a diffusers SD3 folder; returns OUTPUT."""
    with accelerator_released():
        return _train(reader, Path(output), config, input_fingerprint, run)


def _train(
    reader: EncodedReader,
    output: Path,
    config: TrainConfig,
    input_fingerprint: str,
    run: StageRun | None = None,
) -> Path:
    started = time.time()
    require_trackers(config.report_to)  # a missing wandb fails before any work
    work = output / "training"
    checkpoints = work / "checkpoints"
    resume_from = resolve_resume(checkpoints, config.resume)
    if config.resume is None and list_checkpoints(checkpoints):
        raise FileExistsError(
            f"{checkpoints} already holds checkpoints of an earlier run; pass --resume latest to "
            "continue it, or choose a new output folder"
        )

    # Setup accelerator: one process per device, bf16 autocast on GPUs that have it.
    accelerator = make_accelerator(config.device, config.mixed_precision, config.grad_accum)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    if device.type == "cuda" and config.tf32:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for fp32 work outside autocast

    # Setup data: a held-out split by id hash, a batch plan that is a function of (seed, j) alone.
    train_idx, val_idx = heldout_split(
        reader.ids, config.val_fraction, config.val_max_samples, config.seed
    )
    plan = BatchPlan.for_reader(reader, train_idx, config.batch_size, config.seed)
    first = reader.sample(train_idx[0])
    # A dropped text encoder becomes its encoding of the empty prompt (or zeros: --unconditional).
    empty = (
        reader.empty_text().to(device, torch.float32) if config.unconditional == "empty" else None
    )

    # Create model: a fresh MMDiT (section 4) or the one to continue, a LoRA on it under
    # --lora-rank, and the EMA of its weights.
    transformer = build_or_load_transformer(config)
    check_compatible(transformer, first)
    lora = attach_lora(transformer, config, accelerator.mixed_precision)  # None unless --lora-rank
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    ema = EMA(transformer, config.ema_decay)

    # Setup optimizer: AdamW (eps 1e-15 with QK-norm, section 5.3.2; one fused kernel on CPU/CUDA)
    # or 8-bit AdamW, then a linear warmup to the full learning rate (section 5.1).
    raw_optimizer = make_optimizer(
        transformer.parameters(), config, fused=device.type in ("cpu", "cuda")
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        raw_optimizer, warmup_schedule(config.warmup_steps, config.lr_schedule, config.max_steps)
    )
    transformer, optimizer = accelerator.prepare(transformer, raw_optimizer)
    if config.compile:
        accelerator.unwrap_model(transformer).compile()

    # Timesteps: the density of section 3.1 (logit-normal(0, 1), Eq. 19) shifted by alpha (Eq. 23).
    shift = training_shift(config, Path(config.model), first["latents"])
    settings = FlowSettings(
        config.density,
        config.logit_mean,
        config.logit_std,
        config.mode_scale,
        shift,
        config.weighting,
        config.encoder_drop,
    )

    # Resume: weights (a LoRA run: the adapter only), optimizer, warmup schedule and EMA.
    objects = {"model": trained_weights(transformer, lora), "optimizer": optimizer}
    objects.update(scheduler=scheduler, ema=ema)
    start = load_checkpoint(accelerator, resume_from, objects)["step"] if resume_from else 0
    if resume_from is not None:
        accelerator.print(f"resumed from {resume_from} at step {start}")
    last_good = str(resume_from) if resume_from else "none (no checkpoint written yet)"
    report = TrainReport(accelerator, reader, config, work, val_idx, train_idx, shift, start)

    def check_finite() -> None:  # stop at the first non-finite step, naming its samples
        bad_step = step_guard.first_bad_step()
        if bad_step is not None:
            js = [
                micro_batch(bad_step - 1, k, config.grad_accum, rank, world)
                for k in range(config.grad_accum)
            ]
            ids = [reader.ids[i] for j in js for i in plan.micro_batch(j)][:4]
            raise nonfinite_stop(bad_step, ids, js, last_good)

    step_guard = GuardedStep(
        accelerator, transformer, optimizer, raw_optimizer, config.grad_clip, check_finite
    )
    steps = range(start, config.max_steps)
    progress = tqdm(
        steps, desc="train", total=config.max_steps, initial=start, unit="step", disable=not main
    )
    for step in progress:
        step_loss = torch.zeros((), device=device)
        for k in range(config.grad_accum):
            j = micro_batch(step, k, config.grad_accum, rank, world)  # this process's micro-batch
            # x0 and the text: the original or the synthetic caption, p = 0.5 each (section 5.2.2)
            batch = load_batch(
                reader, plan.micro_batch(j), j, config.seed, config.synthetic_caption_p
            ).to(device)
            # t from the shifted density, eps ~ N(0, I), each text encoder dropped with p = 0.464
            draws = draw_noise_and_time(batch.latents, settings, config.seed, j)
            with accelerator.accumulate(transformer):
                with accelerator.autocast():
                    # || v(z_t, t) - (eps - x0) ||^2, z_t = (1 - t) x0 + t eps (section 3.1, Eq. 2)
                    loss = training_loss(
                        transformer, batch.latents, batch.text, draws, settings, empty
                    )
                step_loss += loss.detach().float() / config.grad_accum
                accelerator.backward(loss)
                step_guard(step_loss, step + 1)  # clip, skip a non-finite step, AdamW update
        step_guard.end()
        scheduler.step()
        ema.update(accelerator.unwrap_model(transformer))
        report.add(step_loss)
        done = step + 1

        if done % config.log_every == 0 or done == config.max_steps:
            check_finite()
            report.log(done, scheduler.get_last_lr()[0], progress)
        if done < config.max_steps and (
            (config.val_every and done % config.val_every == 0)
            or (config.sample_every and done % config.sample_every == 0)
        ):
            check_finite()
            report.evaluate(transformer, ema, done)
        if config.checkpoint_every and done % config.checkpoint_every == 0:
            check_finite()
            keep = config.checkpoints_total_limit
            saved = save_checkpoint(accelerator, checkpoints, done, {"shift": shift}, keep, objects)
            last_good = str(saved)
    progress.close()
    check_finite()

    # Final evaluation and export (EMA weights by default), then the manifest, last.
    report.evaluate(transformer, ema, config.max_steps)
    accelerator.wait_for_everyone()
    if main:
        export_trained(accelerator.unwrap_model(transformer), ema, lora, output, config, shift)
        (work / "train_config.json").write_text(json.dumps(config.model_dump(), indent=2))
        counts = {"train": len(train_idx), "validation": len(val_idx), "steps": config.max_steps}
        extra = {
            "shift": shift,
            "t5_length": int(first["text"].t5.shape[-2]),
            "unconditional": config.unconditional,
            "batches_per_epoch": plan.batches_per_epoch,
            "epochs": math.ceil(
                config.max_steps * config.grad_accum * world / plan.batches_per_epoch
            ),
        }
        write_run_manifest(output, STAGE, config, counts, extra, started, run, input_fingerprint)
        report.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output


def run_train(encoded: str, output: str, config: TrainConfig) -> Path:
    """`t2i train ENCODED OUTPUT --model DIR`: see flows/cli.py."""
    from model.encoded import EncodedDataset

    reads = {"encoded": encoded, "model": config.model, "init_from": config.init_from}
    reads["transformer_file"] = config.transformer_file
    with StageRun(output, STAGE, config, reads, volatile=VOLATILE, accounting=False) as run:
        if run.finished:
            return run.skip()
        run.invalidate()  # the output is rewritten in place: it must not look finished meanwhile
        return train(EncodedDataset(encoded), output, config, run.input_fingerprint, run)
