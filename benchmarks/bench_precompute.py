"""Benchmark `t2i precompute`: throughput per encoder, peak memory, bytes per sample vs SD3 Table 7.

    python benchmarks/bench_precompute.py OUT [--samples 32] [--resolution 256] [--scales tiny medium]

Three parts, each written to OUT/results.json and printed as markdown:

1. Bytes per sample at 256^2 with SD3-medium's real dimensions, computed from its component
   configs (written to OUT/sd3-medium-configs, no weights) by the same arithmetic as the stored
   layout, next to the paper's Table 7.
2. For each scale ("tiny": the offline test kit; "medium": random weights with SD3's real widths
   (CLIP-L 768, CLIP-G 1280, T5 4096, the 16-channel 8x SD3 VAE) but fewer layers), a full
   `run_precompute` in a fresh process: samples/s per encoder (loading excluded) and end to
   end, bytes per sample on disk, peak RSS.
3. Peak RSS of the same encoders all loaded at once (each encoding one batch), in a fresh
   process, against the one-at-a-time run; and the RSS of a process that only imported.

Timings are wall-clock with torch on one thread; the medium T5 has 2 of T5-XXL's 24 layers, so
its samples/s is not T5-XXL's.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# SD3 paper Table 7: storage per sample at 256^2 (VAE fp32, text encoders 16-bit), kB = 1000 B.
TABLE7_KB = {"vae": 65.5, "clip_l": 121.3, "clip_g": 202.2, "t5": 630.7}

# stable-diffusion-3-medium-diffusers component configs (the fields that set tensor sizes).
SD3_MEDIUM = {
    "text_encoder": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "projection_dim": 768,
        "max_position_embeddings": 77,
    },
    "text_encoder_2": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "projection_dim": 1280,
        "max_position_embeddings": 77,
    },
    "text_encoder_3": {
        "d_model": 4096,
        "d_ff": 10240,
        "d_kv": 64,
        "num_heads": 64,
        "num_layers": 24,
    },
    "vae": {
        "block_out_channels": [128, 256, 512, 512],
        "latent_channels": 16,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "layers_per_block": 2,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    },
    "transformer": {"patch_size": 2},
}
CLASSES = {
    "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "text_encoder_3": ["transformers", "T5EncoderModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "transformer": ["diffusers", "SD3Transformer2DModel"],
}
# "medium": SD3's widths, fewer layers, so that a CPU run takes minutes.
MEDIUM_LAYERS = {"text_encoder": 12, "text_encoder_2": 8, "text_encoder_3": 2}


def write_sd3_configs(folder: Path) -> Path:
    """SD3-medium's component configs, no weights: enough for `encoder_dims`."""
    index = {"_class_name": "StableDiffusion3Pipeline"}
    for component, config in SD3_MEDIUM.items():
        (folder / component).mkdir(parents=True, exist_ok=True)
        (folder / component / "config.json").write_text(json.dumps(config))
        index[component] = CLASSES[component]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def table7(out: Path, resolution: int) -> dict:
    from model.encoders import encoder_dims
    from model.shards import caption_and_latent_bytes

    dims = encoder_dims(write_sd3_configs(out / "sd3-medium-configs"))
    side = resolution // dims["vae_scale_factor"]
    ours = caption_and_latent_bytes(dims, (side, side), 77)
    ours_fp32_vae = caption_and_latent_bytes(dims, (side, side), 77, itemsize=4)["vae"]
    return {
        "dims": dims,
        "ours_bytes": ours,
        "vae_fp32_bytes": ours_fp32_vae,
        "table7_kb": TABLE7_KB,
    }


def build_medium_model(folder: Path) -> Path:
    """A random-weight SD3 folder with SD3-medium's encoder widths and fewer layers."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from model.build import build_transformer, text_dims, transformer_config_for
    from model.tokenizers import build_clip_tokenizer, build_t5_tokenizer

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer()
    ids = {
        "vocab_size": len(clip_tok),
        "bos_token_id": clip_tok.bos_token_id,
        "eos_token_id": clip_tok.eos_token_id,
        "pad_token_id": clip_tok.pad_token_id,
    }
    clip = [
        CLIPTextModelWithProjection(
            CLIPTextConfig(**{**SD3_MEDIUM[name], "num_hidden_layers": MEDIUM_LAYERS[name]}, **ids)
        )
        for name in ("text_encoder", "text_encoder_2")
    ]
    t5 = T5EncoderModel(
        T5Config(
            **{**SD3_MEDIUM["text_encoder_3"], "num_layers": MEDIUM_LAYERS["text_encoder_3"]},
            vocab_size=len(t5_tok),
            feed_forward_proj="gated-gelu",
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
            decoder_start_token_id=t5_tok.pad_token_id,
        )
    )
    vae_config = dict(SD3_MEDIUM["vae"])
    blocks = len(vae_config["block_out_channels"])
    vae = AutoencoderKL(
        **vae_config,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
    )
    components = {
        "text_encoder": clip[0],
        "text_encoder_2": clip[1],
        "text_encoder_3": t5,
        "vae": vae,
        "tokenizer": clip_tok,
        "tokenizer_2": build_clip_tokenizer(),
        "tokenizer_3": t5_tok,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }
    config = transformer_config_for("tiny", text_dims(components))
    config["in_channels"] = config["out_channels"] = vae.config.latent_channels
    components["transformer"] = build_transformer(config)
    StableDiffusion3Pipeline(**components).save_pretrained(folder, safe_serialization=True)
    return folder


def build_store(out: Path, samples: int) -> Path:
    """`samples` rows cycled from the demo images (re-encoded so every id differs), half with a synthetic caption."""
    import datasets
    from PIL import Image

    from curate.demo_data import write_demo_data
    from curate.runtime.store import sample_id
    from curate.runtime.store_writer import StageWriter

    store = out / f"store-{samples}"
    if (store / "manifest.json").is_file():
        return store
    demo = write_demo_data(out / "demo", "folder")
    truth = json.loads((demo / "DEMO_TRUTH.json").read_text())
    kept = sorted((k, t) for k, t in truth.items() if t["expect"] == "keep")

    def rows():
        for n in range(samples):
            key, t = kept[n % len(kept)]
            buffer = io.BytesIO()
            Image.open(demo / f"{key}.{t['ext']}").convert("RGB").save(
                buffer, "JPEG", quality=95 - n // len(kept)
            )
            data = buffer.getvalue()
            synthetic = f"a detailed photo showing {t['caption']}" if n % 2 else None
            yield {
                "id": sample_id(data),
                "image": {"bytes": data, "path": None},
                "caption": t["caption"],
                "caption_synthetic": synthetic,
            }

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "caption_synthetic": datasets.Value("string"),
        }
    )
    with StageWriter(store, "caption", {"bench": samples}, "bench") as writer:
        writer.write_samples(rows(), features)
    return store


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries that over from
    the parent across fork + exec, so a worker would report the benchmark driver's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (peak RSS needs Linux)")


def worker(mode: str, model: str, store: str, out: str, resolution: int, batch: int) -> dict:
    """Runs in a fresh process: one measurement, reported as JSON on stdout."""
    import torch

    torch.set_num_threads(1)
    from diffusers import AutoencoderKL  # noqa: F401  (imported up front: load times exclude imports)
    from transformers import CLIPTextModelWithProjection, T5EncoderModel  # noqa: F401

    from model.config import PrecomputeConfig
    from model.encoders import ENCODERS, Encoder, pixels_from_images
    from model.precompute import run_precompute

    if mode == "imports":
        return {"peak_rss_mb": peak_rss_mb()}
    if mode == "sequential":
        start = time.monotonic()
        config = PrecomputeConfig(
            model=model, resolution=resolution, batch_size=batch, shard_size=256
        )
        run_precompute(store, out, config)
        manifest = json.loads((Path(out) / "manifest.json").read_text())
        return {
            "peak_rss_mb": peak_rss_mb(),
            "wall_s": time.monotonic() - start,
            "counts": manifest["counts"],
            "timings": manifest["extra"]["timings_s"],
            "bytes": manifest["extra"]["bytes"],
        }
    from PIL import Image

    encoders = [Encoder(model, name) for name in ENCODERS]  # all four resident at once
    image = Image.new("RGB", (resolution, resolution), (120, 80, 40))
    pixels = pixels_from_images([image] * batch, (resolution, resolution))
    for encoder in encoders:
        encoder(pixels if encoder.name == "vae" else ["a photo of a cat"] * batch)
    return {"peak_rss_mb": peak_rss_mb()}


def measure(mode: str, *args) -> dict:
    command = [sys.executable, __file__, "--worker", mode, *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{mode} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(results: dict) -> str:
    t7 = results["table7"]
    lines = [
        "### Bytes per sample at 256^2, SD3-medium dimensions (from configs) vs SD3 Table 7",
        "",
        "| encoder | ours (16-bit) | Table 7 | note |",
        "| --- | ---: | ---: | --- |",
    ]
    notes = {
        "vae": f"Table 7 stores fp32; ours in fp32 would be {t7['vae_fp32_bytes'] / 1000:.1f} kB",
        "clip_l": "77x768 states + 768 pooled; Table 7 = 79 rows of 768",
        "clip_g": "77x1280 + 1280 pooled; Table 7 = 79 rows",
        "t5": "77x4096 + 77-byte mask",
    }
    for name, kb in TABLE7_KB.items():
        lines.append(
            f"| {name} | {t7['ours_bytes'][name] / 1000:.1f} kB | {kb} kB | {notes[name]} |"
        )
    lines += [
        "",
        "### Throughput and memory (one thread, random weights)",
        "",
        "| scale | samples | vae img/s | clip_l cap/s | clip_g cap/s | t5 cap/s | end to end samples/s | bytes/sample on disk (overhead) | peak RSS one-at-a-time | peak RSS all loaded | RSS after imports |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scale, r in results["scales"].items():
        seq, timings = r["sequential"], r["sequential"]["timings"]
        rate = {k: v["items"] / v["encode"] for k, v in timings.items()}
        b = seq["bytes"]
        lines.append(
            f"| {scale} | {seq['counts']['kept']} | {rate['vae']:.2f} | {rate['clip_l']:.1f} | {rate['clip_g']:.1f} | "
            f"{rate['t5']:.1f} | {seq['counts']['kept'] / seq['wall_s']:.2f} | {b['per_sample'] / 1000:.1f} kB "
            f"({100 * b['overhead']:.3f}%) | {seq['peak_rss_mb']:.0f} MB | {r['all_loaded']['peak_rss_mb']:.0f} MB | "
            f"{r['imports']['peak_rss_mb']:.0f} MB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--scales", nargs="+", default=["tiny", "medium"], choices=["tiny", "medium"]
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from model.build import init_model

    store = build_store(args.out, args.samples)
    results = {
        "table7": table7(args.out, args.resolution),
        "scales": {},
        "args": vars(args) | {"out": str(args.out)},
    }
    for scale in args.scales:
        model = args.out / f"model-{scale}"
        if scale == "tiny" and not (model / "model_index.json").is_file():
            init_model(model, "tiny")
        elif scale == "medium":
            build_medium_model(model)
        encoded = args.out / f"encoded-{scale}"
        if encoded.exists():
            import shutil

            shutil.rmtree(encoded)
        common = (model, store, encoded, args.resolution, args.batch_size)
        results["scales"][scale] = {
            mode: measure(mode, *common) for mode in ("imports", "sequential", "all_loaded")
        }
        print(f"{scale}: {json.dumps(results['scales'][scale])}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    text = report(results)
    (args.out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        mode, model, store, out, resolution, batch = sys.argv[2:8]
        print(json.dumps(worker(mode, model, store, out, int(resolution), int(batch))))
    else:
        main()
