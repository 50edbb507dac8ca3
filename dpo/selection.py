"""Checkpoint selection for `t2i dpo --select-every N`: which of the evaluated LoRAs to export.

Every N steps the LoRA so far is exported and sampled (dpo/evaluate.py) for the preference
captions and the off-target captions with the same fixed seeds as the base; each checkpoint is
then a candidate with two numbers:
  - gain: the mean score change (LoRA - base) over the preference captions' samples;
  - worst: the off-target caption whose mean score fell furthest, and by how much.

The rule (`choose`): among the candidates whose worst off-target change is no lower than
-tolerance, the one with the largest gain (the earliest on a tie); when none keeps every
off-target caption within the tolerance, the one whose worst drop is smallest, with a warning.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from dpo.evaluate import PREFERENCE, prompt_changes, worst_off_target

RULE = (
    "the checkpoint with the largest preference-caption gain among those whose worst off-target "
    "caption fell by at most the tolerance (the earliest on a tie); if none, the smallest worst drop"
)


@dataclass
class Candidate:
    step: int
    gain: float  # mean score change over the preference captions' samples
    win_rate: float | None
    worst_caption: str | None
    worst_change: float | None  # None without off-target captions

    @classmethod
    def of(cls, step: int, evaluation: dict) -> Candidate:
        rows = [r for r in prompt_changes(evaluation) if r["role"] == PREFERENCE]
        gain = sum(r["change"] for r in rows) / len(rows) if rows else 0.0
        worst = worst_off_target(evaluation)
        return cls(
            step,
            gain,
            evaluation.get("win_rate"),
            worst["caption"] if worst else None,
            worst["change"] if worst else None,
        )

    def keeps(self, tolerance: float) -> bool:
        return self.worst_change is None or self.worst_change >= -tolerance


def choose(candidates: list[Candidate], tolerance: float) -> tuple[Candidate, str | None]:
    """The candidate the rule picks, and a warning when none kept the off-target captions."""
    if not candidates:
        raise ValueError("checkpoint selection needs at least one evaluated checkpoint")
    kept = [c for c in candidates if c.keeps(tolerance)]
    if kept:
        return max(kept, key=lambda c: (c.gain, -c.step)), None
    best = max(candidates, key=lambda c: (c.worst_change, -c.step))
    return best, (
        f"no checkpoint kept every off-target caption within {tolerance:g} of the base; exported "
        f"step {best.step}, whose worst ({best.worst_caption!r}) fell {best.worst_change:+.4g}: "
        "lower --lr, raise --beta or --anchor-weight, or stop earlier"
    )


def stops(start: int, max_steps: int, every: int) -> list[int]:
    """The steps at which training pauses for an evaluation (every EVERY steps, and the end)."""
    if not every:
        return [max_steps]
    marks = [s for s in range(every, max_steps, every) if s > start]
    return [*marks, max_steps]


def append(path: Path, candidate: Candidate) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(asdict(candidate)) + "\n")


def load(path: Path, until: int) -> list[Candidate]:
    """The candidates recorded up to step UNTIL (a resumed run keeps its earlier evaluations)."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(Candidate(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            continue
    latest = {c.step: c for c in rows if c.step <= until}  # a re-evaluated step: its last row
    return [latest[s] for s in sorted(latest)]


def check_options(config) -> None:
    """--select-every needs what a checkpoint is judged on (a one-line error before any work)."""
    if config.select_every and not (
        config.scorer and config.offtarget_captions and config.eval_seeds
    ):
        raise ValueError(
            "--select-every needs --scorer, --offtarget-captions and --eval-seeds > 0: a checkpoint "
            "is chosen on the samples of the preference and the off-target captions"
        )


class Picker:
    """Evaluates checkpoints during `t2i dpo` (main process) and restores the chosen one."""

    def __init__(self, work: Path, config, captions: list[str]) -> None:
        self.folder = Path(work) / "selection"
        self.log = Path(work) / "selection.jsonl"
        self.config, self.captions = config, captions

    @classmethod
    def of(cls, work: Path, config, captions: list[str]) -> Picker | None:
        return cls(work, config, captions) if config.select_every else None

    def evaluate(self, accelerator, transformer, lora_config, step: int) -> None:
        """Export and judge the LoRA at STEP (main process; the others wait)."""
        if accelerator.is_main_process:
            self.judge(accelerator.unwrap_model(transformer), lora_config, step, accelerator.device)
        accelerator.wait_for_everyone()

    def judge(self, transformer, lora_config, step: int, device) -> Candidate:
        from safetensors.torch import save_file

        from dpo.evaluate import evaluate_lora
        from dpo.lora import export_lora

        here = self.folder / f"step-{step:07d}"
        here.mkdir(parents=True, exist_ok=True)
        state = {
            k: p.detach().float().cpu().contiguous()
            for k, p in transformer.named_parameters()
            if "lora_" in k
        }
        save_file(state, str(here / "lora-state.safetensors"))
        export_lora(transformer, lora_config, here, "fp32")
        evaluation = evaluate_lora(self.config, here, self.captions, device)
        candidate = Candidate.of(step, asdict(evaluation))
        append(self.log, candidate)
        return candidate

    def pick(self, transformer) -> dict:
        """Load the chosen checkpoint's LoRA into TRANSFORMER; the summary's `selection` entry."""
        import torch
        from safetensors.torch import load_file

        candidates = load(self.log, self.config.max_steps)
        chosen, warning = choose(candidates, self.config.select_tolerance)
        state = load_file(str(self.folder / f"step-{chosen.step:07d}" / "lora-state.safetensors"))
        with torch.no_grad():
            for name, param in transformer.named_parameters():
                if name in state:
                    param.copy_(state[name].to(param))
        return {
            "every": self.config.select_every,
            "tolerance": self.config.select_tolerance,
            "rule": RULE,
            "chosen_step": chosen.step,
            "warning": warning,
            "candidates": [asdict(c) for c in candidates],
        }
