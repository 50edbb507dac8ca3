"""Prompt adherence of `t2i train` on a class-conditional toy, judged on stock-pipeline samples.

The task (issue 21): 64x64 images of one of 4 shapes (circle, square, triangle, cross) in one of 4
colours (red, green, blue, yellow) at a random place and size on a dark background, captioned
"a {colour} {shape}"; encoded by `t2i precompute` with the tiny kit (random 16-channel VAE, 16x16
latents, random CLIP-L/CLIP-G/T5, 77 T5 tokens). A model is trained from scratch with `t2i train`
(tiny-d4: 4 layers x hidden 64), exported, and sampled through diffusers' stock
StableDiffusion3Pipeline loaded from the exported folder (its own encoders, scheduler and
classifier-free guidance against the empty prompt; latents returned before the VAE). A small CNN
fitted on real latents of unseen images labels each sample's shape and colour; a sample counts for
a prompt when the label is the one its prompt names. Chance is 1/4 for each.

    python benchmarks/bench_adherence.py run --tag today --steps 1500
    python benchmarks/bench_adherence.py run --tag old --code /path/to/other/checkout --steps 500
    python benchmarks/bench_adherence.py run --tag x --steps 500 --opt ema_decay=0.999 --opt lr=1e-3

`--code DIR` trains (and pre-encodes) with another checkout's own `model.train` and `model.precompute`
(for bisecting); evaluation always runs with this checkout. Results: CACHE/results/TAG.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 60, 230),
    "yellow": (230, 220, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZE = 64
T5_LENGTH = 77
# The issue's run: t2i train --preset tiny-d4 --max-steps 1500 --batch-size 16 --lr 5e-4
# --warmup-steps 100 --synthetic-caption-p 0 (plus: CPU, no grids, checkpoints or validation).
ISSUE_RUN = dict(
    preset="tiny-d4",
    max_steps=1500,
    batch_size=16,
    lr=5e-4,
    warmup_steps=100,
    synthetic_caption_p=0.0,
    device="cpu",
    sample_count=0,
    checkpoint_every=0,
    val_every=0,
    log_every=100,
)


# ----------------------------------------------------------------------------- the set


def shape_image(colour: str, shape: str, rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    image = Image.new("RGB", (size, size), (20, 20, 20))
    draw = ImageDraw.Draw(image)
    fill = COLOURS[colour]
    r = int(rng.integers(size // 6, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # cross: two bars a third of the width thick
        w = max(2, r // 3)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    return image


def labelled_images(
    n: int, seed: int
) -> tuple[list[Image.Image], list[str], list[tuple[int, int]]]:
    """n images cycling through the 16 classes; (images, captions, (shape, colour) labels)."""
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    images, captions, labels = [], [], []
    for k in range(n):
        colour, shape = colours[k % 4], SHAPES[(k // 4) % 4]
        images.append(shape_image(colour, shape, rng))
        captions.append(f"a {colour} {shape}")
        labels.append((SHAPES.index(shape), colours.index(colour)))
    return images, captions, labels


def prompts() -> list[tuple[str, int, int]]:
    return [(f"a {c} {s}", SHAPES.index(s), k) for k, c in enumerate(COLOURS) for s in SHAPES]


# Run in a subprocess with the checkout under test first on the path: pre-encode (once per
# checkout) and train with that checkout's own code.
TRAIN_DRIVER = r"""
import json, sys, importlib.util
from pathlib import Path
args = json.loads(sys.argv[1])
sys.path[:0] = [args["code"], args["code"] + "/tests"]
import torch
torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("bench_adherence", args["harness"])
harness = importlib.util.module_from_spec(spec); spec.loader.exec_module(harness)
from train_sets import write_store
from model.config import PrecomputeConfig, TrainConfig
from model.precompute import run_precompute
from model.encoded import EncodedDataset
from model.train import train
encoded = Path(args["encoded"])
if not (encoded / "manifest.json").is_file():
    images, captions, _ = harness.labelled_images(args["n"], seed=0)
    store = write_store(encoded.parent / (encoded.name + "-store"), images, captions, [None] * len(images))
    run_precompute(store, encoded, PrecomputeConfig(model=args["model"], resolution=harness.SIZE,
                   t5_length=harness.T5_LENGTH, shard_size=max(64, args["n"])))
config = TrainConfig(model=args["model"], **args["config"])
train(EncodedDataset(encoded), args["out"], config)
"""


# ----------------------------------------------------------------------------- the judge


def classifier_net():
    import torch.nn as nn

    class Judge(nn.Module):
        """Two heads (shape, colour) on a small position-invariant CNN over 16x16 latents."""

        def __init__(self, channels: int = 16):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(channels, 48, 3, padding=1),
                nn.GELU(),
                nn.Conv2d(48, 64, 3, padding=1),
                nn.GELU(),
                nn.MaxPool2d(2),
                nn.Conv2d(64, 96, 3, padding=1),
                nn.GELU(),
            )
            self.shape = nn.Linear(192, 4)
            self.colour = nn.Linear(192, 4)

        def forward(self, x):
            import torch

            h = self.body(x)
            h = torch.cat([h.amax((2, 3)), h.mean((2, 3))], dim=1)
            return self.shape(h), self.colour(h)

    return Judge()


def fit_judge(latents, labels, held_latents, held_labels, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    net = classifier_net()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    y = torch.as_tensor(labels)
    mean, std = latents.mean((0, 2, 3), keepdim=True), latents.std((0, 2, 3), keepdim=True)
    x = (latents - mean) / std
    for _epoch in range(40):
        order = torch.randperm(len(x))
        for k in range(0, len(x), 64):
            idx = order[k : k + 64]
            noisy = x[idx] + 0.1 * torch.randn_like(x[idx])  # samples are never exact latents
            s, c = net(noisy)
            loss = torch.nn.functional.cross_entropy(
                s, y[idx, 0]
            ) + torch.nn.functional.cross_entropy(c, y[idx, 1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    judge = {"net": net, "mean": mean, "std": std}
    s, c = predict(judge, held_latents)
    held = torch.as_tensor(held_labels)
    return judge, float((s == held[:, 0]).float().mean()), float((c == held[:, 1]).float().mean())


def predict(judge, latents):
    import torch

    with torch.no_grad():
        s, c = judge["net"]((latents.float() - judge["mean"]) / judge["std"])
    return s.argmax(1), c.argmax(1)


def encode_with_this_checkout(model: str, out: Path, n: int, seed: int) -> tuple[Path, list]:
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from train_sets import write_store

    from model.config import PrecomputeConfig
    from model.precompute import run_precompute

    images, captions, labels = labelled_images(n, seed)
    if not (out / "manifest.json").is_file():
        store = write_store(out.parent / (out.name + "-store"), images, captions, [None] * n)
        run_precompute(
            store,
            out,
            PrecomputeConfig(
                model=model, resolution=SIZE, t5_length=T5_LENGTH, shard_size=max(64, n)
            ),
        )
    return out, labels


def ordered_latents(encoded: Path, n: int, seed: int):
    """Latents in the order labelled_images made them (the reader orders by id)."""
    import hashlib
    import io

    import torch

    from model.encoded import EncodedDataset

    reader = EncodedDataset(encoded)
    position = {i: k for k, i in enumerate(reader.ids)}
    images, _, labels = labelled_images(n, seed)
    rows = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        rows.append(position[hashlib.sha256(buffer.getvalue()).hexdigest()])
    return torch.stack([reader.sample(r)["latents"] for r in rows]).float(), labels


def prepare(cache: Path) -> dict:
    """The base model folder and the judge (fitted once, cached)."""
    import torch

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from model.build import init_model

    model = cache / "model"
    if not (model / "model_index.json").is_file():
        init_model(model, "tiny")
    judge_file = cache / "judge.pt"
    if not judge_file.is_file():
        fit_set, _ = encode_with_this_checkout(str(model), cache / "judge-fit", 1024, seed=99)
        held_set, _ = encode_with_this_checkout(str(model), cache / "judge-held", 256, seed=98)
        x, y = ordered_latents(fit_set, 1024, 99)
        hx, hy = ordered_latents(held_set, 256, 98)
        judge, shape_acc, colour_acc = fit_judge(x, y, hx, hy)
        torch.save(
            {
                "state": judge["net"].state_dict(),
                "mean": judge["mean"],
                "std": judge["std"],
                "held_shape": shape_acc,
                "held_colour": colour_acc,
            },
            judge_file,
        )
    saved = torch.load(judge_file)
    net = classifier_net()
    net.load_state_dict(saved["state"])
    judge = {"net": net.eval(), "mean": saved["mean"], "std": saved["std"]}
    return {
        "model": str(model),
        "judge": judge,
        "judge_held_shape": saved["held_shape"],
        "judge_held_colour": saved["held_colour"],
    }


def pipeline_adherence(
    folder,
    judge,
    seeds: int = 8,
    steps: int = 28,
    guidance: float = 7.0,
    t5_length: int | None = T5_LENGTH,
) -> dict:
    """FOLDER: an SD3 folder or a loaded pipeline. Per prompt: the share of stock-pipeline samples whose judged shape / colour is the prompt's."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    pipe = folder
    if not isinstance(folder, StableDiffusion3Pipeline):
        pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    per_prompt = {}
    shape_hits = colour_hits = both_hits = total = 0
    extra = {} if t5_length is None else {"max_sequence_length": t5_length}
    for prompt, shape, colour in prompts():
        latents = pipe(
            prompt=[prompt] * seeds,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=SIZE,
            width=SIZE,
            output_type="latent",
            generator=[torch.Generator().manual_seed(1000 + s) for s in range(seeds)],
            **extra,
        ).images
        s, c = predict(judge, latents)
        hit_s, hit_c = (s == shape), (c == colour)
        per_prompt[prompt] = {
            "shape": float(hit_s.float().mean()),
            "colour": float(hit_c.float().mean()),
        }
        shape_hits += int(hit_s.sum())
        colour_hits += int(hit_c.sum())
        both_hits += int((hit_s & hit_c).sum())
        total += seeds
    return {
        "shape": shape_hits / total,
        "colour": colour_hits / total,
        "both": both_hits / total,
        "samples": total,
        "per_prompt": per_prompt,
    }


def checkpoint_adherence(
    out: Path, step: int, judge, args, folder: Path | None = None, weights: str = "ema"
) -> dict:
    """The exported pipeline (or FOLDER's, a run of the same preset and shift) with the
    transformer's weights replaced by checkpoint STEP's EMA (WEIGHTS="ema") or raw weights."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    from model.checkpoint import checkpoint_path, load_object

    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder or out), local_files_only=True)
    saved = checkpoint_path(out / "training" / "checkpoints", step)
    shadow = (
        load_object(saved, "ema")["shadow"] if weights == "ema" else load_object(saved, "model")
    )
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            p.copy_(shadow[name])
    return pipeline_adherence(pipe, judge, args.seeds, t5_length=args.t5_length)


def run(args) -> dict:
    import torch

    torch.set_num_threads(1)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    ready = prepare(cache)
    code = Path(args.code or ROOT).resolve()
    config = {**ISSUE_RUN, "max_steps": args.steps, "seed": args.seed}
    if args.curve:
        config.update(checkpoint_every=math.gcd(*args.curve), checkpoints_total_limit=100)
    for item in args.opt:
        key, value = item.split("=", 1)
        config[key] = json.loads(value) if value[:1] in '0123456789-[{tf"n' else value
    out = cache / "runs" / args.tag
    started = time.time()
    if not (out / "transformer").is_dir() or args.retrain:
        subprocess.run(
            [
                sys.executable,
                "-c",
                TRAIN_DRIVER,
                json.dumps(
                    {
                        "code": str(code),
                        "harness": str(Path(__file__).resolve()),
                        "model": ready["model"],
                        "encoded": str(cache / f"encoded-{args.encoded_key or code.name}"),
                        "n": args.n,
                        "out": str(out),
                        "config": config,
                    }
                ),
            ],
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(code)},
        )
    train_s = time.time() - started
    result = {
        "tag": args.tag,
        "code": str(code),
        "config": config,
        "train_s": round(train_s, 1),
        "judge_held_shape": ready["judge_held_shape"],
        "judge_held_colour": ready["judge_held_colour"],
    }
    result["trained"] = pipeline_adherence(
        out, ready["judge"], args.seeds, t5_length=args.t5_length
    )
    for step in args.curve:  # the EMA weights of earlier checkpoints of the same run
        result[f"step_{step}"] = checkpoint_adherence(out, step, ready["judge"], args)
    if args.control:
        result["untrained"] = pipeline_adherence(ready["model"], ready["judge"], args.seeds)
    (cache / "results").mkdir(exist_ok=True)
    (cache / "results" / f"{args.tag}.json").write_text(json.dumps(result, indent=2))
    return result


def evaluate_again(args) -> dict:
    """Judge an already trained run (CACHE/runs/TAG) at other guidance scales / T5 lengths."""
    import torch

    torch.set_num_threads(1)
    ready = prepare(Path(args.cache))
    out = Path(args.cache) / "runs" / args.tag
    found = {}
    for item in args.checkpoints:  # STEP or STEP:raw
        step, _, weights = item.partition(":")
        folder = Path(args.cache) / "runs" / args.pipeline_from if args.pipeline_from else None
        r = checkpoint_adherence(out, int(step), ready["judge"], args, folder, weights or "ema")
        found[f"step_{item}"] = [r["shape"], r["colour"]]
        (Path(args.cache) / "results" / f"{args.tag}-step{item.replace(':', '-')}.json").write_text(
            json.dumps(r, indent=2)
        )
    if args.checkpoints:
        return found
    for guidance in args.guidance:
        r = pipeline_adherence(
            out, ready["judge"], args.seeds, guidance=guidance, t5_length=args.t5_length
        )
        found[str(guidance)] = [r["shape"], r["colour"]]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--tag", required=True)
    p.add_argument("--cache", default=os.environ.get("ADHERENCE_CACHE", "/tmp/bench-adherence"))
    p.add_argument("--code", default=None, help="checkout to train with (default: this one)")
    p.add_argument("--encoded-key", default=None, help="name of the cached encoded set to use")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--seeds", type=int, default=8, help="sampling seeds per prompt")
    p.add_argument("--t5-length", type=int, default=T5_LENGTH)
    p.add_argument("--opt", action="append", default=[], help="TrainConfig override KEY=VALUE")
    p.add_argument(
        "--curve",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[],
        help="also judge the EMA of the checkpoints at these steps, e.g. 250,500,1000",
    )
    p.add_argument("--control", action="store_true", help="also sample the untrained base folder")
    p.add_argument("--retrain", action="store_true")
    e = sub.add_parser("eval")
    e.add_argument("--tag", required=True)
    e.add_argument("--cache", default=os.environ.get("ADHERENCE_CACHE", "/tmp/bench-adherence"))
    e.add_argument("--seeds", type=int, default=8)
    e.add_argument("--t5-length", type=int, default=T5_LENGTH)
    e.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 7.0])
    e.add_argument(
        "--checkpoints", nargs="+", default=[], help="STEP or STEP:raw of the run to judge"
    )
    e.add_argument(
        "--pipeline-from", default=None, help="the run folder whose pipeline to load them into"
    )
    args = parser.parse_args()
    if args.command == "eval":
        print(json.dumps({"tag": args.tag, "t5_length": args.t5_length, **evaluate_again(args)}))
        return
    result = run(args)
    summary = {k: v for k, v in result["trained"].items() if k != "per_prompt"}
    for step in args.curve:
        summary[f"step_{step}"] = [
            result[f"step_{step}"]["shape"],
            result[f"step_{step}"]["colour"],
        ]
    print(
        json.dumps(
            {
                "tag": result["tag"],
                "train_s": result["train_s"],
                **summary,
                "untrained": {
                    k: v for k, v in result.get("untrained", {}).items() if k != "per_prompt"
                },
            }
        )
    )


if __name__ == "__main__":
    main()
