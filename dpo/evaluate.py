"""Sample-level evaluation of a DPO LoRA: base vs LoRA images for held-out captions and fixed
seeds, side by side, and the LoRA's win rate over the base under a scorer.

Sampling goes through the stock diffusers pipeline and the exported LoRA file (model/sampling.py),
so what is judged is exactly what a user loads. A scorer maps (image, caption) to a number:
  - a local CLIP-style preference model folder (PickScore and the like: a `CLIPModel` with its
    tokenizer and image processor saved beside it); score = logit scale x cosine(image, text);
  - `attribute:warm` / `attribute:bright`, the synthetic attribute of `t2i make-prefs`.
The win rate counts, over every (caption, seed), 1 where the LoRA's image scores higher than the
base's image of the same seed, 0 where it scores lower; a tie is neither and counts 1/2.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

Scorer = Callable[[Sequence[Image.Image], Sequence[str]], list[float]]
EVAL_DIR = "eval"


def attribute_scorer(attribute: str) -> Scorer:
    from dpo.synthetic import attribute_score

    return lambda images, captions: [attribute_score(image, attribute) for image in images]


def clip_scorer(folder: str | os.PathLike, device: str = "cpu") -> Scorer:
    """PickScore-style: logit_scale * cos(image embedding, caption embedding) from a local folder."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(folder)
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any(
        (folder / n).is_file() for n in ("preprocessor_config.json", "processor_config.json")
    ):
        missing.append("preprocessor_config.json")
    if missing:
        raise FileNotFoundError(
            f"--scorer {folder} lacks {', '.join(missing)}: pass a folder holding a CLIPModel with its "
            "tokenizer and image processor (save the processor of the CLIP it was trained from beside it)"
        )
    model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
    processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)

    @torch.no_grad()
    def score(images: Sequence[Image.Image], captions: Sequence[str]) -> list[float]:
        inputs = processor(
            text=list(captions),
            images=list(images),
            return_tensors="pt",
            padding=True,
            truncation=True,
        )
        inputs = {k: v.to(device) for k, v in inputs.items()}
        out = model(**inputs)  # image_embeds and text_embeds come out unit-normalised
        image, text = out.image_embeds, out.text_embeds
        return (model.logit_scale.exp() * (image * text).sum(-1)).float().cpu().tolist()

    return score


def load_scorer(spec: str, device: str = "cpu") -> Scorer:
    """`attribute:warm`, `attribute:bright`, or a local CLIP-style preference model folder."""
    if spec.startswith("attribute:"):
        attribute = spec.split(":", 1)[1]
        if attribute not in ("warm", "bright"):
            raise ValueError(f"--scorer {spec}: the synthetic attributes are warm and bright")
        return attribute_scorer(attribute)
    if not Path(spec).is_dir():
        raise FileNotFoundError(
            f"--scorer {spec} is neither attribute:warm / attribute:bright nor a local model folder"
        )
    return clip_scorer(spec, device)


def tally(base: Sequence[float], lora: Sequence[float]) -> tuple[int, int, int]:
    """(wins, ties, losses) of the LoRA over the base on paired samples (the same seed)."""
    if len(base) != len(lora) or not base:
        raise ValueError("win rate needs as many LoRA scores as base scores, at least one")
    wins = sum(a > b for b, a in zip(base, lora))
    ties = sum(a == b for b, a in zip(base, lora))
    return wins, ties, len(base) - wins - ties


def win_rate(base: Sequence[float], lora: Sequence[float]) -> float:
    """Share of paired samples where the LoRA scores higher; a tie is neither a win nor a loss
    and counts one half (0.5 = no change)."""
    wins, ties, _ = tally(base, lora)
    return (wins + 0.5 * ties) / len(base)


PREFERENCE, OFF_TARGET = "preference", "off-target"


@dataclass
class SampleEval:
    captions: list[str]
    seeds: list[int]
    grids: list[str]  # one image per caption, relative to the output folder: base left, LoRA right
    scorer: str | None
    base_scores: list[list[float]] | None  # [caption][seed]
    lora_scores: list[list[float]] | None
    win_rate: float | None  # over the preference captions only
    roles: list[str] = field(default_factory=list)  # per caption: PREFERENCE or OFF_TARGET
    worst_off_target: dict | None = None  # worst_off_target(...) of this evaluation


def prompt_changes(evaluation: dict) -> list[dict]:
    """Per caption of an evaluation (SampleEval as a dict): its role, the base's and the LoRA's
    mean score over the fixed seeds, the change (LoRA - base) and the LoRA's wins / ties / losses
    against the base image of the same seed."""
    if not evaluation.get("base_scores"):
        return []
    roles = evaluation.get("roles") or [PREFERENCE] * len(evaluation["captions"])
    rows = []
    for caption, role, b, a in zip(
        evaluation["captions"], roles, evaluation["base_scores"], evaluation["lora_scores"]
    ):
        wins, ties, losses = tally(b, a)
        base, lora = sum(b) / len(b), sum(a) / len(a)
        rows.append(
            {
                "caption": caption,
                "role": role,
                "base": base,
                "lora": lora,
                "change": lora - base,
                "wins": wins,
                "ties": ties,
                "losses": losses,
            }
        )
    return rows


def worst_off_target(evaluation: dict) -> dict | None:
    """The off-target caption whose mean score fell furthest (the largest drop; None without any)."""
    rows = [r for r in prompt_changes(evaluation) if r["role"] == OFF_TARGET]
    return min(rows, key=lambda r: r["change"]) if rows else None


def per_prompt_table(evaluation: dict) -> str:
    """Markdown: one row per caption of an evaluation (SampleEval as a dict, e.g. summary.json's
    `sample_eval`), preference captions first, then the off-target ones from the largest drop
    down; the worst off-target row is marked. Empty without scores."""
    rows = prompt_changes(evaluation)
    if not rows:
        return ""
    worst = worst_off_target(evaluation)
    ordered = [r for r in rows if r["role"] == PREFERENCE] + sorted(
        (r for r in rows if r["role"] == OFF_TARGET), key=lambda r: r["change"]
    )
    lines = [
        "| caption | role | base (mean) | LoRA (mean) | change | LoRA wins / ties / losses |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in ordered:
        is_worst = r["role"] == OFF_TARGET and r["caption"] == worst["caption"]
        mark = " **(worst off-target)**" if is_worst else ""
        lines.append(
            f"| {_cell(r['caption'])}{mark} | {r['role']} | {r['base']:.4g} | {r['lora']:.4g} | "
            f"{r['change']:+.4g} | {r['wins']} / {r['ties']} / {r['losses']} |"
        )
    return "\n".join(lines) + "\n"


def evaluate_samples(
    model_dir: str | os.PathLike,
    lora_dir: str | os.PathLike,
    captions: Sequence[str],
    seeds: Sequence[int],
    output: str | os.PathLike,
    steps: int = 28,
    guidance: float = 7.0,
    scorer: str | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    variant: str | None = None,
    transformer_file: str | os.PathLike | None = None,
    off_target: Sequence[str] = (),
) -> SampleEval:
    """Sample every caption x seed without and with the LoRA in LORA_DIR, write OUTPUT/eval/grid-*.png.

    CAPTIONS are the preference set's (the win rate is theirs); OFF_TARGET captions are outside
    it and are reported per caption (`prompt_changes`), their worst drop on its own."""
    from model.folders import load_pipeline, parse_dtype
    from model.sampling import (
        generate,
        load_lora,
        side_by_side,
        slug,
        trained_record,
        trained_t5_length,
    )

    roles = [PREFERENCE] * len(captions) + [OFF_TARGET] * len(off_target)
    captions = [*captions, *off_target]
    pipe = load_pipeline(model_dir, device, parse_dtype(dtype), variant, transformer_file)
    pipe.set_progress_bar_config(disable=True)
    # Sampled as `t2i sample` would: the T5 length and unconditional input the base trained with.
    options = (
        trained_t5_length(model_dir) or 256,
        trained_record(model_dir).get("unconditional") == "zeros",
    )
    base = generate(pipe, captions, seeds, steps, guidance, None, None, *options)
    load_lora(pipe, str(lora_dir), 1.0)
    lora = generate(pipe, captions, seeds, steps, guidance, None, None, *options)
    del pipe
    folder = Path(output) / EVAL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    n = len(seeds)
    grids = []
    for k, caption in enumerate(captions):
        name = f"{EVAL_DIR}/grid-{k:02d}-{slug(caption)}.png"
        side_by_side(
            [i for _, _, i in base[k * n : (k + 1) * n]],
            [i for _, _, i in lora[k * n : (k + 1) * n]],
        ).save(Path(output) / name)
        grids.append(name)
    result = SampleEval(list(captions), list(seeds), grids, scorer, None, None, None, roles)
    if scorer is not None:
        score = load_scorer(scorer, device)
        texts = [p for p, _, _ in base]
        flat_base = score([i for _, _, i in base], texts)
        flat_lora = score([i for _, _, i in lora], texts)
        result.base_scores = [flat_base[k * n : (k + 1) * n] for k in range(len(captions))]
        result.lora_scores = [flat_lora[k * n : (k + 1) * n] for k in range(len(captions))]
        mine = [k for k, role in enumerate(roles) if role == PREFERENCE] or range(len(captions))
        result.win_rate = win_rate(
            [x for k in mine for x in result.base_scores[k]],
            [x for k in mine for x in result.lora_scores[k]],
        )
        result.worst_off_target = worst_off_target(asdict(result))
    (folder / "eval.json").write_text(json.dumps(asdict(result), indent=2))
    return result


def evaluate_lora(config, lora_dir, captions: Sequence[str], device) -> SampleEval:
    """`evaluate_samples` with a DPOConfig's evaluation options (seeds 0..eval_seeds-1, steps,
    guidance, scorer, off-target captions), the LoRA in LORA_DIR, the grids written there."""
    return evaluate_samples(
        config.model,
        lora_dir,
        captions,
        list(range(config.eval_seeds)),
        lora_dir,
        config.eval_steps,
        config.eval_guidance,
        config.scorer,
        str(device),
        config.lora_base_dtype,
        config.variant,
        config.transformer_file,
        config.offtarget_captions,
    )


def _cell(text: str, limit: int | None = 120) -> str:
    """A caption or message as inert one-line markdown (curate/runtime/markdown.py)."""
    from curate.runtime.markdown import escape

    return escape(text, limit=limit)


def selection_markdown(selection: dict | None) -> list[str]:
    """The report's checkpoint-selection section (dpo/selection.py), one row per evaluated step."""
    if not selection:
        return []
    lines = [
        f"## Checkpoint selection (every {selection['every']} steps)",
        "",
        f"Exported: **step {selection['chosen_step']}**, by the rule: {selection['rule']} "
        f"(tolerance {selection['tolerance']:g}).",
        "",
        "| step | preference gain (mean score change) | win rate | worst off-target caption | "
        "its change |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in selection["candidates"]:
        mark = " **(exported)**" if c["step"] == selection["chosen_step"] else ""
        rate = "-" if c["win_rate"] is None else f"{c['win_rate']:.2f}"
        worst = "-" if c["worst_change"] is None else f"{c['worst_change']:+.4g}"
        lines.append(
            f"| {c['step']}{mark} | {c['gain']:+.4g} | {rate} | "
            f"{_cell(c['worst_caption'] or '-')} | {worst} |"
        )
    if selection.get("warning"):
        lines += ["", f"**Warning:** {_cell(selection['warning'], None)}"]
    return [*lines, ""]


def report_markdown(summary: dict) -> str:
    """The DPO stage's report.md: samples first, the training diagnostics after them."""
    lines = ["# DPO", ""]
    evaluation = summary.get("sample_eval")
    if evaluation:
        seeds = evaluation["seeds"]
        lines += [
            "## Samples: base (left) vs LoRA (right)",
            "",
            f"Held-out captions, seeds {seeds[0]}..{seeds[-1]} (one row per seed), the same "
            "noise for both.",
            "",
        ]
        if evaluation["scorer"]:
            roles = evaluation.get("roles") or [PREFERENCE] * len(evaluation["captions"])
            own = roles.count(PREFERENCE) or len(roles)
            worst = worst_off_target(evaluation)
            lines += [
                f"**Win rate of the LoRA over the base: {evaluation['win_rate']:.2f}** "
                f"({own * len(seeds)} paired samples of the preference captions, scorer "
                f"`{_cell(evaluation['scorer'])}`; 0.5 = no change).",
                "",
                f"**Worst off-target caption: {_cell(worst['caption'])}, mean score "
                f"{worst['base']:.4g} -> {worst['lora']:.4g} ({worst['change']:+.4g})** "
                "(captions outside the preference set, --offtarget-captions; the mean hides "
                "which prompt broke)."
                if worst
                else "No off-target captions (--offtarget-captions): this report cannot show "
                "what the LoRA did to prompts outside the preference set.",
                "",
                per_prompt_table(evaluation),
            ]
        else:
            lines += ["No scorer given (--scorer): compare the images by eye.", ""]
        for caption, grid in zip(evaluation["captions"], evaluation["grids"]):
            lines += [f"**{_cell(caption)}**", "", f"![{_cell(caption)}]({grid})", ""]
    if summary.get("preserve_captions") == 0:
        lines += [
            "**No --preserve-captions:** nothing held the LoRA to the base on prompts outside the "
            "preference set; on the toy tasks of benchmarks/RESULTS.md (issue 20) such a LoRA moved "
            "the colour accuracy of other prompts by up to 0.85. Pass a sample of the base's "
            "training captions.",
            "",
        ]
    lines += selection_markdown(summary.get("selection"))
    guard = summary.get("guard") or {}
    lines += [
        "## Training diagnostics",
        "",
        "These come from the DPO objective itself; they do not show that samples improved.",
        "",
    ]
    acc = summary.get("heldout_implicit_acc")
    lines.append(
        f"- held-out implicit accuracy: {'-' if acc is None else f'{acc:.3f}'} "
        f"({summary.get('heldout_pairs', 0)} pairs; the LoRA ranks them as labelled more "
        "often than the base does)"
    )
    if guard.get("winner_drift") is not None:
        lines.append(
            f"- winners' error vs the reference (err_w - ref_w, last window): "
            f"{guard['winner_drift']:+.4g} (negative = winners likelier)"
        )
        lines.append(f"- losers' error vs the reference: {guard['loser_drift']:+.4g}")
        lines.append(
            f"- saturated pairs (sigmoid of the margin > 0.99): {guard['saturated_frac']:.0%}"
        )
    if guard.get("warning"):
        lines += ["", f"**Warning:** {_cell(guard['warning'], None)}"]
    return "\n".join(lines) + "\n"
