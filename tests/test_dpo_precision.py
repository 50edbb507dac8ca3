"""DPO's precision defaults: bf16 autocast and a bf16 frozen base on a GPU, fp32 on the CPU.

An fp32 base without autocast costs SD3.5-Medium about 45 GiB at batch 1 (docs/gpu.md); the
selection is checked here on the CPU with the GPU queries answered as a GPU machine would.
"""

import pytest
import torch

from dpo.config import DPOConfig
from dpo.trainer import precision_of


@pytest.fixture
def gpu(monkeypatch):
    """Make torch report a CUDA device; bf16 support as the test sets it."""

    def answer(bf16: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)

    return answer


def config(**options) -> DPOConfig:
    return DPOConfig(model="sd3.5-medium", **options)


def test_on_a_cpu_the_defaults_stay_fp32_without_autocast(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision_of(config()) == ("no", "fp32")


def test_on_a_bf16_gpu_the_defaults_pick_bf16_autocast_and_a_bf16_base(gpu):
    gpu(bf16=True)
    assert precision_of(config()) == ("bf16", "bf16")
    assert precision_of(config(device="cuda:0")) == ("bf16", "bf16")


def test_device_cpu_on_a_gpu_machine_stays_fp32(gpu):
    gpu(bf16=True)
    assert precision_of(config(device="cpu")) == ("no", "fp32")


def test_a_gpu_without_bf16_gets_no_autocast_unless_asked(gpu):
    gpu(bf16=False)
    assert precision_of(config()) == ("no", "fp32")
    assert precision_of(config(mixed_precision="fp16")) == ("fp16", "fp16")


def test_explicit_choices_are_kept(gpu):
    gpu(bf16=True)
    assert precision_of(config(lora_base_dtype="fp32")) == ("bf16", "fp32")
    assert precision_of(config(mixed_precision="no")) == ("no", "fp32")
    assert precision_of(config(mixed_precision="no", lora_base_dtype="bf16")) == ("no", "bf16")
