"""Captions per second of a VLM at batch 1 vs batch 8 (default: the tiny random LLaVA, on CPU).

    python benchmarks/bench_caption.py [--model DIR] [--images 32] [--max-new-tokens 32]
        [--repeats 3] [--threads 1] [--device cpu]

Figures per batch size, each the median of --repeats runs after one warm-up:
  generate  LocalVLM.generate over the images (processor + generate + decode), greedy, per
            wall second and per CPU second of this process (the CPU figure is the steadier one
            on a shared machine);
  stage     `t2i caption` end to end on a store of the same images (decode, prompt, generate,
            clean, truncate, chunked work log, writing the output store).
Greedy decoding with a fixed max_new_tokens: batch sizes do the same work, so the ratio is the
batching speed-up. Writes nothing outside a temporary directory; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image

from captioning.config import CaptionConfig
from captioning.stage import run_caption
from captioning.tiny import init_captioner
from captioning.vlm import GenerationSettings, LocalVLM
from curate.runtime.store import sample_id
from curate.runtime.store_writer import StageWriter


def real_images(n: int) -> list[Image.Image]:
    """Photographs scikit-image ships, cropped at shifting offsets to make n distinct images."""
    import skimage.data

    names = [
        "astronaut",
        "coffee",
        "chelsea",
        "rocket",
        "camera",
        "horse",
        "coins",
        "immunohistochemistry",
    ]
    base = [
        np.asarray(Image.fromarray(getattr(skimage.data, name)()).convert("RGB")) for name in names
    ]
    images = []
    for i in range(n):
        array = base[i % len(base)]
        offset = 4 * (i // len(base))
        images.append(Image.fromarray(array[offset : offset + 256, offset : offset + 256]))
    return images


def write_store(out: Path, images: list[Image.Image]) -> Path:
    rows = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        data = buffer.getvalue()
        rows.append(
            {"id": sample_id(data), "image": {"bytes": data, "path": None}, "caption": "a photo"}
        )
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
        }
    )
    with StageWriter(out, "curate", {}, "bench") as writer:
        writer.write_samples(rows, features)
    return out


def time_generate(
    vlm: LocalVLM, images, batch: int, settings: GenerationSettings
) -> tuple[float, float]:
    """(captions per wall second, captions per CPU second of this process)."""
    prompt = "Describe this image in detail."
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(images), batch):
        vlm.generate(images[i : i + batch], [prompt] * len(images[i : i + batch]), settings)
    return len(images) / (time.perf_counter() - start), len(images) / (time.process_time() - cpu)


def time_stage(
    store: Path, work: Path, model: str, batch: int, max_new_tokens: int, device: str
) -> float:
    config = CaptionConfig(
        model=model, batch_size=batch, max_new_tokens=max_new_tokens, device=device
    )
    start = time.perf_counter()
    out = run_caption(store, work / f"out-{time.monotonic_ns()}", config)
    elapsed = time.perf_counter() - start
    assert (out / "manifest.json").is_file()
    return len(datasets.load_from_disk(str(out / "samples"))) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="VLM folder (default: build the tiny random LLaVA)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = args.model or str(init_captioner(work / "vlm"))
        images = real_images(args.images)
        store = write_store(work / "store", images)
        vlm = LocalVLM(model, device=args.device)
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
        rows = []
        for batch in args.batches:
            time_generate(vlm, images[: 2 * batch], batch, settings)  # warm-up
            runs = [time_generate(vlm, images, batch, settings) for _ in range(args.repeats)]
            generate = statistics.median(wall for wall, _ in runs)
            generate_cpu = statistics.median(cpu for _, cpu in runs)
            stage = statistics.median(
                time_stage(store, work, model, batch, args.max_new_tokens, args.device)
                for _ in range(args.repeats)
            )
            rows.append((batch, generate, generate_cpu, stage))
    print(
        f"model: {args.model or 'tiny random LLaVA (t2i init-captioner --preset tiny)'}; "
        f"{args.images} images, max_new_tokens {args.max_new_tokens}, greedy, "
        f"{args.threads} thread(s), device {args.device}, median of {args.repeats}"
    )
    print("\n| batch | generate captions/s | generate captions/CPU-s | stage captions/s |")
    print("| --- | --- | --- | --- |")
    for batch, generate, generate_cpu, stage in rows:
        print(f"| {batch} | {generate:.1f} | {generate_cpu:.1f} | {stage:.1f} |")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        print(
            f"\nbatch {last[0]} / batch {first[0]}: generate x{last[1] / first[1]:.2f} "
            f"(CPU x{last[2] / first[2]:.2f}), stage x{last[3] / first[3]:.2f}"
        )


if __name__ == "__main__":
    main()
