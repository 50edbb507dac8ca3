"""`t2i dpo`: rank-128 LoRA Diffusion-DPO on a rectified-flow SD3 transformer.

Recipe (step comments read top to bottom):
  1. ingest the preferences (unless PREFS already is a preference table) and pre-encode every pair
     into the pre-encoding stage's shard format (dpo/encode.py), read back batch by batch;
  2. freeze the transformer and attach the LoRA (or continue --init-lora); the reference is the
     same network, adapter off;
  3. each step: draw pairs, one t (training density) and one noise per pair shared by winner and
     loser, the velocity errors with and without the adapter, the DPO loss (dpo/loss.py);
  4. log metrics, checkpoint through model/checkpoint.py (the LoRA and the optimizer, not the
     frozen base; resume is exact: every step's randomness is a function of seed and step),
     stop cleanly on a non-finite loss;
  5. report held-out implicit accuracy and export the LoRA in diffusers' format.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import SD3Transformer2DModel
from tqdm.auto import tqdm

from curate.runtime.stage_runtime import StageRun
from curate.runtime.store import load_rejected, load_samples
from dpo import selection
from dpo.config import DPOConfig
from dpo.draws import Pairs, draw, split_heldout, step_generator
from dpo.encode import encode_pairs, native_resolution
from dpo.evaluate import evaluate_lora, report_markdown
from dpo.guard import guard_summary, winner_drift_warning
from dpo.init_lora import add_init_lora, check_init_lora
from dpo.inputs import check_off_target, encoded_pairs_dir, eval_captions, resolve_prefs
from dpo.lora import add_lora, export_lora, lora_parameters
from dpo.metrics import METRICS, mean_rows, metric_rows, metrics_until
from dpo.regularizers import draw_preserve, preserve_texts
from dpo.step import dpo_terms, implicit_accuracy, velocity_errors  # noqa: F401 (re-exported)
from model import folders
from model.checkpoint import ModuleSubset, load_checkpoint, resolve_resume, save_checkpoint
from model.conditioning import TextEncoding
from model.folders import parse_dtype
from model.lora_train import lora_alpha
from model.toolbox import (
    NonFiniteLossError,
    accelerator_released,
    autocast_precision,
    make_accelerator,
    nonfinite,
    scheduler_shift,
)
from model.trackers import finish_trackers, log_image, require_trackers, start_trackers

STAGE = "dpo"
# Settings that change neither the trajectory nor the result: a rerun that differs only in these
# continues from the latest checkpoint (a killed run resumes; a finished one extended to more
# steps continues). Checkpoints live in the hidden sibling .OUT.work/, the last one is kept.
NOT_IN_RUN_KEY = (
    "max_steps",
    "log_every",
    "checkpoint_every",
    "resume",
    "save_dtype",
    "eval_captions",
    "offtarget_captions",
    "eval_max_captions",
    "eval_seeds",
    "eval_steps",
    "eval_guidance",
    "scorer",
    "report_to",
)
log = logging.getLogger(__name__)
# Of those, the ones that never change the exported LoRA: a rerun differing only in them is skipped.
VOLATILE = ("resume", "checkpoint_every", "report_to")
TRAIN_ACC_PAIRS = 1024  # the training-set diagnostic reads at most this many pairs, not all of them


def load_transformer(
    model_dir: str | os.PathLike,
    device: str,
    dtype: torch.dtype,
    variant: str | None = None,
    transformer_file: str | None = None,
) -> SD3Transformer2DModel:
    """The base MMDiT of a local diffusers folder (or a Stability single file), frozen (the
    encoders are not loaded)."""
    transformer = folders.load_transformer(model_dir, variant, dtype, transformer_file)
    return transformer.to(device).requires_grad_(False)


def precision_of(config: DPOConfig) -> tuple[str, str]:
    """(autocast precision, frozen base dtype) of a run. 'auto' picks bf16 autocast and a bf16 base
    on a GPU that supports it, so SD3.5 fits a GPU (docs/gpu.md), and fp32 on CPU. An explicit
    16-bit base without autocast also works: the inputs are cast to the base's dtype."""
    precision = autocast_precision(config.mixed_precision, config.device)
    if config.lora_base_dtype != "auto":
        return precision, config.lora_base_dtype
    return precision, precision if precision in ("bf16", "fp16") else "fp32"


def train_lora(
    transformer,
    pairs: Pairs,
    config: DPOConfig,
    work: Path,
    shift: float,
    start_step: int = 0,
    optimizer=None,
    accelerator: Accelerator | None = None,
    checkpoint: Callable[[int], object] | None = None,
    preserve: TextEncoding | None = None,
):
    """The DPO loop over pre-encoded pairs; metrics go to WORK/metrics.jsonl and, as dpo/<name>,
    to ACCELERATOR's trackers (--report-to).

    With ACCELERATOR (transformer and optimizer prepared by it) each process trains on its slice
    of every step's global batch and gradients are averaged across processes; CHECKPOINT(step) is
    called every --checkpoint-every steps.
    """
    optimizer = optimizer or torch.optim.AdamW(
        lora_parameters(transformer), lr=config.lr, weight_decay=config.weight_decay
    )
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    main = accelerator is None or accelerator.is_main_process
    metrics_path = work / METRICS
    window: list[dict[str, float]] = []
    warned = winner_drift_warning(metric_rows(metrics_path)) is not None
    transformer.train()
    for step in tqdm(
        range(start_step, config.max_steps),
        desc="dpo",
        unit="step",
        initial=start_step,
        total=config.max_steps,
        disable=not main,
    ):
        optimizer.zero_grad(set_to_none=True)
        parts = []
        for micro in range(config.grad_accum):  # draws depend on (seed, step, micro) only
            generator = step_generator(config.seed, step * config.grad_accum + micro)
            chosen, t, noise = draw(pairs, config.batch_size, generator, config, shift, rank, world)
            extra = draw_preserve(preserve, len(chosen), generator)  # dpo/regularizers.py
            terms = dpo_terms(transformer, chosen, t, noise, config, preserve=extra)
            if nonfinite(terms.loss.detach(), accelerator=accelerator):
                raise NonFiniteLossError(
                    f"DPO loss is {terms.loss.item()} at step {step + 1} (metrics {terms.metrics()}); "
                    f"stopped before applying it. Checkpoints in {work} hold the last good state: lower "
                    "--lr or --beta (or use --lora-base-dtype fp32) and rerun"
                )
            loss = terms.loss / config.grad_accum
            accelerator.backward(loss) if accelerator is not None else loss.backward()
            parts.append(terms.metrics())
        if accelerator is not None:
            grad_norm = accelerator.clip_grad_norm_(lora_parameters(transformer), config.grad_clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                lora_parameters(transformer), config.grad_clip
            )
        optimizer.step()
        window.append({**mean_rows(parts), "grad_norm": float(grad_norm)})
        if main and ((step + 1) % config.log_every == 0 or step + 1 == config.max_steps):
            row = {"step": step + 1, **mean_rows(window)}
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            if accelerator is not None:
                accelerator.log({f"dpo/{k}": v for k, v in row.items() if k != "step"}, step + 1)
            window = []
            if not warned and (message := winner_drift_warning(metric_rows(metrics_path))):
                warned = True
                log.warning(message)
                tqdm.write(f"warning: {message}")
        if (
            checkpoint is not None
            and (step + 1) % config.checkpoint_every == 0
            and step + 1 < config.max_steps
        ):
            checkpoint(step + 1)
    transformer.eval()
    return optimizer


def checkpoint_objects(transformer, optimizer) -> dict[str, object]:
    """What a DPO checkpoint holds: the LoRA's tensors (not the frozen base: that is --model's,
    unchanged, and can be gigabytes) and the optimizer; model/checkpoint.py adds the RNG."""
    return {"lora": ModuleSubset(transformer, lambda name: "lora_" in name), "optimizer": optimizer}


def run_dpo(prefs: str | os.PathLike, output: str | os.PathLike, config: DPOConfig) -> Path:
    """Train a Diffusion-DPO LoRA on PREFS; OUTPUT gets pytorch_lora_weights.safetensors and metrics."""
    with accelerator_released():
        return _run_dpo(Path(prefs), Path(output).resolve(), config)


def _run_dpo(prefs: Path, output: Path, config: DPOConfig) -> Path:
    if not prefs.exists():
        raise FileNotFoundError(f"preference input {prefs} does not exist")
    require_trackers(config.report_to)  # a missing wandb fails before any work
    if config.init_lora:
        check_init_lora(config.init_lora, config.model)  # a LoRA that does not fit fails first
    selection.check_options(config)
    # a single-file transformer's content, not just its path, picks the base
    reads = {"prefs": prefs, "model": config.model, "transformer_file": config.transformer_file}
    reads["init_lora"] = config.init_lora
    with StageRun(output, STAGE, config, reads, volatile=VOLATILE, accounting=False) as run:
        if run.finished:
            return run.skip()
        return _train_dpo(run, prefs, config)


def _train_dpo(run: StageRun, prefs: Path, config: DPOConfig) -> Path:
    work = run.work_log(ignore=NOT_IN_RUN_KEY).path
    root = work.parent  # the hidden .OUT.work/: the preference table and its encodings
    torch.manual_seed(config.seed)
    precision, base_dtype = precision_of(config)  # bf16 autocast and base on GPUs, fp32 on CPU
    accelerator = make_accelerator(config.device, precision)

    # 1. Preferences, encoded once into the pre-encoding shard format and streamed from disk
    resolution = config.resolution or native_resolution(config.model)
    with accelerator.main_process_first():
        table_dir = resolve_prefs(prefs, root)
        rows = load_samples(table_dir)
        check_off_target(config.offtarget_captions, rows["caption"], config.preserve_captions)
        pairs = encode_pairs(
            config.model,
            table_dir,
            encoded_pairs_dir(root, table_dir, config, resolution),
            resolution,
            config.t5_length,
            device=str(accelerator.device),
            compute_dtype=base_dtype,  # the encoders in 16 bits on a GPU (T5-XXL: 9.5 GB, not 19)
            variant=config.variant,
        )
    train, heldout = split_heldout(pairs, config.heldout_fraction, config.seed)
    shift = config.shift if config.shift is not None else scheduler_shift(config.model)

    # 2. The frozen transformer with a trainable LoRA (fresh, or continuing --init-lora)
    transformer = load_transformer(
        config.model,
        accelerator.device,
        parse_dtype(base_dtype),
        config.variant,
        config.transformer_file,
    )
    if config.init_lora:
        lora_config = add_init_lora(transformer, config.init_lora, config.model, config.seed)
    else:
        alpha = lora_alpha(config)
        lora_config = add_lora(
            transformer, config.lora_rank, alpha, config.lora_targets, config.seed
        )
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(
        lora_parameters(transformer), lr=config.lr, weight_decay=config.weight_decay
    )
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    objects = checkpoint_objects(transformer, optimizer)

    # 3-4. The DPO loop, from the latest checkpoint of this exact run if there is one
    checkpoints = work / "checkpoints"
    resume_from = resolve_resume(checkpoints, config.resume)
    start = load_checkpoint(accelerator, resume_from, objects)["step"] if resume_from else 0
    start_trackers(
        accelerator, config.report_to, work, STAGE, run.output.name, config.model_dump(), start
    )
    if accelerator.is_main_process:
        if resume_from is not None:
            metrics_until(work / METRICS, start)
        elif (work / METRICS).exists():
            (work / METRICS).unlink()
    accelerator.wait_for_everyone()

    def checkpoint(step: int) -> Path:
        return save_checkpoint(accelerator, checkpoints, step, {}, keep=1, objects=objects)

    # --select-every N: pause every N steps to evaluate the LoRA so far (dpo/selection.py)
    preserve = preserve_texts(config, accelerator.device)  # --preserve-captions, encoded once
    evaluated = config.model_copy(update={"lora_base_dtype": base_dtype})  # 'auto' resolved
    picker = selection.Picker.of(work, evaluated, eval_captions(config, rows, heldout or train))
    if (begin := start) < config.max_steps:
        for stop in selection.stops(start, config.max_steps, config.select_every):
            leg = config.model_copy(update={"max_steps": stop})
            train_lora(
                transformer,
                train,
                leg,
                work,
                shift,
                begin,
                optimizer,
                accelerator,
                checkpoint,
                preserve,
            )
            begin = stop
            if picker:
                picker.evaluate(accelerator, transformer, lora_config, stop)
        checkpoint(config.max_steps)
    accelerator.wait_for_everyone()
    transformer = accelerator.unwrap_model(transformer)
    chosen = picker.pick(transformer) if picker is not None else None

    # 5. Held-out accuracy and the diffusers-format LoRA (main process)
    if accelerator.is_main_process:
        summary = {
            "train_pairs": len(train),
            "heldout_pairs": len(heldout) if heldout else 0,
            "heldout_implicit_acc": implicit_accuracy(transformer, heldout, config, shift)
            if heldout
            else None,
            "train_implicit_acc": implicit_accuracy(
                transformer,
                train.subset(list(range(min(len(train), TRAIN_ACC_PAIRS)))),
                config,
                shift,
                draws=1,
            ),
            "resolution": resolution,
            "shift": shift,
            "resumed_from_step": start,
            "processes": accelerator.num_processes,
            "init_lora": config.init_lora,
            "lora_rank": lora_config.r,
            "lora_alpha": lora_config.lora_alpha,
            "lora_parameters": sum(p.numel() for p in lora_parameters(transformer)),
            "guard": guard_summary(metric_rows(work / METRICS)),
            "selection": chosen,
            "preserve_captions": len(config.preserve_captions) if config.preserve_weight else 0,
        }
        with run.writer() as writer:
            export_lora(transformer, lora_config, writer.path, config.save_dtype)
            shutil.copy(work / METRICS, writer.path / METRICS)
            # 6. Base vs LoRA samples for held-out captions and fixed seeds (dpo/evaluate.py)
            captions = eval_captions(config, rows, heldout or train)
            if config.eval_seeds and (captions or config.offtarget_captions):
                evaluation = evaluate_lora(evaluated, writer.path, captions, accelerator.device)
                summary["sample_eval"] = asdict(evaluation)
                for grid in evaluation.grids:  # base left, LoRA right
                    log_image(accelerator, Path(grid).stem, writer.path / grid, config.max_steps)
                if evaluation.win_rate is not None:
                    summary["sample_win_rate"] = evaluation.win_rate
                summary["worst_off_target"] = evaluation.worst_off_target
            final = ("heldout_implicit_acc", "train_implicit_acc", "sample_win_rate")
            scalars = {f"dpo/{k}": summary[k] for k in final if summary.get(k) is not None}
            accelerator.log(scalars, step=config.max_steps)
            finish_trackers(accelerator, work, writer.path)  # OUT/logs (and OUT/wandb) complete
            (writer.path / "summary.json").write_text(json.dumps(summary, indent=2))
            (writer.path / "report.md").write_text(report_markdown(summary))
            # the ingest's rejections, then images the encoder could not encode (`<pair id>.w` / `.l`)
            writer.write_rejected([*load_rejected(table_dir), *load_rejected(pairs.directory)])
            writer.counts.update(
                {
                    "pairs": len(pairs),
                    "train": summary["train_pairs"],
                    "heldout": summary["heldout_pairs"],
                }
            )
            writer.extra.update(summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run.output
