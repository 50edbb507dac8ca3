"""Does `t2i dpo` move samples toward the preferred images at its defaults, and only there? (issue 11)

dpo/proof.py's toy: a tiny-d4 MMDiT fitted to solid-colour images ("a {colour} image" for four
colours, "an image" for red and blue alike), pairs on "an image" where red beats blue. The base
is fitted once and cached (--cache). Modes:

    proof   the shipped DPOConfig defaults (only --steps scaled down), true and swapped labels:
            red share of "an image" samples vs the base, and the colour accuracy of the
            colour-naming prompts (outside the preference set) vs the base
    sweep   beta x lr x LoRA targets (x remedies), DPO arm only, one JSON line per run in --out;
            runs already in --out are skipped, --shard K/N splits the grid across processes
    table   print the markdown table of a sweep's --out
    shapes  issue 20: the shipped defaults on the two shapes tasks of dpo/shapes_task.py (bases
            trained by `t2i train`'s loop, 1,500 and 500 steps), DPO and swapped control, each
            class prompt's colour accuracy against the base on seeds the sweep never used

    PYTHONPATH=. python benchmarks/bench_dpo_proof.py proof --steps 300
    PYTHONPATH=. python benchmarks/bench_dpo_proof.py sweep --out /tmp/sweep.jsonl --shard 0/2
    PYTHONPATH=. python benchmarks/bench_dpo_proof.py table --out /tmp/sweep.jsonl
    PYTHONPATH=. python benchmarks/bench_dpo_proof.py shapes --steps 400 --seeds 48 --cache DIR
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dpo.config import ALL_BLOCK_LINEARS, ATTENTION_PROJECTIONS, DPOConfig
from dpo.proof import build_base, held_out_seeds, measure, run_arm, run_proof
from dpo.trainer import load_transformer

TARGETS = {"attn": ATTENTION_PROJECTIONS, "all": ALL_BLOCK_LINEARS}


def base_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache",
        default=str(Path(tempfile.gettempdir()) / "t2i-dpo-proof"),
        help="folder for the fitted base (built once per settings)",
    )
    parser.add_argument("--preset", default="tiny-d4")
    parser.add_argument("--base-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=300, help="DPO optimizer steps")
    parser.add_argument("--seeds", type=int, default=64, help="held-out sampling seeds")
    parser.add_argument("--threads", type=int, default=1)


def sweep_grid(args) -> list[dict]:
    grid = [
        {
            "beta": b,
            "lr": lr,
            "targets": tg,
            "units": "noise",
            "dpop_lambda": 0.0,
            "sft_weight": 0.0,
        }
        for b, lr, tg in itertools.product(args.betas, args.lrs, args.targets)
    ]
    for remedy in args.remedies:  # "dpop:50@5000:1e-4:attn" or "sft:0.1@..." or "velocity@..."
        kind, _, where = remedy.partition("@")
        beta, lr, targets = where.split(":")
        row = {
            "beta": float(beta),
            "lr": float(lr),
            "targets": targets,
            "units": "noise",
            "dpop_lambda": 0.0,
            "sft_weight": 0.0,
        }
        name, _, value = kind.partition(":")
        if name == "velocity":
            row["units"] = "velocity"
        else:
            row[{"dpop": "dpop_lambda", "sft": "sft_weight"}[name]] = float(value)
        grid.append(row)
    return grid


def run_key(row: dict, steps: int, batch: int, accum: int, rank: int) -> str:
    return json.dumps(
        {**row, "steps": steps, "batch": batch, "accum": accum, "rank": rank}, sort_keys=True
    )


def sweep(args) -> None:
    model, data = build_base(args.cache, args.preset, steps=args.base_steps)
    seeds = held_out_seeds(args.seeds)
    out = Path(args.out)
    done = set()
    if out.is_file():
        done = {json.loads(line)["key"] for line in out.read_text().splitlines() if line.strip()}
    base = measure(load_transformer(model, "cpu", torch.float32), data, seeds)
    shard, shards = (int(v) for v in args.shard.split("/"))
    for k, row in enumerate(sweep_grid(args)):
        key = run_key(row, args.steps, args.batch, args.accum, args.rank)
        if k % shards != shard or key in done:
            continue
        config = DPOConfig(
            model=str(model),
            beta=row["beta"],
            lr=row["lr"],
            lora_rank=args.rank,
            lora_alpha=args.rank,
            lora_targets=TARGETS[row["targets"]],
            error_units=row["units"],
            dpop_lambda=row["dpop_lambda"],
            sft_weight=row["sft_weight"],
            max_steps=args.steps,
            batch_size=args.batch,
            grad_accum=args.accum,
            log_every=10,
        )
        with tempfile.TemporaryDirectory() as tmp:
            arm = run_arm(model, data, config, tmp, seeds)
            swapped = (
                run_arm(model, data, config, Path(tmp) / "s", seeds, True) if args.control else None
            )
        record = {
            "key": key,
            **row,
            "steps": args.steps,
            "batch": args.batch,
            "accum": args.accum,
            "rank": args.rank,
            "base": asdict(base),
            "dpo": asdict(arm),
            "swapped": asdict(swapped) if swapped else None,
        }
        with out.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(
            f"{row} rise {arm.samples.preferred_rate - base.preferred_rate:+.3f} other "
            f"{arm.samples.colour_accuracy - base.colour_accuracy:+.3f} drift "
            f"{arm.guard['winner_drift']:.4g} sat {arm.guard['saturated_frac']:.2f} "
            f"{arm.seconds:.0f}s",
            flush=True,
        )


def table(args) -> None:
    rows = [json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]
    print(
        "| beta | units | lr | targets | remedy | red share (base) | change | swapped change | "
        "colour acc. change (other prompts) | err_w - ref_w | saturated | held-out impl. acc. | s |"
    )
    print("| " + " | ".join(["---"] * 13) + " |")
    for r in sorted(
        rows,
        key=lambda r: (
            r["units"],
            r["targets"],
            r["beta"],
            r["lr"],
            r["dpop_lambda"],
            r["sft_weight"],
        ),
    ):
        base, dpo, swapped = r["base"], r["dpo"], r["swapped"]
        remedy = (
            f"DPOP {r['dpop_lambda']:g}"
            if r["dpop_lambda"]
            else f"SFT {r['sft_weight']:g}"
            if r["sft_weight"]
            else "-"
        )
        rise = dpo["samples"]["preferred_rate"] - base["preferred_rate"]
        fall = (
            f"{swapped['samples']['preferred_rate'] - base['preferred_rate']:+.2f}"
            if swapped
            else ""
        )
        other = dpo["samples"]["colour_accuracy"] - base["colour_accuracy"]
        print(
            f"| {r['beta']:g} | {r['units']} | {r['lr']:g} | {r['targets']} | {remedy} | "
            f"{dpo['samples']['preferred_rate']:.2f} ({base['preferred_rate']:.2f}) | {rise:+.2f} | "
            f"{fall} | {other:+.2f} | {dpo['guard']['winner_drift']:+.4f} | "
            f"{dpo['guard']['saturated_frac']:.2f} | {dpo['heldout_implicit_acc']:.2f} | "
            f"{dpo['seconds']:.0f} |"
        )


def proof(args) -> None:
    model, data = build_base(args.cache, args.preset, steps=args.base_steps)
    config = DPOConfig(model=str(model), max_steps=args.steps, log_every=10)
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_proof(model, data, config, tmp, seeds=args.seeds)
    report = {
        "args": vars(args),
        "config": config.model_dump(exclude={"model"}),
        "classifier_accuracy": data.classifier_accuracy,
        **result.as_dict(),
        "total_s": round(time.monotonic() - start, 1),
    }
    print(json.dumps(report, indent=2))


def shapes(args) -> None:
    """Issue 20: the shipped defaults (steps scaled down) on both shapes tasks, DPO and control,
    every class prompt on its own, on the seeds the sweep never looked at."""
    from dpo.shapes_proof import PROOF_SEEDS, Sampling, run_proof, toy_table
    from dpo.shapes_task import BASE_STEPS, build_task

    report = {}
    for name, base_steps in BASE_STEPS.items():
        if name not in args.tasks:
            continue
        model, task = build_task(args.cache, name, base_steps)
        config = DPOConfig(model=str(model), max_steps=args.steps, eval_seeds=0)
        start = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            result = run_proof(
                model,
                task,
                config,
                tmp,
                PROOF_SEEDS[: args.seeds],
                Sampling(),
                args.pool,
                args.eval_at,
            )
        result["total_s"] = round(time.monotonic() - start, 1)
        report[name] = result
        judged = result["judged"]
        print(f"## {name} base ({base_steps} steps): verdict {result['verdict']}", flush=True)
        for arm in ("dpo", "swapped"):
            j = judged[arm]
            print(
                f"{arm}: red share {j['preferred']:.3f} (rise {j['rise']:+.3f}); worst prompt "
                f"{j['worst_prompt']} {j['worst_colour_change']:+.3f}; largest move "
                f"{j['largest_colour_move']:.3f}; mean {j['colour_mean_change']:+.3f}"
            )
        print(toy_table(result["base"], result["dpo"]["evals"][-1]["measures"]), flush=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), **report}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    modes = parser.add_subparsers(dest="mode", required=True)
    p_proof = modes.add_parser("proof")
    base_args(p_proof)
    p_sweep = modes.add_parser("sweep")
    base_args(p_sweep)
    p_sweep.add_argument("--out", required=True, help="JSON-lines file of results (appended)")
    p_sweep.add_argument("--betas", type=float, nargs="+", default=[500.0, 2000.0, 5000.0, 20000.0])
    p_sweep.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3])
    p_sweep.add_argument("--targets", nargs="+", default=["attn", "all"], choices=list(TARGETS))
    p_sweep.add_argument(
        "--remedies",
        nargs="*",
        default=[],
        help="extra runs: dpop:LAMBDA@BETA:LR:TARGETS, sft:GAMMA@..., velocity@...",
    )
    p_sweep.add_argument("--batch", type=int, default=4)
    p_sweep.add_argument("--accum", type=int, default=1)
    p_sweep.add_argument("--rank", type=int, default=128)
    p_sweep.add_argument("--control", action="store_true", help="also run swapped labels")
    p_sweep.add_argument("--shard", default="0/1")
    p_shapes = modes.add_parser("shapes", help="issue 20: both shapes tasks at the defaults")
    p_shapes.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "t2i-dpo-shapes"))
    p_shapes.add_argument("--steps", type=int, default=400, help="DPO optimizer steps")
    p_shapes.add_argument("--seeds", type=int, default=48, help="proof seeds per prompt")
    p_shapes.add_argument(
        "--pool",
        default="shapes",
        choices=["shapes", "empty"],
        help="--preserve-captions: the circle and square prompts, or none",
    )
    p_shapes.add_argument("--out", default="dpo-shapes-proof.json")
    p_shapes.add_argument("--tasks", nargs="+", default=["strong", "weak"])
    p_shapes.add_argument(
        "--eval-at",
        type=int,
        nargs="*",
        default=None,
        help="also measure at these steps (the last one is --steps)",
    )
    p_shapes.add_argument("--threads", type=int, default=1)
    p_table = modes.add_parser("table")
    p_table.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.mode == "table":
        return table(args)
    torch.set_num_threads(args.threads)
    {"proof": proof, "sweep": sweep, "shapes": shapes}[args.mode](args)


if __name__ == "__main__":
    main()
