"""What a user sees on the console: one progress display per stage, no library chatter.

Each command runs in a fresh process, as a user would start it, and its stderr is read line by
line (tqdm redraws with carriage returns, so those split lines too).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Bars and warnings of the libraries under the stages; none may reach the console.
LIBRARY_NOISE = (
    "Saving the dataset",  # datasets' save_to_disk
    "Loading weights",  # transformers' from_pretrained
    "Writing model shards",  # transformers' save_pretrained
    "Loading pipeline components",  # diffusers' from_pretrained
    "kernels",  # bitsandbytes' optional 4-bit CPU kernel, which this project never uses
    "gemm_4bit",
)
BAR = re.compile(r"^(?P<desc>[^:|]+?):\s+\d+%\|")  # "desc:  40%|████      | 4/10 ..."


def t2i(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for name in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(name, None)  # the command must quiet them itself
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *map(str, argv)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def lines(stderr: str) -> list[str]:
    return [line.strip() for line in re.split(r"[\r\n]", stderr) if line.strip()]


def bars(stderr: str) -> set[str]:
    """The descriptions of the progress bars drawn on STDERR."""
    return {m["desc"].strip() for line in lines(stderr) if (m := BAR.match(line))}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quiet") / "model"
    done = t2i("init-model", out, "--preset", "tiny")
    assert done.returncode == 0, done.stderr
    noisy = [line for line in lines(done.stderr) if any(n in line for n in LIBRARY_NOISE)]
    assert not noisy, noisy
    return out


def test_an_error_is_one_line_with_no_optional_kernel_warning(model, tmp_path):
    done = t2i("dpo", tmp_path / "missing", tmp_path / "out", "--model", model)
    assert done.returncode == 1
    assert lines(done.stderr) == [
        f"t2i dpo: error: preference input {tmp_path / 'missing'} does not exist"
    ]


def test_importing_a_stage_quiets_the_bitsandbytes_kernel_logger_first():
    """The warning only shows on CPUs with AVX512-BF16; the logger must be quiet on any machine."""
    code = (
        "import logging, dpo.trainer, model.train;"
        "print(logging.getLogger('bitsandbytes.backends.cpu.ops').getEffectiveLevel())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) >= 40  # logging.ERROR
    assert not [line for line in lines(done.stderr) if "kernels" in line]


def test_a_stage_draws_only_its_own_progress_bars(model, demo_folder, tmp_path):
    source = tmp_path / "images"
    source.mkdir()
    for name in ("astronaut.jpg", "coffee.jpg", "chelsea.jpg"):
        for file in (demo_folder / name, (demo_folder / name).with_suffix(".txt")):
            (source / file.name).write_bytes(file.read_bytes())
    prefs = t2i("make-prefs", tmp_path / "pairs", "--source", source)
    assert prefs.returncode == 0, prefs.stderr
    sample = t2i(
        "sample",
        "--model",
        model,
        "--prompt",
        "a red cat",
        "--seed",
        "0",
        "--steps",
        "2",
        "--out",
        tmp_path / "samples",
    )
    assert sample.returncode == 0, sample.stderr
    for done in (prefs, sample):
        noisy = [line for line in lines(done.stderr) if any(n in line for n in LIBRARY_NOISE)]
        assert not noisy, noisy
    assert bars(sample.stderr) <= {"sampling"}, bars(sample.stderr)
