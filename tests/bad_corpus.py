"""A hostile input corpus for the hardening tests: every bad input a review tried, in one mixed folder.

`build(base, demo_folder)` writes BASE/outside (canaries no stage may read) and BASE/in (loose
images with sidecars, tar shards and parquet files side by side) and returns what each source
must become: "keep", or the rejection reason. Stage tests run on it and compare.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curate.runtime import reasons

SECRET = b"CANARY-SECRET-5f1c0e"  # text of the canary file outside the input
BOMB_SIDE = 30_000  # a 30000 x 30000 canvas: 900 MP, 2.7 GB as RGB, in a ~100-byte PNG
NON_UTF8 = b"caf\xe9-latin1.jpg"  # a Latin-1 file name: not UTF-8
HOSTILE_NAME = "<img src=x onerror=alert(1)>.jpg"
HOSTILE_CAPTION = "<script>alert('cap')</script> a [link](javascript:alert(1)) | `tick`"


@dataclass
class Corpus:
    root: Path  # the input folder
    outside: Path  # canaries: nothing may read them
    canary_image: bytes
    expect: dict[str, str] = field(default_factory=dict)  # source key -> "keep" or a reason
    bomb: bytes = b""
    truncated_png: bytes = b""
    captions_dropped: set[str] = field(default_factory=set)  # kept, their non-text caption dropped


def bomb_png(width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> bytes:
    """A valid PNG header declaring WIDTH x HEIGHT pixels, with almost no data behind it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def png(image: Image.Image, exif: bool = False) -> bytes:
    buffer = io.BytesIO()
    options = {}
    if exif:
        tags = Image.Exif()
        tags[0x0112] = 1
        options["exif"] = tags.tobytes()
    image.save(buffer, "PNG", **options)
    return buffer.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            tar.addfile(info, io.BytesIO(payload))
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def build(base: Path, demo_folder: Path) -> Corpus:
    def demo(name: str) -> bytes:
        return (demo_folder / name).read_bytes()

    def caption(name: str) -> str:
        return (demo_folder / name).with_suffix(".txt").read_text()

    outside = base / "outside"
    (outside / "folder").mkdir(parents=True)
    canary = png(Image.new("RGB", (300, 200), (9, 99, 199)))
    (outside / "canary.png").write_bytes(canary)
    (outside / "secret.txt").write_bytes(SECRET + b"\n")
    (outside / "folder" / "inner.png").write_bytes(canary)

    root = base / "in"
    root.mkdir()
    corpus = Corpus(root, outside, canary)
    expect = corpus.expect

    # good images with captions, the already-handled troubles, and hostile names
    for name in ("astronaut.jpg", "coffee.jpg", "chelsea.jpg"):
        (root / name).write_bytes(demo(name))
        (root / name).with_suffix(".txt").write_text(caption(name))
        expect[name] = "keep"
    (root / HOSTILE_NAME).write_bytes(demo("china.jpg"))
    (root / HOSTILE_NAME).with_suffix(".txt").write_text(HOSTILE_CAPTION)
    expect[HOSTILE_NAME] = "keep"
    with open(os.fsencode(root) + b"/" + NON_UTF8, "wb") as handle:
        handle.write(demo("flower.jpg"))
    expect["caf\\xe9-latin1.jpg"] = "keep"
    (root / "empty.jpg").write_bytes(b"")
    expect["empty.jpg"] = reasons.ZERO_BYTE
    (root / "notes.jpg").write_bytes(b"not a picture\n" * 8)
    expect["notes.jpg"] = reasons.NOT_AN_IMAGE
    (root / "tiny.png").write_bytes(png(Image.new("RGB", (16, 16), (5, 5, 5))))
    expect["tiny.png"] = reasons.TOO_SMALL

    # a truncated PNG carrying EXIF (the EXIF read used to sit outside the decode's try)
    whole = png(Image.open(io.BytesIO(demo("hopper.jpg"))).convert("RGB"), exif=True)
    corpus.truncated_png = whole[: len(whole) // 2]
    (root / "truncated.png").write_bytes(corpus.truncated_png)
    expect["truncated.png"] = reasons.TRUNCATED
    corpus.bomb = bomb_png()
    (root / "bomb.png").write_bytes(corpus.bomb)
    expect["bomb.png"] = reasons.DECOMPRESSION_BOMB

    # links: out of the input (file, secret, folder), inside it, and a caption sidecar out
    os.symlink(outside / "canary.png", root / "link_out.png")
    expect["link_out.png"] = reasons.UNSAFE_PATH
    os.symlink(outside / "secret.txt", root / "link_secret.jpg")
    expect["link_secret.jpg"] = reasons.UNSAFE_PATH
    os.symlink(outside / "folder", root / "link_folder")
    expect["link_folder"] = reasons.UNSAFE_PATH
    os.symlink("astronaut.jpg", root / "link_in.jpg")
    expect["link_in.jpg"] = reasons.EXACT_DUPLICATE
    (root / "caption_link.jpg").write_bytes(demo("camera.jpg"))
    os.symlink(outside / "secret.txt", root / "caption_link.txt")
    expect["caption_link.jpg"] = reasons.UNSAFE_PATH
    os.mkfifo(root / "pipe.jpg")
    expect["pipe.jpg"] = reasons.UNSAFE_PATH

    # hidden files and folders are counted, never read
    (root / ".secret.jpg").write_bytes(demo("coins.jpg"))
    expect[".secret.jpg"] = reasons.HIDDEN_FILE
    (root / ".cache").mkdir()
    (root / ".cache" / "x.jpg").write_bytes(demo("coins.jpg"))
    expect[".cache"] = reasons.HIDDEN_FILE

    # caption sidecars: binary garbage, Latin-1 text (not UTF-8), and far over the length cap.
    # A caption that is not text is dropped and its valid image kept (recaptioning gives it one).
    (root / "garbage_caption.jpg").write_bytes(demo("rocket.jpg"))
    (root / "garbage_caption.txt").write_bytes(bytes(range(256)) * 8)
    expect["garbage_caption.jpg"] = "keep"
    (root / "latin1_caption.jpg").write_bytes(demo("brick.jpg"))
    (root / "latin1_caption.txt").write_bytes("un mur de briques gris, caf\u00e9".encode("latin-1"))
    expect["latin1_caption.jpg"] = "keep"
    corpus.captions_dropped = {"garbage_caption.jpg", "latin1_caption.jpg"}
    (root / "long_caption.jpg").write_bytes(demo("page.jpg"))
    (root / "long_caption.txt").write_text("word " * 40_000)
    expect["long_caption.jpg"] = reasons.BAD_CAPTION

    # tar shards: garbage, and a good shard cut in the middle of its second image
    shards = root / "shards"
    shards.mkdir()
    (shards / "garbage.tar").write_bytes(b"this is not a tar archive at all\n" * 40)
    expect["shards/garbage.tar"] = reasons.CORRUPT_SHARD
    full = _tar(
        shards / "cut.tar",
        [
            ("hubble.jpg", demo("hubble.jpg")),
            ("hubble.txt", caption("hubble.jpg").encode()),
            ("text.jpg", demo("text.jpg")),
            ("text.txt", b"formulas"),
        ],
    )
    cut = full.index(demo("text.jpg")) + 1000
    (shards / "cut.tar").write_bytes(full[:cut])
    expect["shards/cut.tar/hubble.jpg"] = "keep"
    expect["shards/cut.tar"] = reasons.CORRUPT_SHARD
    _tar(
        shards / "latin1.tar",
        [("grass.jpg", demo("grass.jpg")), ("grass.txt", "herbe fran\u00e7aise".encode("latin-1"))],
    )
    expect["shards/latin1.tar/grass.jpg"] = "keep"
    corpus.captions_dropped.add("shards/latin1.tar/grass.jpg")

    # parquet: image cells that are dicts naming files, a string column, an int column, garbage
    struct_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [
        ("good", {"bytes": demo("immuno.jpg"), "path": None}, "stained cells"),
        ("abs_path", {"bytes": None, "path": str(outside / "canary.png")}, "x"),
        ("rel_path", {"bytes": None, "path": "../outside/canary.png"}, "x"),
        ("in_path", {"bytes": None, "path": "astronaut.jpg"}, "x"),
    ]
    pq.write_table(
        pa.table(
            {
                "key": [c[0] for c in cells],
                "image": pa.array([c[1] for c in cells], struct_type),
                "caption": [c[2] for c in cells],
            }
        ),
        root / "cells.parquet",
    )
    expect["cells.parquet:good"] = "keep"
    for key in ("abs_path", "rel_path", "in_path"):
        expect[f"cells.parquet:{key}"] = reasons.UNSAFE_PATH
    pq.write_table(
        pa.table({"key": ["s"], "image": ["not bytes at all"]}), root / "strings.parquet"
    )
    expect["strings.parquet:s"] = reasons.INVALID_CELL
    pq.write_table(pa.table({"key": ["n"], "image": [10**12]}), root / "ints.parquet")
    expect["ints.parquet:n"] = reasons.INVALID_CELL
    (root / "broken.parquet").write_bytes(b"PAR1 but not really a parquet file" * 10)
    expect["broken.parquet"] = reasons.CORRUPT_SHARD
    # a binary caption column whose cell is Latin-1: the image is kept, the caption dropped
    pq.write_table(
        pa.table(
            {
                "key": ["l1"],
                "image": [demo("retina.jpg")],
                "caption": ["r\u00e9tine".encode("latin-1")],
            }
        ),
        root / "latin1_cells.parquet",
    )
    expect["latin1_cells.parquet:l1"] = "keep"
    corpus.captions_dropped.add("latin1_cells.parquet:l1")

    # issue 24: a saved dataset whose state.json reads a data file outside the input
    escaped = root / "escaped_ds"
    datasets.Dataset.from_dict({"image": [canary], "caption": ["from outside"]}).save_to_disk(
        str(outside / "ds")
    )
    escaped.mkdir()
    for name in ("dataset_info.json", "state.json"):
        (escaped / name).write_bytes((outside / "ds" / name).read_bytes())
    state = json.loads((escaped / "state.json").read_text())
    for entry in state["_data_files"]:
        entry["filename"] = f"../../outside/ds/{entry['filename']}"
    (escaped / "state.json").write_text(json.dumps(state))
    expect["escaped_ds"] = reasons.CORRUPT_SHARD
    # a tar holding dup.png twice: the first is read, the second counted and rejected
    _tar(shards / "dup.tar", [("dup.png", demo("coins.jpg")), ("dup.png", demo("strip.jpg"))])
    expect["shards/dup.tar/dup.png"] = "keep"
    expect["shards/dup.tar/dup.png#2"] = reasons.DUPLICATE_MEMBER
    # a caption sidecar of 100,000 nested brackets (json.loads would raise RecursionError)
    (root / "deep_json.jpg").write_bytes(demo("grass.jpg"))
    (root / "deep_json.json").write_text("[" * 100_000 + "]" * 100_000)
    expect["deep_json.jpg"] = reasons.BAD_CAPTION
    # a gzip tar of ~300 KB whose one member is BIG_MEMBER bytes: refused from its header
    big_tar(shards / "big.tar")
    expect["shards/big.tar/big.png"] = reasons.TOO_LARGE
    # hard links: to a file outside the input (refused like a symlink), and inside it (read)
    os.link(outside / "canary.png", root / "hardlink_out.png")
    expect["hardlink_out.png"] = reasons.UNSAFE_PATH
    os.link(root / "astronaut.jpg", root / "hardlink_in.jpg")
    expect["hardlink_in.jpg"] = reasons.EXACT_DUPLICATE
    return corpus


BIG_MEMBER = (256 << 20) + (4 << 20)  # just over curate's default max_image_bytes (256 MiB)


def big_tar(path: Path, size: int = BIG_MEMBER) -> None:
    """A gzip tar whose member big.png is SIZE bytes of a PNG signature then zeros, written in
    1 MiB pieces (the file is small; reading the member would take SIZE bytes of memory)."""
    info = tarfile.TarInfo("big.png")
    info.size, info.mtime, info.mode = size, 0, 0o644
    with open(path, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz", compresslevel=1) as tar:
        tar.addfile(info, _Zeros(b"\x89PNG\r\n\x1a\n", size))


class _Zeros(io.RawIOBase):
    """HEAD then zeros, SIZE bytes in all, as a readable file."""

    def __init__(self, head: bytes, size: int) -> None:
        self.head, self.left, self.sent = head, size, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        start = self.sent
        chunk = self.head[start : start + n] if start < len(self.head) else b""
        chunk += bytes(n - len(chunk))
        self.left -= n
        self.sent += n
        return chunk


def tree_hash(root: Path) -> str:
    """One hash of every entry under ROOT: its path, kind, bytes (or link target) and mtime."""
    digest = hashlib.sha256()
    for directory, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(dirs + files):
            path = os.path.join(directory, name)
            info = os.lstat(path)
            digest.update(os.path.relpath(path, root).encode("utf-8", "surrogateescape") + b"\0")
            digest.update(f"{stat.S_IFMT(info.st_mode)}\0".encode())
            if stat.S_ISLNK(info.st_mode):
                digest.update(os.readlink(path).encode())
            elif stat.S_ISREG(info.st_mode):
                digest.update(Path(path).read_bytes() + f"\0{info.st_mtime_ns}".encode())
    return digest.hexdigest()
