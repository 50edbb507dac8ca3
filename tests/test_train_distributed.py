"""`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): two processes train the same
steps as one process with gradient accumulation 2, and a checkpoint of either resumes in the other."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_sets import shapes_encoded

from model.config import TrainConfig
from model.train import train

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")
RAW = Path("training") / "checkpoints" / "step-00000004" / "model.safetensors"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(model: str, **overrides) -> TrainConfig:
    base = dict(
        model=model,
        device="cpu",
        batch_size=2,
        max_steps=4,
        warmup_steps=1,
        lr=1e-3,
        val_fraction=0.0,
        sample_count=0,
        checkpoint_every=2,
        log_every=2,
        mixed_precision="no",
    )
    return TrainConfig(**{**base, **overrides})


def flags(cfg: TrainConfig) -> list[str]:
    out = []
    for name, value in cfg.model_dump(exclude_defaults=True).items():
        out += ["--" + name.replace("_", "-"), str(value)]
    return out


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.skipif(not ACCELERATE.is_file(), reason="accelerate's launcher is not installed")
def test_two_gloo_processes_train_like_one_with_grad_accumulation_and_resume_across(
    tmp_path, tiny_model_dir
):
    encoded = shapes_encoded(tiny_model_dir, tmp_path / "shapes", 16)[0]
    two = tmp_path / "two"
    command = [
        str(ACCELERATE),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(free_port()),
        "-m",
        "flows.cli",
        "train",
        str(encoded),
        str(two),
        *flags(config(tiny_model_dir)),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    from model.encoded import EncodedDataset

    reader = EncodedDataset(encoded)
    one = train(reader, tmp_path / "one", config(tiny_model_dir, grad_accum=2))
    assert close(load_file(two / RAW), load_file(one / RAW)) < 1e-6
    exported = Path("transformer") / "diffusion_pytorch_model.safetensors"
    assert close(load_file(two / exported), load_file(one / exported)) < 1e-6
    # Not vacuous: one process without accumulation sees half the data per step and ends elsewhere.
    plain = train(reader, tmp_path / "plain", config(tiny_model_dir))
    assert close(load_file(two / RAW), load_file(plain / RAW)) > 1e-4

    # The two-process run's step-2 checkpoint, resumed by one process with accumulation 2.
    resumed = tmp_path / "resumed"
    shutil.copytree(
        two / "training" / "checkpoints" / "step-00000002",
        resumed / "training" / "checkpoints" / "step-00000002",
    )
    train(reader, resumed, config(tiny_model_dir, grad_accum=2, resume="latest"))
    assert close(load_file(resumed / RAW), load_file(two / RAW)) < 1e-6
