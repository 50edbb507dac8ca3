"""`t2i train`: rectified-flow training of an SD3 MMDiT on a pre-encoded set (SD3 paper sections 2-3, 5).

The recipe reads top to bottom in `train`: data, model, optimizer, resume, loop, export. Every
random draw is a pure function of (seed, micro-batch index) (`model.train_data`,
`model.objective`), so a run killed at any point and resumed from its last checkpoint reaches
the same weights as one that never stopped.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, SD3Transformer2DModel
from tqdm.auto import tqdm

from curate.stage_runtime import StageRun
from model import rectified_flow as rf
from model.build import (
    build_transformer,
    folder_text_dims,
    load_component,
    load_transformer,
    transformer_config_for,
)
from model.checkpoint import (
    ModuleSubset,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from model.conditioning import TextEncoding
from model.config import TrainConfig
from model.ema import EMA
from model.export import export_pipeline
from model.latent_sampling import decode_latents, sample_latents, save_grid
from model.lora_train import attach_lora, export_trained_lora, make_optimizer
from model.objective import FlowSettings, draw_noise_and_time, training_loss, validation_loss
from model.toolbox import (
    NonFiniteGuard,
    NonFiniteLossError,
    accelerator_released,
    heldout_split,
    make_accelerator,
    nonfinite,
    scheduler_shift,
    write_run_manifest,
)
from model.train_data import BatchPlan, EncodedReader, load_batch

STAGE = "train"
# Options that never change the trained weights: a rerun that differs only in them is skipped.
VOLATILE = ("resume", "checkpoints_total_limit")


# ----------------------------------------------------------------------------- setup helpers


def build_or_load_transformer(config: TrainConfig) -> SD3Transformer2DModel:
    """A fresh MMDiT from --preset (widths read from --model's encoders and VAE), or the
    transformer to continue: --init-from, else --transformer-file, else --model/transformer."""
    model_dir = Path(config.model)
    if config.preset:
        spec = transformer_config_for(config.preset, folder_text_dims(model_dir))
        vae = AutoencoderKL.load_config(model_dir / "vae")
        spec["in_channels"] = spec["out_channels"] = vae["latent_channels"]
        torch.manual_seed(config.seed)
        return build_transformer(spec)
    if config.init_from and config.transformer_file:
        raise ValueError("pass --init-from or --transformer-file, not both")
    if not config.init_from:
        return load_transformer(model_dir, config.variant, torch.float32, config.transformer_file)
    source = Path(config.init_from)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"no transformer at {source}; pass --preset to start a fresh one")
    return SD3Transformer2DModel.from_pretrained(source, torch_dtype=torch.float32)


def check_compatible(transformer: SD3Transformer2DModel, sample: dict) -> None:
    """Fail before training when the encoded set was made with other encoders or another VAE."""
    cfg = transformer.config
    latents, text = sample["latents"], sample["text"]
    problems = []
    if latents.shape[0] != cfg.in_channels:
        problems.append(
            f"latents have {latents.shape[0]} channels, the transformer takes {cfg.in_channels}"
        )
    if text.t5.shape[-1] != cfg.joint_attention_dim:
        problems.append(
            f"T5 width {text.t5.shape[-1]} != joint_attention_dim {cfg.joint_attention_dim}"
        )
    pooled = text.clip_l_pooled.shape[-1] + text.clip_g_pooled.shape[-1]
    if pooled != cfg.pooled_projection_dim:
        problems.append(
            f"pooled CLIP width {pooled} != pooled_projection_dim {cfg.pooled_projection_dim}"
        )
    patches = max(latents.shape[1:]) // cfg.patch_size
    if cfg.pos_embed_max_size and patches > cfg.pos_embed_max_size:
        problems.append(
            f"latents of {tuple(latents.shape[1:])} need {patches} positions > pos_embed_max_size"
        )
    if problems:
        raise ValueError(
            "the encoded set does not fit the model: " + "; ".join(problems)
            + ". Pre-encode with the same --model, or pick a matching --preset."
        )  # fmt: skip


def training_shift(config: TrainConfig, model_dir: Path, latents: torch.Tensor) -> float:
    """--shift; else, continuing a transformer, the base scheduler's own shift (what it was trained
    and is sampled with, 1.0 when its config names none); else, for a fresh --preset model, alpha = sqrt(pixels / 256^2) for the
    set's resolution (Eq. 23), never below 1 (the paper's base schedule is 256^2)."""
    if config.shift is not None:
        return config.shift
    if not config.preset:
        return scheduler_shift(model_dir)
    vae = AutoencoderKL.load_config(Path(model_dir) / "vae")
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return max(1.0, rf.resolution_shift(latents.shape[1] * factor * latents.shape[2] * factor))


def exported_shift(config: TrainConfig, shift: float) -> float | None:
    """The shift to write into the exported scheduler: None (leave it as it was) when continuing
    a transformer without --shift."""
    return shift if config.shift is not None or config.preset else None


def gradient_norm(
    accelerator: Accelerator, transformer: torch.nn.Module, clip: float
) -> torch.Tensor:
    """The global gradient norm, clipped to CLIP when CLIP > 0; stays on the device."""
    if clip > 0:
        return accelerator.clip_grad_norm_(transformer.parameters(), clip)
    grads = [p.grad for p in transformer.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads)


def warmup_schedule(warmup_steps: int):
    """Linear warmup to the full learning rate, then constant (SD3 section 5.1)."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


# ----------------------------------------------------------------------------- evaluation


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
    latents = sample_latents(
        transformer, batch.text, negative, list(range(len(indices))), tuple(batch.latents.shape[1:]),
        steps=config.sample_steps, shift=shift, guidance=config.sample_guidance,
    )  # fmt: skip
    return save_grid(decode_latents(vae, latents), path)


def ema_copy(transformer: torch.nn.Module, ema: EMA) -> torch.nn.Module:
    shadow = copy.deepcopy(transformer)
    ema.copy_to(shadow)
    return shadow.eval()


# ----------------------------------------------------------------------------- the loop


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
    work = output / "training"
    checkpoints = work / "checkpoints"
    resume_from = resolve_resume(checkpoints, config.resume)
    if config.resume is None and list_checkpoints(checkpoints):
        raise FileExistsError(
            f"{checkpoints} already holds checkpoints of an earlier run; pass --resume latest to "
            "continue it, or choose a new output folder"
        )
    accelerator = make_accelerator(config.device, config.mixed_precision, config.grad_accum)
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    if device.type == "cuda" and config.tf32:
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for fp32 work outside autocast

    # Data: a held-out split by id hash, and a deterministic batch plan for the rest.
    train_idx, val_idx = heldout_split(
        reader.ids, config.val_fraction, config.val_max_samples, config.seed
    )
    plan = BatchPlan.for_reader(reader, train_idx, config.batch_size, config.seed)
    first = reader.sample(train_idx[0])
    empty = reader.empty_text() if config.unconditional == "empty" else None
    if empty is not None:
        empty = empty.to(device, torch.float32)

    # Model, EMA, optimizer (AdamW, eps 1e-15 with QK-norm) and warmup.
    transformer = build_or_load_transformer(config)
    check_compatible(transformer, first)
    lora = attach_lora(transformer, config, accelerator.mixed_precision)  # None unless --lora-rank
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    ema = EMA(transformer, config.ema_decay)
    # AdamW (one fused kernel on CPU/CUDA) or 8-bit AdamW, then linear warmup.
    raw_optimizer = make_optimizer(
        transformer.parameters(), config, fused=device.type in ("cpu", "cuda")
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        raw_optimizer, warmup_schedule(config.warmup_steps)
    )
    transformer, optimizer = accelerator.prepare(transformer, raw_optimizer)
    if config.compile:
        accelerator.unwrap_model(transformer).compile()
    # Skip a non-finite step inside the fused kernel (no host sync); fp16's GradScaler does its own.
    skip_in_kernel = (
        isinstance(raw_optimizer, torch.optim.AdamW)
        and bool(raw_optimizer.defaults.get("fused"))
        and accelerator.scaler is None
    )
    # What a checkpoint holds: a LoRA run keeps the adapter's tensors only (the base is --model's).
    weights = (
        ModuleSubset(transformer, lambda key: "lora_" in key) if lora is not None else transformer
    )
    objects = {"model": weights, "optimizer": optimizer, "scheduler": scheduler, "ema": ema}
    shift = training_shift(config, Path(config.model), first["latents"])
    settings = FlowSettings(
        config.density, config.logit_mean, config.logit_std, config.mode_scale, shift, config.weighting,
        config.encoder_drop,
    )  # fmt: skip

    start = 0
    if resume_from is not None:
        start = load_checkpoint(accelerator, resume_from, objects)["step"]
        accelerator.print(f"resumed from {resume_from} at step {start}")
    last_good = str(resume_from) if resume_from else "none (no checkpoint written yet)"

    writer, vae = None, None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(work / "logs"), purge_step=start + 1 if start else None)
        if config.sample_count > 0:
            vae = load_component(config.model, "vae", config.variant).to(device).eval()
    grid_idx = (val_idx or train_idx)[: config.sample_count]
    grid_idx = (
        [i for i in grid_idx if tuple(reader.bucket(i)) == tuple(reader.bucket(grid_idx[0]))]
        if grid_idx
        else []
    )

    def evaluate_and_sample(step: int) -> None:
        model = accelerator.unwrap_model(transformer)
        model.eval()
        if val_idx:
            judged = ema_copy(model, ema) if config.val_ema else model
            losses = evaluate(judged, reader, val_idx, config, device)
            if writer is not None:
                writer.add_scalar("val/loss", losses.mean().item(), step)
                for t, value in zip(config.val_timesteps, losses.tolist(), strict=True):
                    writer.add_scalar(f"val/loss_t{t:.3f}", value, step)
            accelerator.print(
                f"step {step}: validation loss ({'EMA' if config.val_ema else 'raw'} weights) "
                f"{losses.mean().item():.4f} over {len(val_idx)} samples"
            )
        if vae is not None and grid_idx:
            path = sample_grid(
                ema_copy(model, ema), vae, reader, grid_idx, config, shift,
                work / "samples" / f"step-{step:08d}.png",
            )  # fmt: skip
            accelerator.print(f"step {step}: sample grid {path}")
        model.train()

    # Non-finite guard: the step number of the first non-finite loss or gradient norm stays on the
    # device (-1: none yet) and is read only when logging, checkpointing, evaluating or exporting.
    guard = NonFiniteGuard(device)

    def check_finite() -> None:
        bad_step = guard.first_bad_step()
        if bad_step is None:
            return
        js = [
            ((bad_step - 1) * config.grad_accum + k) * world + rank
            for k in range(config.grad_accum)
        ]
        ids = [reader.ids[i] for j in js for i in plan.micro_batch(j)][:4]
        raise NonFiniteLossError(
            f"the loss or its gradient became non-finite at step {bad_step} (micro-batches {js}, samples "
            f"{ids}); the weights were not updated with it. The last good checkpoint is {last_good}. "
            "Lower --lr, check the encoded set for NaN/inf, or try --mixed-precision no, then --resume latest."
        )

    window_loss = torch.zeros((), device=device)
    window_start, window_steps = time.time(), 0
    progress = tqdm(range(start, config.max_steps), initial=start, total=config.max_steps, desc="train",
                    unit="step", disable=not accelerator.is_main_process)  # fmt: skip
    for step in progress:
        step_loss = torch.zeros((), device=device)
        for k in range(config.grad_accum):
            j = (step * config.grad_accum + k) * world + rank  # this process's micro-batch
            batch = load_batch(
                reader, plan.micro_batch(j), j, config.seed, config.synthetic_caption_p
            ).to(device)
            draws = draw_noise_and_time(batch.latents, settings, config.seed, j)
            with accelerator.accumulate(transformer):
                with accelerator.autocast():
                    loss = training_loss(
                        transformer, batch.latents, batch.text, draws, settings, empty
                    )
                step_loss += loss.detach().float() / config.grad_accum
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    norm = gradient_norm(accelerator, transformer, config.grad_clip)
                    bad = nonfinite(step_loss, norm, accelerator=accelerator)  # same on every process
                    if skip_in_kernel:
                        raw_optimizer.found_inf = bad.to(torch.float32)
                    elif bad.item():  # no fused kernel to skip in: stop before the step
                        guard.record(bad, step + 1)
                        check_finite()
                    guard.record(bad, step + 1)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if skip_in_kernel:
            del raw_optimizer.found_inf
        window_loss += step_loss
        scheduler.step()
        ema.update(accelerator.unwrap_model(transformer))
        done = step + 1
        window_steps += 1

        if done % config.log_every == 0 or done == config.max_steps:
            check_finite()
            rate = window_steps / max(time.time() - window_start, 1e-9)
            mean_loss, lr = window_loss.item() / window_steps, scheduler.get_last_lr()[0]
            if writer is not None:
                writer.add_scalar("train/loss", mean_loss, done)
                writer.add_scalar("train/lr", lr, done)
                writer.add_scalar("train/steps_per_s", rate, done)
            if accelerator.is_main_process:
                progress.write(
                    f"step {done}/{config.max_steps}  loss {mean_loss:.4f}  lr {lr:.2e}  {rate:.2f} steps/s"
                )
            window_loss.zero_()
            window_start, window_steps = time.time(), 0
        if done < config.max_steps and (
            (config.val_every and done % config.val_every == 0)
            or (config.sample_every and done % config.sample_every == 0)
        ):
            check_finite()
            evaluate_and_sample(done)
        if config.checkpoint_every and done % config.checkpoint_every == 0:
            check_finite()
            last_good = str(
                save_checkpoint(
                    accelerator,
                    checkpoints,
                    done,
                    {"shift": shift},
                    config.checkpoints_total_limit,
                    objects,
                )  # fmt: skip
            )
    progress.close()
    check_finite()

    # Final evaluation and export (EMA weights by default).
    evaluate_and_sample(config.max_steps)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(transformer)
        if lora is not None:  # the EMA's LoRA matrices, without copying the frozen base
            export_trained_lora(model, output, config, ema if config.export_ema else None)
        else:
            final = ema_copy(model, ema) if config.export_ema else model
            export_pipeline(
                Path(config.model), final, output, exported_shift(config, shift), config.variant
            )
        (work / "train_config.json").write_text(json.dumps(config.model_dump(), indent=2))
        counts = {"train": len(train_idx), "validation": len(val_idx), "steps": config.max_steps}
        epochs = math.ceil(config.max_steps * config.grad_accum * world / plan.batches_per_epoch)
        extra = {
            "shift": shift,
            "t5_length": int(first["text"].t5.shape[-2]),
            "unconditional": config.unconditional,
            "batches_per_epoch": plan.batches_per_epoch,
            "epochs": epochs,
        }
        write_run_manifest(output, STAGE, config, counts, extra, started, run, input_fingerprint)
        writer.close()
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
