"""`make demo`: the whole chain on the offline tiny kit, and what DPO did, measured.

Runs `t2i run-all OUT` (the end_to_end Prefect flow in ephemeral mode): demo data -> curate ->
caption (tiny VLM) -> precompute -> train (few steps) -> warm-tint preference pairs made from
the curated images -> DPO LoRA -> samples with and without the LoRA (loaded through
StableDiffusion3Pipeline.load_lora_weights). The pairs prefer a warm tint, so the chain judges
DPO's held-out samples with the same attribute (`--scorer attribute:warm`): the demo prints the
LoRA's win rate over the base and the per-prompt table from DPO's summary.json, a warning when
the guard saw the winners get worse than the reference, and writes labelled grids (prompt and
seed per row, base left, LoRA right). Rerunning skips every finished stage.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from flows.cli import main as t2i

LABEL_HEIGHT = 14


def lora_effect(samples: Path) -> str | None:
    """Mean absolute pixel difference between samples with and without the LoRA (same seeds)."""
    pairs = _pairs(samples)
    if not pairs:
        return None
    diffs = [
        np.abs(np.asarray(Image.open(a), np.float32) - np.asarray(Image.open(b), np.float32)).mean()
        for a, b in pairs
    ]
    return f"{len(pairs)} image pairs, mean |base - lora| = {np.mean(diffs):.2f} / 255"


def _pairs(samples: Path) -> list[tuple[Path, Path]]:
    pairs = []
    for base in sorted(samples.rglob("base")):
        lora = base.parent / "lora"
        pairs += [
            (p, lora / p.name) for p in sorted(base.glob("*.png")) if (lora / p.name).is_file()
        ]
    return pairs


def labelled_grid(rows: list[tuple[str, Image.Image, Image.Image]], path: Path) -> Path:
    """A grid with a 'base' / 'LoRA' header and each row's label (prompt and seed) above it."""
    font = ImageFont.load_default()
    width = max(b.width for _, b, _ in rows)
    height = max(b.height for _, b, _ in rows)
    grid = Image.new(
        "RGB", (2 * width + 4, LABEL_HEIGHT + len(rows) * (LABEL_HEIGHT + height + 4)), "white"
    )
    draw = ImageDraw.Draw(grid)
    draw.text((2, 1), "base", fill="black", font=font)
    draw.text((width + 6, 1), "LoRA", fill="black", font=font)
    top = LABEL_HEIGHT
    for label, base, lora in rows:
        draw.text((2, top + 1), _fit(draw, label, font, 2 * width), fill="dimgray", font=font)
        grid.paste(base, (0, top + LABEL_HEIGHT))
        grid.paste(lora, (width + 4, top + LABEL_HEIGHT))
        top += LABEL_HEIGHT + height + 4
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """TEXT cut (with '...') to WIDTH pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def sample_grids(out: Path) -> list[Path]:
    """Labelled grids of the end_to_end samples (samples/[seed-N/]base|lora/NNN-prompt-seedS.png)
    and of DPO's held-out evaluation (lora/eval/, from summary.json), under OUT/grids/."""
    written = []
    rows = []
    for base, lora in _pairs(out / "samples"):
        stem = base.stem.split("-", 1)[1]  # NNN-a-red-cat-seed0 -> a-red-cat-seed0
        prompt, _, seed = stem.rpartition("-seed")
        rows.append(
            (f"{prompt.replace('-', ' ')} (seed {seed})", Image.open(base), Image.open(lora))
        )
    if rows:
        written.append(labelled_grid(rows, out / "grids" / "samples.png"))
    summary = _summary(out)
    evaluation = (summary or {}).get("sample_eval") or {}
    for caption, grid_name in zip(evaluation.get("captions", []), evaluation.get("grids", [])):
        grid = Image.open(out / "lora" / grid_name).convert("RGB")
        side = (grid.width - 4) // 2
        seeds = evaluation["seeds"]
        cells = [
            (
                f"{caption} (seed {s})",
                grid.crop((0, k * (side + 4), side, k * (side + 4) + side)),
                grid.crop((side + 4, k * (side + 4), 2 * side + 4, k * (side + 4) + side)),
            )
            for k, s in enumerate(seeds)
        ]
        written.append(labelled_grid(cells, out / "grids" / Path(grid_name).name))
    return written


def _summary(out: Path) -> dict | None:
    path = out / "lora" / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def dpo_lines(summary: dict) -> list[str]:
    """What DPO did, as measured on its held-out samples: the win rate of the LoRA over the base
    under the pairs' own attribute, per prompt, and the guard's word on the winners."""
    from dpo.evaluate import per_prompt_table

    lines = []
    evaluation = summary.get("sample_eval") or {}
    rate = summary.get("sample_win_rate")
    if rate is not None:
        lines.append(
            f"DPO: the LoRA beats the base on {rate:.0%} of held-out samples under "
            f"{evaluation.get('scorer')} (same captions and seeds; 50% = no effect)"
        )
    else:
        lines.append("DPO: no scorer, so no win rate (compare the grids by eye)")
    table = per_prompt_table(evaluation)
    if table:
        lines += ["", "per prompt (mean score over seeds):", table.rstrip()]
    guard = summary.get("guard") or {}
    drift = guard.get("winner_drift")
    if guard.get("warning"):
        lines.append(f"\nWARNING (DPO guard): {guard['warning']}")
    elif drift is not None and drift > 0:
        lines.append(
            f"\nWARNING (DPO guard): at the last logged step the winners were worse than the "
            f"reference (err_w - ref_w = {drift:+.3g}): DPO is pushing losers away more than it "
            "pulls winners closer; with more steps samples may drift (lower --lr or --beta, or "
            "set --dpop-lambda)"
        )
    return lines


def run(out: Path) -> None:
    start = time.monotonic()
    argv = ["run-all", str(out), "--kit", "tiny"]
    print(f"== t2i {' '.join(argv)}", flush=True)
    if t2i(argv) != 0:
        raise SystemExit("demo failed: see the messages above")
    summary = _summary(out)
    if summary is not None:
        print("\n" + "\n".join(dpo_lines(summary)))
    effect = lora_effect(out / "samples")
    if effect:
        print(f"\nLoRA (loaded with load_lora_weights) vs base, same seeds: {effect}")
    grids = sample_grids(out)
    if grids:
        print("labelled grids (base left, LoRA right, prompt and seed per row):")
        for grid in grids:
            print(f"  {grid}")
    print(f"\ndemo finished in {time.monotonic() - start:.0f} s; outputs under {out.resolve()}")


if __name__ == "__main__":
    run(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-out"))
