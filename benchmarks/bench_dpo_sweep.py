"""The issue-20 sweep: DPO settings judged by the worst single off-target prompt (dpo/shapes_proof.py).

Two tasks from dpo/shapes_task.py, the same 4 shapes x 4 colours at 64 px with bases trained by
`t2i train`'s loop for 1,500 steps (`strong`) or 500 steps (`weak`, the leak grows as the base
weakens), cached under --cache. Each run is `t2i dpo`'s loop from the base at the DPOConfig
defaults plus the run's overrides, measured on the sweep seeds at each --eval-at step:

    rise   preferred (red) share of "an image" samples, LoRA minus base
    worst  the class prompt ("a {colour} {shape}", none in the preference set) whose colour
           accuracy fell furthest, and by how much; also the mean, and the shape check

    PYTHONPATH=. python benchmarks/bench_dpo_sweep.py run --task strong --out s.jsonl \\
        --runs "lr=1e-4" "lr=3e-5" "lr=1e-4,anchor=10" --eval-at 100 200 300
    PYTHONPATH=. python benchmarks/bench_dpo_sweep.py table --out s.jsonl

A run is "key=value,..." over: beta, lr, targets (attention | all-linears | both-streams | text-stream | qv),
rank (alpha = rank), dpop, sft, anchor, preserve (weight; the pool is the circle and square
prompts, the run then judged on the triangle and cross prompts; pool=empty: the empty caption),
units (noise | velocity), batch, seed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from dpo.config import ATTENTION_PROJECTIONS, DPOConfig
from dpo.shapes_proof import (
    PROOF_SEEDS,
    SWEEP_SEEDS,
    PromptMeasures,
    Sampling,
    base_measures,
    run_arm,
)
from dpo.shapes_task import BASE_STEPS, build_task

# the default's image-stream projections plus the text stream's of the joint attention
BOTH_STREAMS = ATTENTION_PROJECTIONS + [
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]
TEXT_STREAM = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
TARGET_SETS = {
    "both-streams": BOTH_STREAMS,
    "text-stream": TEXT_STREAM,
    "qv": ["attn.to_q", "attn.to_v"],
}
KEYS = {
    "beta": ("beta", float),
    "lr": ("lr", float),
    "dpop": ("dpop_lambda", float),
    "sft": ("sft_weight", float),
    "anchor": ("anchor_weight", float),
    "preserve": ("preserve_weight", float),
    "units": ("error_units", str),
    "batch": ("batch_size", int),
    "seed": ("seed", int),
}


def overrides(spec: str) -> dict:
    """DPOConfig fields of a run spec "key=value,..." (see the module docstring)."""
    out: dict = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key == "targets":
            out["lora_targets"] = TARGET_SETS.get(value, [value])
        elif key == "rank":
            out["lora_rank"], out["lora_alpha"] = int(value), float(value)
        elif key == "pool":
            out["pool"] = value
        elif key in KEYS:
            name, kind = KEYS[key]
            out[name] = kind(value)
        else:
            raise SystemExit(f"unknown run key {key!r} in {spec!r}")
    return out


def task_base(cache: str, name: str, seeds: list[int], sampling: Sampling):
    """(model folder, task, base measures), the measures cached beside the base."""
    model, task = build_task(cache, name, BASE_STEPS[name])
    path = (
        model.parent / f"measures-{seeds[0]}-{len(seeds)}-{sampling.steps}-{sampling.guidance}.json"
    )
    if path.is_file():
        return model, task, PromptMeasures(**json.loads(path.read_text()))
    base = base_measures(model, task, seeds, sampling)
    path.write_text(json.dumps(asdict(base)))
    return model, task, base


def run(args) -> None:
    seeds = (PROOF_SEEDS if args.proof_seeds else SWEEP_SEEDS)[: args.seeds]
    sampling = Sampling(guidance=args.guidance)
    model, task, base = task_base(args.cache, args.task, seeds, sampling)
    out = Path(args.out)
    done = set()
    if out.is_file():
        done = {json.loads(line)["key"] for line in out.read_text().splitlines() if line.strip()}
    for spec in args.runs:
        for swapped in (False, True) if args.control else (False,):
            key = json.dumps([args.task, spec, args.eval_at, swapped, seeds[0], len(seeds)])
            if key in done:
                continue
            fields = overrides(spec)
            pool = fields.pop("pool", "shapes")
            config = DPOConfig(
                model=str(model), max_steps=max(args.eval_at), eval_seeds=0, **fields
            )
            with tempfile.TemporaryDirectory() as tmp:
                preserve = pool if config.preserve_weight > 0 else None
                arm = run_arm(
                    model, task, config, tmp, base, seeds, args.eval_at, swapped, sampling, preserve
                )
            record = {
                "key": key,
                "task": args.task,
                "spec": spec,
                "swapped": swapped,
                "base": asdict(base),
                **arm,
            }
            with out.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            for e in arm["evals"]:
                if preserve == "shapes":  # judged on the prompts it did not preserve
                    e = {**e, **e["held_out"]}
                print(
                    f"{args.task} {spec or 'defaults'}{' SWAPPED' if swapped else ''} step "
                    f"{e['step']}: rise {e['rise']:+.3f} worst {e['worst_colour_change']:+.3f} "
                    f"({e['worst_prompt']}) mean {e['colour_mean_change']:+.3f} shape-worst "
                    f"{e['worst_shape_change']:+.3f} [{arm['seconds']:.0f}s]",
                    flush=True,
                )


def table(args) -> None:
    rows = [json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]
    print(
        "| task | run | labels | step | red share (base) | rise | judged prompts | worst colour "
        "prompt | its change | largest move | mean change | worst shape change | s |"
    )
    print("| " + " | ".join(["---"] * 13) + " |")
    for r in rows:
        base = r["base"]["preferred_rate"]
        for e in r["evals"]:
            held = "preserve" in r["spec"] and "pool=empty" not in r["spec"]
            j = e["held_out"] if held else e
            print(
                f"| {r['task']} | {r['spec'] or 'defaults (issue 11)'} | "
                f"{'swapped' if r['swapped'] else 'true'} | {e['step']} | "
                f"{e['preferred']:.2f} ({base:.2f}) | {e['rise']:+.2f} | "
                f"{'8 triangle/cross' if held else 'all 16'} | {j['worst_prompt']} | "
                f"{j['worst_colour_change']:+.3f} | {j['largest_colour_move']:.3f} | "
                f"{j['colour_mean_change']:+.3f} | {j['worst_shape_change']:+.3f} | "
                f"{r['seconds']:.0f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    modes = parser.add_subparsers(dest="mode", required=True)
    p_run = modes.add_parser("run")
    p_run.add_argument("--cache", default="/tmp/t2i-dpo-shapes")
    p_run.add_argument("--task", choices=list(BASE_STEPS), required=True)
    p_run.add_argument("--out", required=True)
    p_run.add_argument("--runs", nargs="+", default=[""])
    p_run.add_argument("--eval-at", type=int, nargs="+", default=[100, 200, 300])
    p_run.add_argument("--seeds", type=int, default=48)
    p_run.add_argument("--guidance", type=float, default=1.0)
    p_run.add_argument("--control", action="store_true", help="also the swapped-label control")
    p_run.add_argument("--proof-seeds", action="store_true", help="the seeds the sweep never saw")
    p_table = modes.add_parser("table")
    p_table.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    {"run": run, "table": table}[args.mode](args)


if __name__ == "__main__":
    main()
