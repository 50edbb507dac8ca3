"""benchmarks/gpu_step.py runs end to end in its CPU smoke mode (the GPU figures come from a device run)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_step.py"


def test_the_gpu_step_benchmark_reports_its_figures_in_smoke_mode():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (result,) = module.main(["--smoke", "--device", "cpu"])
    assert (
        result["depth"] == 2 and result["batch"] == 2 and result["tokens_per_sample"] == 16 + 77 + 8
    )
    assert result["s_per_step"] > 0 and result["tokens_per_s"] > 0
    assert result["TFLOP_per_step"] > 0 and 0 < result["MFU"] < 1.5
