"""Per-prompt sample measures on the shapes task (dpo/shapes_task.py) and one DPO arm from its base.

For fixed held-out sampling seeds, every prompt is sampled by the base and by the LoRA with the
same noise; each sample's colour and shape are read by the task's latent classifiers:
  - the preference prompt ("an image"): the share of samples in the preferred colour (red);
  - each of the 16 class prompts "a {colour} {shape}", none of them in the preference set (four
    name the losing colour, blue): the share of samples in the colour it names (colour accuracy)
    and, as a check the sweep never looks at, in the shape it names.
The off-target criterion is the worst single class prompt's colour-accuracy change, not the mean.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dpo.shapes_task import PREFERRED, ShapesTask, class_prompts
from model.conditioning import TextEncoding

SWEEP_SEEDS = list(range(10_000, 10_048))  # what the sweep and checkpoint selection look at
PROOF_SEEDS = list(range(20_000, 20_048))  # looked at only by the proof at the end


@dataclass
class Sampling:
    steps: int = 10
    guidance: float = 1.0  # the strong base's colour accuracy 0.77 (at 3: 0.99, which hides leaks)
    shift: float = 1.0  # the bases' scheduler shift (64 px: `t2i train` stores 1.0)


@dataclass
class PromptMeasures:
    """What each prompt's samples show, for one model and one set of seeds."""

    preferred_rate: float  # share of GENERIC samples in PREFERRED
    colour: dict[str, float] = field(default_factory=dict)  # class prompt -> colour accuracy
    shape: dict[str, float] = field(default_factory=dict)  # class prompt -> shape accuracy

    @property
    def colour_mean(self) -> float:
        return sum(self.colour.values()) / len(self.colour)

    @property
    def shape_mean(self) -> float:
        return sum(self.shape.values()) / len(self.shape)


def _row(texts: TextEncoding, row: int, n: int) -> TextEncoding:
    return TextEncoding(
        **{k: v[row : row + 1].expand(n, *v.shape[1:]).clone() for k, v in vars(texts).items()}
    )


@torch.no_grad()
def sample_prompt(transformer, task: ShapesTask, row: int, seeds, sampling: Sampling):
    from model.latent_sampling import sample_latents

    return sample_latents(
        transformer,
        _row(task.texts, row, len(seeds)),
        task.empty,
        list(seeds),
        task.latent_shape,
        steps=sampling.steps,
        shift=sampling.shift,
        guidance=sampling.guidance,
    )


def measure_prompts(
    transformer, task: ShapesTask, seeds, sampling: Sampling | None = None
) -> PromptMeasures:
    sampling = sampling or Sampling()
    prompts = class_prompts()
    generic = task.colour_of(sample_prompt(transformer, task, len(prompts), seeds, sampling))
    result = PromptMeasures(sum(c == PREFERRED for c in generic) / len(seeds))
    for row, (caption, colour, shape) in enumerate(prompts):
        latents = sample_prompt(transformer, task, row, seeds, sampling)
        result.colour[caption] = sum(c == colour for c in task.colour_of(latents)) / len(seeds)
        result.shape[caption] = sum(s == shape for s in task.shape_of(latents)) / len(seeds)
    return result


@dataclass
class Change:
    """LoRA minus base, per prompt, on the same seeds."""

    preferred: float
    colour: dict[str, float]
    shape: dict[str, float]

    @classmethod
    def between(cls, base: PromptMeasures, lora: PromptMeasures) -> Change:
        return cls(
            lora.preferred_rate - base.preferred_rate,
            {p: lora.colour[p] - base.colour[p] for p in base.colour},
            {p: lora.shape[p] - base.shape[p] for p in base.shape},
        )

    @property
    def worst_colour(self) -> tuple[str, float]:
        """The off-target prompt whose colour accuracy fell furthest (the selection criterion)."""
        return min(self.colour.items(), key=lambda kv: kv[1])

    @property
    def worst_shape(self) -> tuple[str, float]:
        return min(self.shape.items(), key=lambda kv: kv[1])

    @property
    def largest_colour_move(self) -> float:
        return max(abs(v) for v in self.colour.values())


def base_measures(model_dir, task: ShapesTask, seeds, sampling: Sampling | None = None):
    from dpo.trainer import load_transformer

    return measure_prompts(load_transformer(model_dir, "cpu", torch.float32), task, seeds, sampling)


PRESERVE_SHAPES = ("circle", "square")  # their class prompts may be a --preserve-captions pool


def preserve_pool(task: ShapesTask, pool: str = "shapes") -> TextEncoding:
    """The class prompts of PRESERVE_SHAPES, encoded (rows of task.texts); pool "empty": the
    empty caption alone (`t2i dpo`'s pool without --preserve-captions)."""
    if pool == "empty":
        return TextEncoding.stack([task.empty])
    rows = [k for k, (_, _, shape) in enumerate(class_prompts()) if shape in PRESERVE_SHAPES]
    return TextEncoding(**{k: v[rows] for k, v in vars(task.texts).items()})


def summarise(base: PromptMeasures, lora: PromptMeasures, held_out_only: bool = False) -> dict:
    """Per-prompt changes; HELD_OUT_ONLY: judged on the prompts outside preserve_pool only."""
    if held_out_only:
        keep = [c for c, _, shape in class_prompts() if shape not in PRESERVE_SHAPES]
        base, lora = (
            PromptMeasures(
                m.preferred_rate, {c: m.colour[c] for c in keep}, {c: m.shape[c] for c in keep}
            )
            for m in (base, lora)
        )
    change = Change.between(base, lora)
    worst, worst_value = change.worst_colour
    worst_shape, worst_shape_value = change.worst_shape
    return {
        "preferred": lora.preferred_rate,
        "rise": change.preferred,
        "colour_mean_change": lora.colour_mean - base.colour_mean,
        "worst_prompt": worst,
        "worst_colour_change": worst_value,
        "largest_colour_move": change.largest_colour_move,
        "worst_shape_prompt": worst_shape,
        "worst_shape_change": worst_shape_value,
        "shape_mean_change": lora.shape_mean - base.shape_mean,
        "measures": asdict(lora),
    }


def start_arm(model_dir, task: ShapesTask, config, swapped: bool = False):
    """(the base with CONFIG's fresh LoRA, training pairs, held-out pairs) of one arm: the task's
    pairs with true or swapped labels, a quarter held out, everything seeded by config.seed."""
    from dpo.lora import add_lora
    from dpo.trainer import load_transformer, split_heldout
    from model.lora_train import lora_alpha

    torch.manual_seed(config.seed)
    model = load_transformer(model_dir, "cpu", torch.float32)
    add_lora(model, config.lora_rank, lora_alpha(config), config.lora_targets, config.seed)
    train, held = split_heldout(task.swapped() if swapped else task.pairs, 0.25, config.seed)
    return model, train, held


def training_shift(config, sampling: Sampling | None = None) -> float:
    """The scheduler shift DPO draws timesteps with: --shift, else the bases' own (SAMPLING's)."""
    return (sampling or Sampling()).shift if config.shift is None else config.shift


def run_arm(
    model_dir,
    task: ShapesTask,
    config,
    work,
    base: PromptMeasures,
    seeds=SWEEP_SEEDS,
    eval_at: list[int] | None = None,
    swapped: bool = False,
    sampling: Sampling | None = None,
    preserve: str | None = None,
) -> dict:
    """`t2i dpo`'s loop (dpo.trainer.train_lora) from the base on the task's pairs (true or
    swapped labels), stopping at each of EVAL_AT (default: only the end) to measure every prompt.
    The loop's randomness is a function of (seed, step), so stopping does not change the run."""
    from dpo.guard import guard_summary
    from dpo.metrics import METRICS, metric_rows
    from dpo.trainer import implicit_accuracy, train_lora

    clock = time.monotonic()
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / METRICS).unlink(missing_ok=True)
    model, train, held = start_arm(model_dir, task, config, swapped)
    shift = training_shift(config, sampling)
    evals, optimizer, start = [], None, 0
    for stop in eval_at or [config.max_steps]:
        leg = config.model_copy(update={"max_steps": stop})
        pool = preserve_pool(task, preserve) if preserve else None
        optimizer = train_lora(model, train, leg, work, shift, start, optimizer, preserve=pool)
        start = stop
        measures = measure_prompts(model, task, seeds, sampling)
        evals.append(
            {
                "step": stop,
                **summarise(base, measures),
                "held_out": summarise(base, measures, held_out_only=True),
            }
        )
    return {
        "evals": evals,
        "heldout_implicit_acc": implicit_accuracy(model, held, config, shift),
        "guard": guard_summary(metric_rows(work / METRICS)),
        "seconds": round(time.monotonic() - clock, 1),
    }


def verdict(dpo: dict, swapped: dict, tolerance: float = 0.05) -> dict:
    """The issue-20 criteria on one task: rise >= 0.2, the swapped control falls >= 0.2, and no
    judged class prompt's colour accuracy more than TOLERANCE below the base (a prompt that stops
    obeying its colour). Rises are reported beside it (`largest_colour_move`), not judged: they
    are prompts that obey their colour more often than the base did."""
    return {
        "rise_ok": dpo["rise"] >= 0.2,
        "control_ok": -swapped["rise"] >= 0.2,
        "no_prompt_dropped": dpo["worst_colour_change"] >= -tolerance,
        "control_no_prompt_dropped": swapped["worst_colour_change"] >= -tolerance,
        "largest_move": dpo["largest_colour_move"],
    }


def run_proof(
    model_dir,
    task: ShapesTask,
    config,
    work,
    seeds=PROOF_SEEDS,
    sampling=None,
    pool="shapes",
    eval_at=None,
) -> dict:
    """Base, DPO and swapped-label control at CONFIG on SEEDS; with --preserve-weight the pool
    is the circle and square prompts and the verdict reads the triangle and cross prompts."""
    preserve = pool if config.preserve_weight > 0 else None
    base = base_measures(model_dir, task, seeds, sampling)
    arms = {
        name: run_arm(
            model_dir,
            task,
            config,
            Path(work) / name,
            base,
            seeds,
            eval_at,
            swap,
            sampling,
            preserve,
        )
        for name, swap in (("dpo", False), ("swapped", True))
    }
    held = preserve == "shapes"  # judged on the prompts outside the pool
    judged = {n: a["evals"][-1]["held_out"] if held else a["evals"][-1] for n, a in arms.items()}
    return {
        "base": asdict(base),
        **arms,
        "judged": judged,
        "verdict": verdict(judged["dpo"], judged["swapped"]),
    }


def toy_table(base: dict, lora: dict) -> str:
    """Markdown: each class prompt's colour and shape accuracy, base -> LoRA, worst change first."""
    rows = sorted(base["colour"], key=lambda p: lora["colour"][p] - base["colour"][p])
    lines = [
        "| prompt | colour acc. base | LoRA | change | shape acc. base -> LoRA |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in rows:
        change = lora["colour"][p] - base["colour"][p]
        lines.append(
            f"| {p} | {base['colour'][p]:.3f} | {lora['colour'][p]:.3f} | {change:+.3f} | "
            f"{base['shape'][p]:.2f} -> {lora['shape'][p]:.2f} |"
        )
    return "\n".join(lines) + "\n"
