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


def test_cpu_block_product_as_grouped_convolutions_equals_the_einsum():
    """On CPU (no interpreter) fp32 blocks ≥ 32 wide run as oneDNN grouped 1×1 convolutions with a
    batched-GEMM block gradient; outputs and both gradients equal the einsum reference."""
    from boftvision.ops import block_kernel
    from boftvision.ops.orthogonal import apply_factor

    if not block_kernel.ONEDNN:
        pytest.skip("this torch build has no oneDNN")
    torch.manual_seed(0)
    for b in (32, 64):
        width = 4 * b
        inputs = {"2-D": torch.randn(37, width), "one token": torch.randn(1, width),
                  "3-D non-contiguous": torch.randn(3, width, 5).transpose(1, 2),
                  "4-D": torch.randn(2, 3, 5, width)}
        for name, x in inputs.items():
            blocks = torch.randn(width // b, b, b) / b ** 0.5
            assert block_kernel.grouped_supported(x, blocks) and not block_kernel.supported(x, blocks)
            grad = torch.randn(x.shape)
            results = []
            for product in (block_kernel.block_rotate, lambda v, r: apply_factor(v, r, 0)):
                xl, rl = x.detach().requires_grad_(), blocks.detach().requires_grad_()
                out = product(xl, rl)
                results.append((out, *torch.autograd.grad(out, (xl, rl), grad)))
            for ours, ref in zip(*results):
                assert ours.shape == ref.shape
                assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max(), (b, name)
    x = torch.randn(4, 64)
    for blocks in (torch.randn(4, 16, 16), torch.randn(2, 32, 32, dtype=torch.float64)):  # 16 wide, fp64
        xx = x.to(blocks.dtype)
        assert not block_kernel.grouped_supported(xx, blocks)
        assert torch.equal(block_kernel.block_rotate(xx, blocks), apply_factor(xx, blocks, 0))


def test_cpu_two_product_chain_equals_the_step_by_step_form(monkeypatch):
    """A deeper butterfly's two products on CPU run as one chain over chunks of tokens (TwoProductChain):
    outputs and every gradient equal apply_two_product with the einsum block product, both orientations,
    inputs spanning several chunks (odd counts, one token, non-contiguous 3-D, 4-D), and with only some
    gradients wanted."""
    from boftvision.ops import block_kernel
    from boftvision.ops.orthogonal import apply_two_product, cayley, skew_from_square, two_product_operands

    if not block_kernel.ONEDNN:
        pytest.skip("this torch build has no oneDNN")
    torch.manual_seed(0)
    for width, b, m in ((256, 8, 6), (512, 16, 5)):  # blocks 32 and 32 wide; 64 and 32 wide, two segments
        monkeypatch.setattr(block_kernel, "CHAIN_CHUNK", 7 * width * 4)  # 7 tokens per chunk
        low, high = two_product_operands(cayley(skew_from_square(0.2 * torch.randn(m, width // b, b, b))))
        inputs = {"2-D": torch.randn(37, width), "one token": torch.randn(1, width),
                  "3-D non-contiguous": torch.randn(3, width, 5).transpose(1, 2), "4-D": torch.randn(2, 3, 5, width)}
        for (name, x), transpose in ((case, t) for case in inputs.items() for t in (False, True)):
            assert block_kernel.grouped_supported(x, low) and block_kernel.grouped_supported(x, high)
            grad = torch.randn(x.shape)
            for wanted in ((True, True, True), (False, True, True), (True, False, False)):
                results = []
                for chained in (True, False):
                    leaves = [t.detach().requires_grad_(w) for t, w in zip((x, low, high), wanted)]
                    out = block_kernel.two_product_rotate(*leaves, m, b, transpose) if chained else \
                        apply_two_product(*leaves, m, b, transpose=transpose)
                    results.append((out, *torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad)))
                for ours, ref in zip(*results):
                    assert ours.shape == ref.shape
                    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max(), (width, name, transpose, wanted)
