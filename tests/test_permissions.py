"""Written files get the permissions the user's umask asks for.

safetensors' save_file creates owner-only (0600) files whatever the umask, so a LoRA or a model
folder would be unreadable to a ComfyUI server running as another user. Each stage gives what it
writes the umask's permissions; these tests run a small chain of stages in a fresh process under
umask 022 (every file world-readable) and under umask 077 (nothing readable by others).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from curate.runtime.store_writer import process_umask, share_like_umask

ROOT = Path(__file__).resolve().parents[1]

CHAIN = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from flows.cli import main as t2i
    from train_sets import shapes_encoded

    work = Path(sys.argv[1])

    def run(*argv):
        assert t2i([str(a) for a in argv]) == 0, argv

    run("demo-data", work / "raw", "--format", "folder")
    run("init-model", work / "model", "--preset", "tiny")
    encoded, _ = shapes_encoded(str(work / "model"), work / "shapes", 8)
    quick = ["--model", work / "model", "--device", "cpu", "--batch-size", "4", "--max-steps", "2",
             "--warmup-steps", "1", "--val-every", "0", "--sample-every", "0", "--checkpoint-every", "1",
             "--val-fraction", "0.25"]
    run("train", encoded, work / "full", *quick)
    run("train", encoded, work / "lora-train", *quick, "--lora-rank", "4")
    run("make-prefs", work / "prefs", "--source", work / "raw", "--pairs-per-image", "1")
    run("dpo", work / "prefs", work / "dpo", "--model", work / "model", "--max-steps", "2", "--lora-rank", "4",
        "--batch-size", "2", "--checkpoint-every", "1", "--eval-seeds", "1", "--eval-steps", "2",
        "--scorer", "attribute:warm")
    run("lora-convert", work / "dpo", work / "comfy.safetensors", "--to", "comfyui")
    run("export-single-file", work / "full", work / "single.safetensors")
    """
).format(tests=str(ROOT / "tests"))


def _written(root: Path) -> list[tuple[Path, int]]:
    """Everything under ROOT (made by the test, outside the chain) with its permission bits."""
    return [
        (p, stat.S_IMODE(p.lstat().st_mode))
        for p in root.rglob("*")
        if not p.is_symlink() and (p.is_file() or p.is_dir())
    ]


@pytest.fixture(scope="module", params=[0o022, 0o077], ids=["umask022", "umask077"])
def chain(request, tmp_path_factory) -> tuple[int, Path]:
    mask = request.param
    work = tmp_path_factory.mktemp(f"umask{mask:03o}") / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHAIN, str(work)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.umask(mask),
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return mask, work


def test_every_written_file_follows_the_umask(chain):
    mask, work = chain
    written = _written(work)
    weights = [p for p, _ in written if p.suffix == ".safetensors"]
    # the chain wrote model folders, encoded shards, checkpoints and LoRAs in every key style
    assert any(p.name == "pytorch_lora_weights.safetensors" for p in weights)
    assert any("checkpoint" in str(p) for p in weights)
    assert any(p.name == "diffusion_pytorch_model.safetensors" for p in weights)
    assert (work / "comfy.safetensors").is_file() and (work / "single.safetensors").is_file()
    assert list((work / "dpo" / "logs").glob("events.out.tfevents.*"))  # --report-to's default
    if mask == 0o022:
        unreadable = [str(p) for p, mode in written if not mode & stat.S_IROTH]
        closed = [str(p) for p, mode in written if p.is_dir() and not mode & stat.S_IXOTH]
        assert not unreadable and not closed, (unreadable[:10], closed[:10])
    else:
        shared = [f"{p} {mode:o}" for p, mode in written if mode & 0o077]
        assert not shared, shared[:10]


def test_share_like_umask_adds_only_what_the_umask_allows(tmp_path):
    old = os.umask(0o027)
    try:
        assert process_umask() == 0o027
        folder = tmp_path / "f"
        folder.mkdir(mode=0o700)
        weights, script = folder / "w.safetensors", folder / "run.sh"
        weights.write_bytes(b"x")
        script.write_bytes(b"x")
        os.chmod(weights, 0o600)
        os.chmod(script, 0o700)
        share_like_umask(folder)
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert stat.S_IMODE(weights.stat().st_mode) == 0o640
    assert stat.S_IMODE(script.stat().st_mode) == 0o740  # the owner's exec bit is kept
