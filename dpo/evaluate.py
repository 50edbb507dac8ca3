"""Sample-level evaluation of a DPO LoRA: base vs LoRA images for held-out captions and fixed
seeds, side by side, and the LoRA's win rate over the base under a scorer.

Sampling goes through the stock diffusers pipeline and the exported LoRA file (model/sampling.py),
so what is judged is exactly what a user loads. A scorer maps (image, caption) to a number:
  - a local CLIP-style preference model folder (PickScore and the like: a `CLIPModel` with its
    tokenizer and image processor saved beside it); score = logit scale x cosine(image, text);
  - `attribute:warm` / `attribute:bright`, the synthetic attribute of `t2i make-prefs`.
The win rate counts, over every (caption, seed), 1 where the LoRA's image scores higher than the
base's image of the same seed, 1/2 on a tie.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
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


def win_rate(base: Sequence[float], lora: Sequence[float]) -> float:
    """Share of paired samples where the LoRA scores higher (ties count one half)."""
    if len(base) != len(lora) or not base:
        raise ValueError("win rate needs as many LoRA scores as base scores, at least one")
    return sum(1.0 if b < a else 0.5 if b == a else 0.0 for b, a in zip(base, lora)) / len(base)


@dataclass
class SampleEval:
    captions: list[str]
    seeds: list[int]
    grids: list[str]  # one image per caption, relative to the output folder: base left, LoRA right
    scorer: str | None
    base_scores: list[list[float]] | None  # [caption][seed]
    lora_scores: list[list[float]] | None
    win_rate: float | None


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
) -> SampleEval:
    """Sample every caption x seed without and with the LoRA in LORA_DIR, write OUTPUT/eval/grid-*.png."""
    from model.build import load_pipeline, parse_dtype
    from model.sampling import (
        generate,
        load_lora,
        side_by_side,
        slug,
        trained_record,
        trained_t5_length,
    )

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
    result = SampleEval(list(captions), list(seeds), grids, scorer, None, None, None)
    if scorer is not None:
        score = load_scorer(scorer, device)
        texts = [p for p, _, _ in base]
        flat_base = score([i for _, _, i in base], texts)
        flat_lora = score([i for _, _, i in lora], texts)
        result.base_scores = [flat_base[k * n : (k + 1) * n] for k in range(len(captions))]
        result.lora_scores = [flat_lora[k * n : (k + 1) * n] for k in range(len(captions))]
        result.win_rate = win_rate(flat_base, flat_lora)
    (folder / "eval.json").write_text(json.dumps(asdict(result), indent=2))
    return result


def _cell(text: str, limit: int | None = 120) -> str:
    """A caption or message as inert one-line markdown (curate/markdown.py)."""
    from curate.markdown import escape

    return escape(text, limit=limit)


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
            lines += [
                f"**Win rate of the LoRA over the base: {evaluation['win_rate']:.2f}** "
                f"({len(evaluation['captions']) * len(seeds)} paired samples, scorer "
                f"`{_cell(evaluation['scorer'])}`; 0.5 = no change).",
                "",
                "| caption | base score (mean) | LoRA score (mean) | LoRA wins |",
                "| --- | --- | --- | --- |",
            ]
            for caption, b, a in zip(
                evaluation["captions"], evaluation["base_scores"], evaluation["lora_scores"]
            ):
                wins = sum(x > y for x, y in zip(a, b))
                lines.append(
                    f"| {_cell(caption)} | {sum(b) / len(b):.4g} | {sum(a) / len(a):.4g} | "
                    f"{wins}/{len(b)} |"
                )
            lines.append("")
        else:
            lines += ["No scorer given (--scorer): compare the images by eye.", ""]
        for caption, grid in zip(evaluation["captions"], evaluation["grids"]):
            lines += [f"**{_cell(caption)}**", "", f"![{_cell(caption)}]({grid})", ""]
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
