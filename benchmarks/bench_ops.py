"""The pieces of an OFT/BOFT layer's cost on one 1024-wide layer (2048 fp32 tokens by default), in ms:
one GEMM of the layer; one block product (8-, 32- and 64-wide blocks) forward + backward; the collapsed
m = 2, b = 8 product (16-wide blocks); the full butterfly's two block products forward + backward and
forward alone — each as the plain einsum and as the layers run it (``ops.block_kernel.block_rotate``:
oneDNN grouped convolutions on CPU for blocks ≥ 32 wide; ``ops.orthogonal.apply_factor``: chunk copies
around one batched product for narrower blocks; ``ops.block_kernel.two_product_rotate``: both products
chained over token chunks) — and the permuted copy that moves 4-float chunks as 16-byte elements against
a plain permute; also a dense product as a oneDNN convolution, the batched rotation operands of four
layers and their Cayley step (closed-form backward against autograd through a solve), the output scale's
two forms, and the frozen product with the scale, the scale folded into the input gradient's product
(``ScaledLinear``) or applied to the output gradient first. Every piece runs once per round, ``--iters``
rounds, and reports its fastest: the machine's drifts reach all pieces alike. These are the measurements
behind the cost model's CPU constants (``adapters.orthogonal.PASS_COST``) and the CPU paths' choices.

    python benchmarks/bench_ops.py --iters 40
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from boftvision.ops.block_kernel import block_rotate, two_product_rotate
from boftvision.ops.orthogonal import (
    apply_two_product,
    block_product,
    cayley,
    collapse_butterfly,
    permute_copy,
    scale_shift,
    scaled_linear,
    skew_from_square,
    two_product_operands,
)


def fastest_ms(rows: dict, iters: int) -> dict:
    """Each row's fastest time over ``iters`` rounds that run every row once (after one warm-up round)."""
    times = {label: [] for label in rows}
    for round_ in range(iters + 1):
        for label, fn in rows.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[label].append(time.perf_counter() - start)
    return {label: min(t) * 1000 for label, t in times.items()}


def einsum_product(v: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``v @ blockdiag(blocks)`` as one plain einsum (the reference the CPU paths are measured against)."""
    n, b, _ = blocks.shape
    return torch.einsum("...nk,nkc->...nc", v.reshape(*v.shape[:-1], n, b), blocks).reshape(v.shape)


def solved_cayley(q: torch.Tensor) -> torch.Tensor:
    """``(I − Q)(I + Q)⁻¹`` through ``torch.linalg.solve`` (PEFT's form; autograd differentiates the solve)."""
    eye = torch.eye(q.shape[-1])
    return torch.linalg.solve(eye + q, eye - q, left=False)


def forward_backward(fn, *inputs):
    def run():
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        out.backward(torch.ones_like(out))
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=25)
    args = parser.parse_args()
    torch.manual_seed(0)
    d, t, b = args.width, args.tokens, 8
    x, weight = torch.randn(t, d), torch.randn(d, d)
    m2 = collapse_butterfly(cayley(skew_from_square(0.1 * torch.randn(2, d // b, b, b))))
    full_m = d.bit_length() - b.bit_length() + 1  # log2(d / b) + 1
    low, high = two_product_operands(cayley(skew_from_square(0.1 * torch.randn(full_m, d // b, b, b))))
    chunks = (t, 16, d // 64, b // 2)  # (tokens, j, l, b/2) as in the high product
    image = x.view(1, 1, t, d).permute(0, 3, 1, 2)  # x as one channels-last image of t pixels
    rows = {"GEMM x W^T (forward only)": lambda: x @ weight.T,
            "x W^T as a oneDNN 1x1 convolution (forward only)": lambda: F.conv2d(image, weight.view(d, d, 1, 1))}
    for width in (8, 32, 64):
        blocks = cayley(skew_from_square(0.1 * torch.randn(d // width, width, width)))
        as_run = block_product if width < 16 else block_rotate
        for name, product in (("einsum", einsum_product), ("as run", as_run)):
            rows[f"one block product b={width}, forward + backward ({name})"] = forward_backward(product, x, blocks)
    for name, product in (("einsum", einsum_product), ("as run", block_rotate)):
        # as run: the layers' CPU chain of both products over token chunks (two_product_rotate)
        def two_products(v, lo, hi, p=product):
            return two_product_rotate(v, lo, hi, full_m, b) if p is block_rotate else \
                apply_two_product(v, lo, hi, full_m, b, product=p)

        rows |= {
            f"collapsed block product m=2 b=8, forward + backward ({name})": forward_backward(product, x, m2),
            f"two block products (full butterfly m={full_m}, b=8), forward + backward ({name})": forward_backward(
                two_products, x, low, high),
            f"two block products, forward ({name})": lambda f=two_products: f(x, low, high),
        }
    raw = 0.1 * torch.randn(full_m, 4 * d // b, b, b)  # four layers' full butterflies, as one batch
    s_, bias = torch.randn(d), torch.randn(d)
    rows |= {
        f"Cayley transform of {raw.numel() // b**2} {b}x{b} blocks, forward + backward (closed-form backward)":
            forward_backward(lambda r: cayley(skew_from_square(r)), raw),
        f"Cayley transform of {raw.numel() // b**2} {b}x{b} blocks, forward + backward (autograd through a solve)":
            forward_backward(lambda r: solved_cayley(skew_from_square(r)), raw),
        f"rotation operands of 4 layers (m={full_m}, b=8), forward + backward": forward_backward(
            lambda r: torch.cat([o.reshape(-1) for o in two_product_operands(cayley(skew_from_square(r)))]), raw),
        "scale and bias, forward + backward (ScaleShift)": forward_backward(scale_shift, x, s_, bias),
        "scale and bias, forward + backward (autograd's addcmul)": forward_backward(torch.addcmul, bias, x, s_),
        "frozen product, scale and bias, forward + backward (ScaledLinear)": forward_backward(
            lambda v, s, shift: scaled_linear(v, weight, s, shift), x, s_, bias),
        "frozen product, scale and bias, forward + backward (F.linear, then ScaleShift)": forward_backward(
            lambda v, s, shift: scale_shift(F.linear(v, weight), s, shift), x, s_, bias),
        "permuted copy, b/2-chunks as 16-byte elements": lambda: permute_copy(x, chunks, (0, 2, 1, 3)),
        "permuted copy, plain permute": lambda: x.reshape(chunks).permute(0, 2, 1, 3).contiguous(),
    }
    print(f"width={d} tokens={t} fp32 torch={torch.__version__} threads={torch.get_num_threads()}")
    print("| piece | ms |\n|---|---|")
    for label, ms in fastest_ms(rows, args.iters).items():
        print(f"| {label} | {ms:.3f} |")


if __name__ == "__main__":
    main()
