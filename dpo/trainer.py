"""`t2i dpo`: rank-128 LoRA Diffusion-DPO on a rectified-flow SD3 transformer.

Recipe (step comments read top to bottom):
  1. ingest the preferences (unless PREFS already is a preference table) and pre-encode every pair;
  2. freeze the transformer and attach the LoRA; the reference is the same network, adapter off;
  3. each step: draw pairs, one t (training density) and one noise per pair shared by winner and
     loser, the velocity errors with and without the adapter, the DPO loss (dpo/loss.py);
  4. log metrics, checkpoint (resume is exact: every step's randomness is a function of seed and
     step), stop cleanly on a non-finite loss;
  5. report held-out implicit accuracy and export the LoRA in diffusers' format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, fields
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from tqdm.auto import tqdm

from curate.store import (
    Manifest,
    StageWriter,
    fingerprint,
    is_done,
    load_rejected,
    load_samples,
    params_hash,
)
from dpo.config import DPOConfig, IngestPrefsConfig
from dpo.encode import EncodedPairs, encode_pairs, native_resolution
from dpo.evaluate import evaluate_samples, report_markdown
from dpo.guard import guard_summary, winner_drift_warning
from dpo.ingest import STAGE as PREFS_STAGE
from dpo.ingest import ingest_prefs
from dpo.lora import (
    add_lora,
    export_lora,
    load_lora_state,
    lora_parameters,
    save_lora_state,
)
from dpo.loss import DPOTerms, diffusion_dpo_loss, noise_equivalent
from model.build import parse_dtype
from model.conditioning import TextEncoding
from model.nonfinite import NonFiniteLossError
from model.objective import flow_loss

STAGE = "dpo"
METRICS = "metrics.jsonl"
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
    "eval_max_captions",
    "eval_seeds",
    "eval_steps",
    "eval_guidance",
    "scorer",
)
log = logging.getLogger(__name__)


def load_transformer(
    model_dir: str | os.PathLike, device: str, dtype: torch.dtype
) -> SD3Transformer2DModel:
    """The base MMDiT of a local diffusers folder, frozen (the encoders are not loaded)."""
    transformer = SD3Transformer2DModel.from_pretrained(
        model_dir, subfolder="transformer", dtype=dtype, local_files_only=True
    )
    return transformer.to(device).requires_grad_(False)


def scheduler_shift(model_dir: str | os.PathLike) -> float:
    """The sampling scheduler's timestep shift (SD3 Eq. 23); 1.0 when the folder names none."""
    path = Path(model_dir) / "scheduler" / "scheduler_config.json"
    return float(json.loads(path.read_text()).get("shift", 1.0)) if path.is_file() else 1.0


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def velocity_errors(transformer, latents, noise, t, text: TextEncoding) -> torch.Tensor:
    """[B] per-sample velocity MSE (model/objective.py), inputs cast to the frozen weights' dtype."""
    dtype = next(p for p in transformer.parameters() if not p.requires_grad).dtype
    return flow_loss(
        transformer, latents.to(dtype), text.to(dtype=dtype), t.to(dtype), noise.to(dtype)
    )


def dpo_terms(
    transformer, pairs: EncodedPairs, t, noise, config: DPOConfig, reference=None
) -> DPOTerms:
    """Winner and loser in one forward batch with shared t and noise; reference = adapter off (or
    a copy). Errors enter the loss in the configured units (dpo/loss.py: noise-equivalent)."""
    device = next(transformer.parameters()).device
    text = pairs.text.to(device)
    both = TextEncoding(
        **{f.name: torch.cat([getattr(text, f.name)] * 2) for f in fields(TextEncoding)}
    )
    latents = torch.cat([pairs.latents_w, pairs.latents_l]).to(device)
    times = torch.cat([t, t]).to(device)
    args = (latents, torch.cat([noise, noise]).to(device), times, both)
    errors = velocity_errors(transformer, *args)
    with torch.no_grad():
        if reference is None:
            transformer.disable_adapters()
            try:
                ref_errors = velocity_errors(transformer, *args)
            finally:
                transformer.enable_adapters()
        else:
            ref_errors = velocity_errors(reference, *args)
    if config.error_units == "noise":
        errors, ref_errors = noise_equivalent(errors, times), noise_equivalent(ref_errors, times)
    n = len(pairs)
    return diffusion_dpo_loss(
        errors[:n],
        errors[n:],
        ref_errors[:n],
        ref_errors[n:],
        config.beta,
        config.dpop_lambda,
        config.sft_weight,
    )


def draw(
    pairs: EncodedPairs, batch: int, generator: torch.Generator, config: DPOConfig, shift: float
):
    """One step's pairs, timesteps and noise, all from this step's generator."""
    n = len(pairs)
    index = (
        torch.randperm(n, generator=generator)[:batch]
        if n >= batch
        else torch.randint(n, (batch,), generator=generator)
    )
    chosen = pairs.select(index)
    t = config.draw_timesteps(batch, shift, generator)
    noise = torch.randn(chosen.latents_w.shape, generator=generator)
    return chosen, t, noise


def split_heldout(
    pairs: EncodedPairs, fraction: float, seed: int
) -> tuple[EncodedPairs, EncodedPairs | None]:
    """Hold out pairs by a hash of (seed, id): stable under reordering and across runs."""

    def score(pair_id: str) -> float:
        return int(hashlib.sha256(f"{seed}:{pair_id}".encode()).hexdigest()[:8], 16) / 2**32

    held = [i for i, pid in enumerate(pairs.ids) if score(pid) < fraction]
    train = [i for i in range(len(pairs)) if i not in set(held)]
    if not train:
        raise ValueError(
            f"--heldout-fraction {fraction} leaves no training pair out of {len(pairs)}"
        )
    return pairs.select(train), (pairs.select(held) if held else None)


@torch.no_grad()
def implicit_accuracy(
    transformer, pairs: EncodedPairs, config: DPOConfig, shift: float, draws: int = 4
) -> float:
    """Fraction of (pair, t, noise) draws where the LoRA prefers the winner more than the reference does."""
    correct, total = 0, 0
    for d in range(draws):
        generator = step_generator(config.seed + 7919, d)
        for start in range(0, len(pairs), config.batch_size):
            chunk = pairs.select(list(range(start, min(start + config.batch_size, len(pairs)))))
            t = config.draw_timesteps(len(chunk), shift, generator)
            noise = torch.randn(chunk.latents_w.shape, generator=generator)
            margin = dpo_terms(transformer, chunk, t, noise, config).margin
            correct += int((margin > 0).sum())
            total += len(chunk)
    return correct / total


def _latest_checkpoint(work: Path) -> Path | None:
    done = sorted(
        work.glob("checkpoint-*/state.json"), key=lambda p: int(p.parent.name.split("-")[1])
    )
    return done[-1].parent if done else None


def _save_checkpoint(work: Path, step: int, transformer, optimizer) -> None:
    tmp = work / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_lora_state(transformer, tmp / "lora.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    os.replace(tmp, work / f"checkpoint-{step}")
    for old in work.glob("checkpoint-*"):
        if old.name != f"checkpoint-{step}":
            shutil.rmtree(old, ignore_errors=True)


def train_lora(
    transformer,
    pairs: EncodedPairs,
    config: DPOConfig,
    work: Path,
    shift: float,
    start_step: int = 0,
    optimizer=None,
):
    """The DPO loop over pre-encoded pairs; writes metrics and checkpoints under WORK."""
    optimizer = optimizer or torch.optim.AdamW(
        lora_parameters(transformer), lr=config.lr, weight_decay=config.weight_decay
    )
    metrics_path = work / METRICS
    window: list[dict[str, float]] = []
    warned = winner_drift_warning(_metric_rows(metrics_path)) is not None
    transformer.train()
    for step in tqdm(
        range(start_step, config.max_steps),
        desc="dpo",
        unit="step",
        initial=start_step,
        total=config.max_steps,
    ):
        optimizer.zero_grad(set_to_none=True)
        parts = []
        for micro in range(config.grad_accum):  # draws depend on (seed, step, micro) only
            generator = step_generator(config.seed, step * config.grad_accum + micro)
            chosen, t, noise = draw(pairs, config.batch_size, generator, config, shift)
            terms = dpo_terms(transformer, chosen, t, noise, config)
            if not torch.isfinite(terms.loss):
                raise NonFiniteLossError(
                    f"DPO loss is {terms.loss.item()} at step {step + 1} (metrics {terms.metrics()}); stopped "
                    f"before applying it. Checkpoints in {work} hold the last good state: lower --lr or --beta "
                    "(or use --base-dtype fp32) and rerun"
                )
            (terms.loss / config.grad_accum).backward()
            parts.append(terms.metrics())
        grad_norm = torch.nn.utils.clip_grad_norm_(lora_parameters(transformer), config.grad_clip)
        optimizer.step()
        window.append({**_mean_rows(parts), "grad_norm": float(grad_norm)})
        if (step + 1) % config.log_every == 0 or step + 1 == config.max_steps:
            row = {"step": step + 1, **_mean_rows(window)}
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            window = []
            if not warned and (message := winner_drift_warning(_metric_rows(metrics_path))):
                warned = True
                log.warning(message)
                tqdm.write(f"warning: {message}")
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.max_steps:
            _save_checkpoint(work, step + 1, transformer, optimizer)
    transformer.eval()
    return optimizer


def _mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def _metric_rows(path: Path) -> list[dict]:
    """The complete rows of a metrics.jsonl; a line torn by a kill mid-write is skipped."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _metrics_until(path: Path, step: int) -> None:
    """Keep the rows logged up to STEP (later ones belong to a run killed after its last
    checkpoint, and a torn last line to a kill mid-write)."""
    if path.is_file():
        rows = [row for row in _metric_rows(path) if row.get("step", 0) <= step]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def resolve_prefs(prefs: Path, work: Path) -> Path:
    """PREFS itself when it is a finished preference table, else its ingest into WORK/prefs."""
    manifest = Manifest.read(prefs) if prefs.is_dir() else None
    if manifest is not None and manifest.stage == PREFS_STAGE:
        return prefs
    return ingest_prefs(prefs, work / "prefs", IngestPrefsConfig())


def eval_captions(config: DPOConfig, rows, pairs: EncodedPairs) -> list[str]:
    """--eval-caption, else the first distinct captions of PAIRS (the held-out ones when any)."""
    if config.eval_captions:
        return list(config.eval_captions)
    by_id = dict(zip(rows["id"], rows["caption"], strict=True))
    distinct = dict.fromkeys(by_id[i] for i in pairs.ids if i in by_id)
    return list(distinct)[: config.eval_max_captions]


def run_dpo(prefs: str | os.PathLike, output: str | os.PathLike, config: DPOConfig) -> Path:
    """Train a Diffusion-DPO LoRA on PREFS; OUTPUT gets pytorch_lora_weights.safetensors and metrics."""
    prefs, output = Path(prefs), Path(output).resolve()
    if not prefs.exists():
        raise FileNotFoundError(f"preference input {prefs} does not exist")
    params = config.model_dump()
    fp = fingerprint(prefs) + ":" + fingerprint(config.model)
    if is_done(output, STAGE, params, fp):
        return output
    run_key = params_hash(
        {k: v for k, v in params.items() if k not in NOT_IN_RUN_KEY} | {"input": fp}
    )
    work = output.parent / f".{output.name}.work" / run_key
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)

    # 1. Preferences and their encodings (the pre-encoding stage's encoders, one at a time)
    table_dir = resolve_prefs(prefs, work)
    dtype = parse_dtype(config.base_dtype)
    resolution = config.resolution or native_resolution(config.model)
    pairs = encode_pairs(
        config.model, load_samples(table_dir), resolution, config.max_sequence_length, config.device
    )
    train, heldout = split_heldout(pairs, config.heldout_fraction, config.seed)
    shift = config.shift if config.shift is not None else scheduler_shift(config.model)

    # 2. The frozen transformer with a trainable LoRA
    transformer = load_transformer(config.model, config.device, dtype)
    lora_config = add_lora(
        transformer, config.rank, config.alpha, config.target_modules, config.seed
    )
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()

    # 3-4. The DPO loop, from the latest checkpoint of this exact run if there is one
    start, optimizer = 0, None
    checkpoint = _latest_checkpoint(work) if config.resume else None
    if checkpoint is not None:
        start = json.loads((checkpoint / "state.json").read_text())["step"]
        load_lora_state(transformer, checkpoint / "lora.safetensors")
        optimizer = torch.optim.AdamW(
            lora_parameters(transformer), lr=config.lr, weight_decay=config.weight_decay
        )
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
        _metrics_until(work / METRICS, start)
    elif (work / METRICS).exists():
        (work / METRICS).unlink()
    if start < config.max_steps:
        optimizer = train_lora(transformer, train, config, work, shift, start, optimizer)
        _save_checkpoint(work, config.max_steps, transformer, optimizer)

    # 5. Held-out accuracy and the diffusers-format LoRA
    summary = {"train_pairs": len(train), "heldout_pairs": len(heldout) if heldout else 0,
               "heldout_implicit_acc": implicit_accuracy(transformer, heldout, config, shift) if heldout else None,
               "train_implicit_acc": implicit_accuracy(transformer, train, config, shift, draws=1),
               "resolution": resolution, "shift": shift, "resumed_from_step": start,
               "lora_parameters": sum(p.numel() for p in lora_parameters(transformer)),
               "guard": guard_summary(_metric_rows(work / METRICS))}  # fmt: skip
    with StageWriter(output, STAGE, params, fp) as writer:
        export_lora(transformer, lora_config, writer.path, config.save_dtype)
        del transformer, optimizer  # the evaluation loads the stock pipeline instead
        shutil.copy(work / METRICS, writer.path / METRICS)
        # 6. Base vs LoRA samples for held-out captions and fixed seeds (dpo/evaluate.py)
        captions = eval_captions(config, load_samples(table_dir), heldout or train)
        if config.eval_seeds and captions:
            seeds = list(range(config.eval_seeds))
            summary["sample_eval"] = asdict(
                evaluate_samples(
                    config.model,
                    writer.path,
                    captions,
                    seeds,
                    writer.path,
                    config.eval_steps,
                    config.eval_guidance,
                    config.scorer,
                    config.device,
                    config.base_dtype,
                )
            )
            if summary["sample_eval"]["win_rate"] is not None:
                summary["sample_win_rate"] = summary["sample_eval"]["win_rate"]
        (writer.path / "summary.json").write_text(json.dumps(summary, indent=2))
        (writer.path / "report.md").write_text(report_markdown(summary))
        writer.write_rejected(load_rejected(table_dir))
        writer.counts.update(
            {
                "pairs": len(pairs),
                "train": summary["train_pairs"],
                "heldout": summary["heldout_pairs"],
            }
        )
        writer.extra.update(summary)
    return output
