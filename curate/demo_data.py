"""A small real image-text collection with planted trouble, built from images packages ship.

`write_demo_data(out, fmt)` writes the same collection as an image folder with sidecar .txt
captions, as webdataset tar shards, or as parquet with image bytes. `DEMO_TRUTH.json` beside
the data says what curation must do with each sample (keep, or reject with which reason, and
which near-duplicate group it belongs to); tests and the demo check curation against it.
"""

from __future__ import annotations

import io
import json
import re
import struct
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from curate.runtime import reasons
from curate.runtime.store import sample_id

FORMATS = ("folder", "webdataset", "parquet")
TRUTH_FILE = "DEMO_TRUTH.json"


@dataclass
class DemoSample:
    key: str
    ext: str
    data: bytes
    caption: str
    expect: str  # "keep" or a rejection reason from curate.runtime.reasons
    group: str = ""  # near-duplicate group: every member shares the original's key

    @property
    def id(self) -> str:
        return sample_id(self.data)


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)

    return load


def _matplotlib(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data(name) as handle:
            return np.asarray(Image.open(handle).convert("RGB"))

    return load


# (key, loader, caption): real photographs and scans, each a distinct image.
SOURCES: list[tuple[str, Callable[[], np.ndarray], str]] = [
    (
        "astronaut",
        _skimage("astronaut"),
        "a portrait of an astronaut in a white space suit in front of a flag",
    ),
    (
        "camera",
        _skimage("camera"),
        "a black and white photo of a cameraman standing behind a tripod camera",
    ),
    ("coffee", _skimage("coffee"), "a close up photo of a cup of coffee on a table"),
    ("chelsea", _skimage("chelsea"), "a photo of a grey cat with green eyes looking to the right"),
    ("rocket", _skimage("rocket"), "a rocket standing on the launch pad under a blue sky"),
    (
        "hubble",
        _skimage("hubble_deep_field"),
        "a deep field telescope image of many small galaxies in space",
    ),
    ("retina", _skimage("retina"), "a medical scan of a retina of a human eye"),
    ("text", _skimage("text"), "a grey photo of handwritten maths formulas on a sheet of paper"),
    ("coins", _skimage("coins"), "a grey photo of old coins on a dark table"),
    ("page", _skimage("page"), "a scan of a page of text from an old book"),
    ("immuno", _skimage("immunohistochemistry"), "a medical image of brown and blue stained cells"),
    ("brick", _skimage("brick"), "a grey brick wall texture"),
    ("grass", _skimage("grass"), "a close up texture of green grass"),
    ("china", _sklearn("china.jpg"), "a chinese temple roof with trees and a blue sky"),
    ("flower", _sklearn("flower.jpg"), "a close up photo of a pink flower"),
    ("hopper", _matplotlib("grace_hopper.jpg"), "a portrait of grace hopper in a navy uniform"),
]

# Sources re-used to build valid edge cases that curation must decode and keep.
EDGE_SOURCES = {
    "cmyk": (
        lambda: _skimage("stereo_motorcycle")()[0],
        "a red motorcycle parked in a garage",
        "keep",
    ),
    "palette": (_skimage("logo"), "a logo with a transparent background", "keep"),
    "sixteen_bit": (_skimage("moon"), "a grey photo of the surface of the moon", "keep"),
    "exif_rotated": (_skimage("clock"), "a photo of a clock on a wall", "keep"),
}


def _to_pil(array: np.ndarray) -> Image.Image:
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        return Image.fromarray(array.astype(np.uint8), "L").convert("RGB")
    if array.shape[2] == 4:
        return Image.fromarray(array.astype(np.uint8), "RGBA")
    return Image.fromarray(array.astype(np.uint8), "RGB")


def _encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        image = image.convert("RGB")
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares WIDTH x HEIGHT pixels but holds almost no data: a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def build_samples() -> list[DemoSample]:
    """The whole collection, deterministic to the byte."""
    samples: list[DemoSample] = []
    originals: dict[str, Image.Image] = {}
    for key, load, caption in SOURCES:
        image = _to_pil(load())
        if max(image.size) > 640:
            image.thumbnail((640, 640), Image.Resampling.LANCZOS)
        originals[key] = image.convert("RGB")
        samples.append(
            DemoSample(key, "jpg", _encode(originals[key], quality=92), caption, "keep", group=key)
        )

    caption_of = {key: caption for key, _, caption in SOURCES}
    width, height = originals["astronaut"].size
    near = [
        (
            "astronaut_resized",
            "astronaut",
            originals["astronaut"].resize((width // 2, height // 2), Image.Resampling.BICUBIC),
            {},
        ),
        ("coffee_reencoded", "coffee", originals["coffee"], {"quality": 35}),
        ("rocket_crop", "rocket", _crop(originals["rocket"], 0.94), {}),
        (
            "chelsea_flip",
            "chelsea",
            originals["chelsea"].transpose(Image.Transpose.FLIP_LEFT_RIGHT),
            {},
        ),
    ]
    for key, group, image, options in near:
        data = _encode(image, quality=options.get("quality", 90))
        samples.append(
            DemoSample(key, "jpg", data, caption_of[group], reasons.NEAR_DUPLICATE, group=group)
        )

    hubble = next(s for s in samples if s.key == "hubble")
    retina = next(s for s in samples if s.key == "retina")
    samples += [
        DemoSample(
            "hubble_copy",
            "jpg",
            hubble.data,
            "another copy of a deep field image",
            reasons.EXACT_DUPLICATE,
            group="hubble",
        ),
        DemoSample(
            "retina_truncated",
            "jpg",
            retina.data[: len(retina.data) // 2],
            "a truncated file",
            reasons.TRUNCATED,
        ),
        DemoSample("empty", "jpg", b"", "a zero byte file", reasons.ZERO_BYTE),
        DemoSample(
            "notes",
            "jpg",
            b"these are my holiday notes, not a picture\n" * 4,
            "a text file",
            reasons.NOT_AN_IMAGE,
        ),
        DemoSample(
            "tiny",
            "png",
            _encode(originals["brick"].resize((16, 16)), "PNG"),
            "a tiny image",
            reasons.TOO_SMALL,
        ),
        DemoSample(
            "strip",
            "jpg",
            _encode(originals["grass"].resize((1200, 96))),
            "a very wide strip of grass",
            reasons.ASPECT_RATIO,
        ),
        DemoSample(
            "bomb",
            "png",
            _png_header_only(30_000, 30_000),
            "a decompression bomb",
            reasons.DECOMPRESSION_BOMB,
        ),
    ]
    samples += _edge_cases()
    return samples


def _crop(image: Image.Image, keep: float) -> Image.Image:
    width, height = image.size
    dx, dy = int(width * (1 - keep) / 2), int(height * (1 - keep) / 2)
    return image.crop((dx, dy, width - dx, height - dy))


def _edge_cases() -> list[DemoSample]:
    out = []
    load, caption, expect = EDGE_SOURCES["cmyk"]
    out.append(
        DemoSample(
            "cmyk",
            "jpg",
            _encode(_to_pil(load()).convert("RGB").convert("CMYK"), quality=90),
            caption,
            expect,
        )
    )
    load, caption, expect = EDGE_SOURCES["palette"]
    rgba = _to_pil(load()).convert("RGBA")
    palette = rgba.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.info["transparency"] = 0
    out.append(
        DemoSample("palette", "png", _encode(palette, "PNG", transparency=0), caption, expect)
    )
    load, caption, expect = EDGE_SOURCES["sixteen_bit"]
    moon = load().astype(np.uint16) * 257
    out.append(
        DemoSample("sixteen_bit", "png", _encode(Image.fromarray(moon), "PNG"), caption, expect)
    )
    load, caption, expect = EDGE_SOURCES["exif_rotated"]
    clock = _to_pil(load()).transpose(Image.Transpose.ROTATE_90)  # stored sideways...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...with the EXIF tag that tells viewers to turn it upright
    out.append(
        DemoSample(
            "exif_rotated", "jpg", _encode(clock, quality=90, exif=exif.tobytes()), caption, expect
        )
    )
    return out


def write_demo_data(output: str | Path, fmt: str = "folder", shard_size: int = 10) -> Path:
    """Write the collection in one layout (or every layout, `fmt="all"`, in subfolders)."""
    output = Path(output)
    if fmt == "all":
        for each in FORMATS:
            write_demo_data(output / each, each, shard_size)
        return output
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)} or all")
    samples = build_samples()
    output.mkdir(parents=True, exist_ok=True)
    {"folder": _write_folder, "webdataset": _write_webdataset, "parquet": _write_parquet}[fmt](
        output, samples, shard_size
    )
    truth = {
        s.key: {**{k: v for k, v in asdict(s).items() if k != "data"}, "id": s.id} for s in samples
    }
    (output / TRUTH_FILE).write_text(json.dumps(truth, indent=2))
    return output


def _write_folder(output: Path, samples: list[DemoSample], _: int) -> None:
    for s in samples:
        (output / f"{s.key}.{s.ext}").write_bytes(s.data)
        (output / f"{s.key}.txt").write_text(s.caption + "\n")


def _write_webdataset(output: Path, samples: list[DemoSample], shard_size: int) -> None:
    for start in range(0, len(samples), shard_size):
        with tarfile.open(output / f"demo-{start // shard_size:06d}.tar", "w") as tar:
            for s in samples[start : start + shard_size]:
                for name, payload in (
                    (f"{s.key}.{s.ext}", s.data),
                    (f"{s.key}.txt", s.caption.encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(payload), 0, 0o644
                    tar.addfile(info, io.BytesIO(payload))


def _write_parquet(output: Path, samples: list[DemoSample], shard_size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    half = (len(samples) + 1) // 2
    for index, part in enumerate((samples[:half], samples[half:])):
        table = pa.table(
            {
                "key": [s.key for s in part],
                "image": pa.array([s.data for s in part], type=pa.binary()),
                "caption": [s.caption for s in part],
            }
        )
        pq.write_table(table, output / f"demo-{index:05d}.parquet")


def run_demo_data(output: str, config) -> Path:
    """`t2i demo-data`: see flows/cli.py. A rerun that would write the same files leaves OUTPUT
    untouched, so the stages reading it see no change and skip."""
    from curate.runtime.stage_runtime import generate

    return generate(
        output,
        "demo-data",
        lambda fresh: write_demo_data(fresh, config.format, config.shard_size),
        foreign=not_demo_data,
    )


def not_demo_data(output: Path) -> list[str]:
    """The entries under OUTPUT that no `t2i demo-data` run (any format) writes: anything but
    its truth file, its shards and its images and sidecars (named by the truth file's keys), in
    OUTPUT or, for --format all, in one folder per format."""
    names = {TRUTH_FILE}
    for sample in build_samples():
        names.update((f"{sample.key}.{sample.ext}", f"{sample.key}.txt"))  # as _write_folder
    others = []
    for path in sorted(output.rglob("*")):
        rel = path.relative_to(output)
        if path.is_dir() and not path.is_symlink():
            if len(rel.parts) == 1 and rel.name in FORMATS and any(path.iterdir()):
                continue
            others.append(rel.as_posix() + "/")
            continue
        parts = rel.parts[1:] if len(rel.parts) == 2 and rel.parts[0] in FORMATS else rel.parts
        if len(parts) != 1 or path.is_symlink() or not path.is_file():
            others.append(rel.as_posix())
            continue
        name = parts[0]
        shard = re.fullmatch(r"demo-\d+\.(tar|parquet)", name)
        if name not in names and not shard:
            others.append(rel.as_posix())
    return others
