"""The fused block-rotation kernels against the einsum reference; prints one JSON object of errors.

    TRITON_INTERPRET=1 python tests/kernel_check.py            # CPU, Triton's interpreter (fp32, fp16)
    python tests/kernel_check.py --device cuda                 # GPU (fp32, fp16, bf16)

Used by tests/test_kernels.py (TRITON_INTERPRET must be set before Triton compiles anything, so the
check runs in its own process). Errors are relative: max |kernel − reference| / max |reference|.
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import torch

import boftvision as bv
from boftvision.adapters import orthogonal
from boftvision.ops import block_kernel
from boftvision.ops.block_kernel import block_rotate, supported
from boftvision.ops.orthogonal import apply_factor


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def op_errors(device: str, dtypes: list[torch.dtype]) -> dict:
    """Output, input gradient and blocks' gradient on 2-D, non-contiguous 3-D, 4-D and 1-token inputs."""
    errors = {}
    for b in block_kernel.BLOCK_SIZES:
        n = 3
        for dtype in dtypes:
            g = torch.Generator().manual_seed(b)
            shapes = {"2d-37": torch.randn(37, n * b, generator=g),
                      "3d-strided": torch.randn(2, 37, n * b, generator=g)[:, ::2],
                      "4d": torch.randn(2, 3, 5, n * b, generator=g), "1-token": torch.randn(1, n * b, generator=g)}
            blocks = torch.randn(n, b, b, generator=g)
            for name, x in shapes.items():
                x = x.to(device, dtype).requires_grad_()
                r = blocks.to(device, dtype).requires_grad_()
                assert supported(x, r), (b, dtype, name)
                y = block_rotate(x, r)
                grad = torch.randn(y.shape, generator=g).to(device, dtype)
                dx, dr = torch.autograd.grad(y, (x, r), grad)
                xf, rf = x.detach().double().requires_grad_(), r.detach().double().requires_grad_()
                yf = apply_factor(xf, rf, 0)
                dxf, drf = torch.autograd.grad(yf, (xf, rf), grad.double())
                errors[f"b{b}-{str(dtype)[6:]}-{name}"] = [relative(y, yf), relative(dx, dxf), relative(dr, drf)]
    return errors


def fallback_errors(device: str) -> dict:
    """Calls the kernels do not take (block widths 4 and 128; bf16 under the interpreter) give the reference."""
    cases = {"b4": (4, torch.float32), "b128": (128, torch.float32)}
    if device == "cpu":
        cases["bf16-interpreted"] = (16, torch.bfloat16)
    errors = {}
    for name, (b, dtype) in cases.items():
        x = torch.randn(9, 2 * b, device=device, dtype=dtype)
        r = torch.randn(2, b, b, device=device, dtype=dtype)
        errors[name] = {"taken": supported(x, r), "error": relative(block_rotate(x, r), apply_factor(x, r, 0))}
    return errors


def adapter_errors(device: str) -> dict:
    """OFT, BOFT (collapsed) and a deep BOFT (two block products) layer, input and output orientation,
    activations side: kernels against the reference path — outputs, the input's and every trainable
    parameter's gradient."""
    configs = {"oft-b16": bv.OFTConfig(block_size=16, init_weights=False, use_cayley_neumann=False),
               "boft-m2-b8": bv.BOFTConfig(block_size=8, n_butterfly_factor=2, init_weights=False),
               "boft-m5-b8": bv.BOFTConfig(block_size=8, n_butterfly_factor=5, init_weights=False)}  # two products
    errors = {}
    orthogonal.OrthogonalAdapter.rotation_side = "input"
    try:
        for name, config in configs.items():
            for side in ("input", "output"):
                runs = []
                for enabled in (True, False):
                    block_kernel.ENABLED = enabled
                    torch.manual_seed(0)
                    model = torch.nn.Sequential(torch.nn.Linear(128, 128)).to(device)
                    bv.add_adapter(model, dataclasses.replace(config, target_modules=["0"], orientation=side))
                    x = torch.randn(3, 11, 128, device=device, requires_grad=True)
                    y = model(x)
                    params = [p for p in model.parameters() if p.requires_grad]
                    grads = torch.autograd.grad((y * torch.linspace(-1, 1, 128, device=device)).sum(), [x, *params])
                    runs.append([y, *grads])
                errors[f"{name}-{side}"] = max(relative(a, b) for a, b in zip(*runs))
    finally:
        block_kernel.ENABLED = True
        orthogonal.OrthogonalAdapter.rotation_side = "auto"
    return errors


def compile_check(device: str) -> dict:
    """torch.compile keeps the custom op in one graph (no break) and gives the eager result."""
    def f(x, r):
        return block_rotate(x, r) * 2

    x, r = torch.randn(7, 32, device=device), torch.randn(2, 16, 16, device=device)
    explained = torch._dynamo.explain(f)(x, r)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()
    out = compiled(xg, rg)
    out.sum().backward()
    xe, re_ = x.clone().requires_grad_(), r.clone().requires_grad_()
    f(xe, re_).sum().backward()
    return {"graph_breaks": explained.graph_break_count, "graphs": explained.graph_count,
            "error": max(relative(out, f(x, r)), relative(rg.grad, re_.grad))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    device = p.parse_args().device
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    print(json.dumps({"ops": op_errors(device, dtypes), "fallback": fallback_errors(device),
                      "adapters": adapter_errors(device), "compile": compile_check(device)}))


if __name__ == "__main__":
    main()
