"""The fused block-rotation kernels (``boftvision.ops.block_kernel``) equal the einsum reference:
outputs and both gradients on 2-D / non-contiguous 3-D / 4-D / one-token inputs for block widths
8–64, the OFT/BOFT layers that use them (collapsed and two-product butterflies, both orientations),
fallback for what they do not take, and torch.compile without a graph break. On CPU through Triton's
interpreter (fp32, fp16); on CUDA (fp32, fp16, bf16) in the `gpu` test."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def check(device: str, **env) -> dict:
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "kernel_check.py"), "--device", device],
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def assert_kernels_match(result: dict) -> None:
    for case, (out, grad_x, grad_blocks) in result["ops"].items():
        tol = 1e-5 if "float32" in case else 1e-2  # fp16/bf16: relative to the largest reference value
        assert max(out, grad_x, grad_blocks) <= tol, (case, out, grad_x, grad_blocks)
    for case, fallback in result["fallback"].items():
        assert not fallback["taken"] and fallback["error"] == 0.0, case
    for case, error in result["adapters"].items():
        assert error <= 1e-5, (case, error)
    assert result["compile"]["graph_breaks"] == 0 and result["compile"]["graphs"] == 1
    assert result["compile"]["error"] <= 1e-6


def test_kernels_under_the_triton_interpreter():
    pytest.importorskip("triton")
    result = check("cpu", TRITON_INTERPRET="1")
    assert len(result["ops"]) == 4 * 2 * 4  # block widths × dtypes × input shapes
    assert_kernels_match(result)


@pytest.mark.gpu
def test_kernels_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    result = check("cuda")
    assert len(result["ops"]) == 4 * 3 * 4
    assert_kernels_match(result)
