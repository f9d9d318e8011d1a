"""The collapsed BOFT/OFT rotation ``y = x @ blockdiag(R_0 … R_{N−1})`` as fused Triton kernels.

Forward: one read of x, one write of y. Backward, in one kernel: the input gradient ``dx = dy Rᵀ`` and the
blocks' gradient ``dR_n = Σ_t x_tnᵀ dy_tn`` (accumulated over tokens in fp32: per-program partial sums,
added up afterwards in a fixed order, so the result is deterministic) — one read of x and dy. Registered
as the ``torch.library`` custom op ``boftvision::block_rotate`` with fake implementations and autograd,
so ``torch.compile`` keeps it in its graph.

:func:`block_rotate` takes any ``(..., N·b)`` activations (non-contiguous, 3-D/4-D, any token count) and
``(N, b, b)`` blocks. It runs the kernels on CUDA tensors (or on CPU under Triton's interpreter,
``TRITON_INTERPRET=1``, as the tests do; fp32/fp16 there) when ``b`` is 8, 16, 32 or 64 and the dtype is
fp32/fp16/bf16;
On CPU (fp32, blocks 32 wide or more, oneDNN available) the products run as oneDNN grouped 1×1 convolutions
on a channels-last view of the activations (:class:`GroupedProduct`: no copy in or out, where the einsum
transposes x to a batch of blocks and back), and a deeper butterfly's two products with their permuted
copies as one chain over chunks of tokens (:func:`two_product_rotate`); every other case goes to the
einsum reference (``apply_factor(x, blocks, 0)``), never to a wrong result.
"""
from __future__ import annotations

import os

import torch
from torch.autograd.function import once_differentiable

from .orthogonal import (
    SWAP_CHUNKS,
    apply_factor,
    apply_two_product,
    high_coordinates,
    permute_copy,
    permute_into,
)

BLOCK_SIZES = (8, 16, 32, 64)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ENABLED = os.environ.get("BOFTVISION_KERNELS", "1") != "0"  # BOFTVISION_KERNELS=0: reference path only
ONEDNN = torch.backends.mkldnn.is_available()

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch builds without Triton
    triton = None


def supported(x: torch.Tensor, blocks: torch.Tensor) -> bool:
    """Whether the kernels take this call (else :func:`block_rotate` uses the reference)."""
    n, b, _ = blocks.shape
    interpreted = INTERPRET and x.device.type == "cpu"  # the interpreter computes bf16 wrongly (numpy has none)
    return (triton is not None and ENABLED and (x.is_cuda or interpreted)
            and b in BLOCK_SIZES and x.dtype in (DTYPES[:2] if interpreted else DTYPES) and blocks.dtype == x.dtype
            and x.shape[-1] == n * b and x.device == blocks.device and x.numel() > 0)


def block_rotate(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ blockdiag(blocks)``: x (..., N·b), blocks (N, b, b) of x's dtype."""
    if not supported(x, blocks):
        return GroupedProduct.apply(x, blocks) if grouped_supported(x, blocks) else apply_factor(x, blocks, 0)
    lead = x.shape[:-1]
    y = _block_rotate(x.reshape(-1, x.shape[-1]).contiguous(), blocks.contiguous())
    return y.reshape(*lead, x.shape[-1])


def grouped_supported(x: torch.Tensor, blocks: torch.Tensor) -> bool:
    """Whether :func:`block_rotate` takes the oneDNN path: fp32 on CPU, b ≥ 32 (for 8- and 16-wide blocks
    the einsum's batched GEMM is as fast or faster there), not inside a compiled graph (it fuses on its own)."""
    if torch.compiler.is_compiling() or not (ONEDNN and torch.backends.mkldnn.enabled):
        return False
    n, b, _ = blocks.shape
    return (ENABLED and x.device.type == "cpu" and blocks.device.type == "cpu" and b >= 32
            and x.dtype == blocks.dtype == torch.float32 and x.shape[-1] == n * b and x.numel() > 0)


def grouped_product(x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``x`` (T, d) times a block-diagonal matrix given as a grouped 1×1 convolution weight (d, b, 1, 1):
    x viewed as one channels-last image of T pixels, so input and output keep x's row-major layout."""
    tokens, d = x.shape
    image = x.view(1, 1, tokens, d).permute(0, 3, 1, 2)
    return torch.nn.functional.conv2d(image, weight, groups=groups).permute(0, 2, 3, 1).reshape(tokens, d)


class GroupedProduct(torch.autograd.Function):
    """``x @ blockdiag(blocks)`` on CPU: forward and input gradient as oneDNN grouped convolutions
    (weights Bᵀ and B), the blocks' gradient ``dB_n = x_nᵀ dy_n`` as one batched GEMM on strided views.
    All three read the activations in place. Forward + backward on 2048 × 1024 fp32 tokens, a 2-core x86
    CPU (``python benchmarks/bench_ops.py --iters 40``, four runs): 4.8–5.7 ms against the einsum's 7.2–8.1
    (64-wide blocks), 4.2–5.0 against 5.9–7.1 (32-wide); 16-wide blocks measured 7.5 against 6.7 in an
    alternating run of the two, so they keep the einsum."""

    @staticmethod
    def forward(ctx, x, blocks):
        n, b, _ = blocks.shape
        d = x.shape[-1]
        flat = x.reshape(-1, d)
        ctx.save_for_backward(flat, blocks)
        ctx.shape = x.shape
        return grouped_product(flat, blocks.transpose(1, 2).reshape(d, b, 1, 1), n).view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        flat, blocks = ctx.saved_tensors
        (tokens, d), (n, b, _) = flat.shape, blocks.shape
        grad = grad.reshape(tokens, d)
        grad_x = grad_blocks = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_product(grad, blocks.reshape(d, b, 1, 1), n).view(ctx.shape)
        if ctx.needs_input_grad[1]:
            grad_blocks = torch.bmm(flat.view(tokens, n, b).permute(1, 2, 0), grad.view(tokens, n, b).transpose(0, 1))
        return grad_x, grad_blocks


CHAIN_CHUNK = 2 << 20  # bytes of activations per chunk of TwoProductChain


def two_product_rotate(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor | None, n_factors: int,
                       block_size: int, transpose: bool = False) -> torch.Tensor:
    """``x @ R`` (``x @ Rᵀ``) from ``ops.orthogonal.two_product_operands``: :class:`TwoProductChain` where both
    products take the oneDNN path, else ``apply_two_product`` with :func:`block_rotate` as the block product."""
    if high is not None and grouped_supported(x, low) and grouped_supported(x, high):
        return TwoProductChain.apply(x, low, high, n_factors, block_size, transpose)
    return apply_two_product(x, low, high, n_factors, block_size, transpose=transpose, product=block_rotate)


class TwoProductChain(torch.autograd.Function):
    """``x @ R`` (``x @ Rᵀ``) for a butterfly in two-product form, R = H·L, on CPU (fp32, both products' blocks
    ≥ 32 wide): the two block products (oneDNN grouped convolutions) and the permuted copies around H's go
    over the tokens in chunks of ``CHAIN_CHUNK`` bytes, so a chunk's intermediates are still in cache when
    the next step reads them. Each product's input is written once, straight into the tensor kept for its
    blocks' gradient (x itself where the first product needs no permutation): the same tensors as the
    step-by-step form keeps, none recomputed. The backward goes over the same chunks, adding up the blocks'
    gradients. Equal to ``apply_two_product`` (tested); a full-butterfly step of four 1024-wide layers on
    2048 tokens 2–10 ms faster (of ~240) on a 2-core x86 CPU, half the page faults (see docs/benchmarks.md).
    """

    @staticmethod
    def forward(ctx, x, low, high, n_factors, block_size, transpose):
        d = x.shape[-1]
        # the product acting on H's coordinates reads (t, s, l, j, h), features (s, j, l, h) permuted
        ctx.to_h, ctx.from_h = high_coordinates(d, n_factors, block_size)
        # (blocks, whether they act in H's coordinates), in the order the products apply
        stages = [(low.mT, False), (high.mT, True)] if transpose else [(high, True), (low, False)]
        flat = x.reshape(-1, d)
        tokens = flat.shape[0]
        inputs = [flat.new_empty(tokens, d) if stages[0][1] else flat, flat.new_empty(tokens, d)]
        out = flat.new_empty(tokens, d)
        weights = [blocks.mT.reshape(d, blocks.shape[-1], 1, 1) for blocks, _ in stages]
        rows = max(1, CHAIN_CHUNK // (d * x.element_size()))
        for start in range(0, tokens, rows):
            part, t = slice(start, start + rows), min(rows, tokens - start)
            a = flat[part]
            for i, (blocks, permuted) in enumerate(stages):
                if permuted:
                    a = permute_into(inputs[i][part], a, (t, *ctx.to_h), SWAP_CHUNKS)
                a = grouped_product(a, weights[i], blocks.shape[0])
                dest = inputs[1][part] if i == 0 else out[part]
                if permuted:
                    a = permute_into(dest, a, (t, *ctx.from_h), SWAP_CHUNKS)
                elif i == 1:
                    dest.copy_(a)
        ctx.save_for_backward(*inputs, *[blocks for blocks, _ in stages])
        ctx.permuted, ctx.transpose, ctx.rows, ctx.shape = [p for _, p in stages], transpose, rows, x.shape
        return out.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        *inputs, first, second = ctx.saved_tensors
        stages = list(zip([first, second], ctx.permuted))
        need_x, need_low, need_high = ctx.needs_input_grad[:3]
        need_blocks = (need_low, need_high) if ctx.transpose else (need_high, need_low)  # per stage
        d = ctx.shape[-1]
        rows = grad.reshape(-1, d).contiguous()
        tokens = rows.shape[0]
        grad_blocks = [torch.zeros_like(blocks) if need else None for (blocks, _), need in zip(stages, need_blocks)]
        grad_x = rows.new_empty(tokens, d) if need_x else None
        for start in range(0, tokens, ctx.rows):
            part, t = slice(start, start + ctx.rows), min(ctx.rows, tokens - start)
            g = rows[part]
            for i in (1, 0):
                blocks, permuted = stages[i]
                n, b = blocks.shape[0], blocks.shape[-1]
                if permuted:  # the backward of the copy out of H's coordinates
                    g = permute_copy(g, (t, *ctx.to_h), SWAP_CHUNKS).view(t, d)
                if need_blocks[i]:
                    grad_blocks[i].baddbmm_(inputs[i][part].view(t, n, b).permute(1, 2, 0),
                                            g.view(t, n, b).transpose(0, 1))
                if i == 0 and not need_x:
                    break
                g = grouped_product(g, blocks.reshape(d, b, 1, 1), n)
                if permuted and i == 1:
                    g = permute_copy(g, (t, *ctx.from_h), SWAP_CHUNKS).view(t, d)
                elif permuted:
                    permute_into(grad_x[part], g, (t, *ctx.from_h), SWAP_CHUNKS)
                elif i == 0:
                    grad_x[part] = g
        first_grad, second_grad = grad_blocks
        if ctx.transpose:  # stages were (Lᵀ, Hᵀ)
            grad_low, grad_high = (None if g is None else g.mT for g in (first_grad, second_grad))
        else:
            grad_high, grad_low = first_grad, second_grad
        return None if grad_x is None else grad_x.view(ctx.shape), grad_low, grad_high, None, None, None


if triton is not None:
    @triton.jit
    def _forward_kernel(x_ptr, r_ptr, y_ptr, tokens, width, B: tl.constexpr, BLOCK_T: tl.constexpr,
                        USE_DOT: tl.constexpr):
        tile, n = tl.program_id(0), tl.program_id(1)
        rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, B)
        inside = rows[:, None] < tokens
        offsets = rows[:, None] * width + n * B + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
        r = tl.load(r_ptr + n * B * B + cols[:, None] * B + cols[None, :])
        if USE_DOT:
            y = tl.dot(x, r, input_precision="ieee", out_dtype=tl.float32)
        else:  # blocks narrower than the tensor cores' 16
            y = tl.sum(x.to(tl.float32)[:, :, None] * r.to(tl.float32)[None, :, :], axis=1)
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _backward_kernel(x_ptr, r_ptr, dy_ptr, dx_ptr, partial_ptr, tokens, width, n_blocks, tiles,
                         B: tl.constexpr, BLOCK_T: tl.constexpr, USE_DOT: tl.constexpr):
        program, n = tl.program_id(0), tl.program_id(1)
        programs = tl.num_programs(0)
        cols = tl.arange(0, B)
        r = tl.load(r_ptr + n * B * B + cols[:, None] * B + cols[None, :])
        grad_r = tl.zeros((B, B), dtype=tl.float32)
        for tile in range(program, tiles, programs):
            rows = tile * BLOCK_T + tl.arange(0, BLOCK_T)
            inside = rows[:, None] < tokens
            offsets = rows[:, None] * width + n * B + cols[None, :]
            x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
            dy = tl.load(dy_ptr + offsets, mask=inside, other=0.0)
            if USE_DOT:
                dx = tl.dot(dy, tl.trans(r), input_precision="ieee", out_dtype=tl.float32)
                grad_r += tl.dot(tl.trans(x), dy, input_precision="ieee", out_dtype=tl.float32)
            else:
                dyf, xf, rf = dy.to(tl.float32), x.to(tl.float32), r.to(tl.float32)
                dx = tl.sum(dyf[:, None, :] * rf[None, :, :], axis=2)
                grad_r += tl.sum(xf[:, :, None] * dyf[:, None, :], axis=0)
            tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=inside)
        tl.store(partial_ptr + (program * n_blocks + n) * B * B + cols[:, None] * B + cols[None, :], grad_r)


def _launch_shape(b: int) -> tuple[int, bool]:
    """Tokens per tile, and whether to use tl.dot (tensor cores need 16-wide blocks; the interpreter
    computes either way)."""
    return (64 if b <= 32 else 32), b >= 16


@torch.library.custom_op("boftvision::block_rotate", mutates_args=())
def _block_rotate(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    tokens, width = x.shape
    b = blocks.shape[-1]
    y = torch.empty_like(x)
    block_t, use_dot = _launch_shape(b)
    grid = (triton.cdiv(tokens, block_t), width // b)
    _forward_kernel[grid](x, blocks, y, tokens, width, B=b, BLOCK_T=block_t, USE_DOT=use_dot)
    return y


@_block_rotate.register_fake
def _(x, blocks):
    return torch.empty_like(x)


@torch.library.custom_op("boftvision::block_rotate_backward", mutates_args=())
def _block_rotate_backward(x: torch.Tensor, blocks: torch.Tensor,
                           dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, width = x.shape
    n, b, _ = blocks.shape
    block_t, use_dot = _launch_shape(b)
    tiles = triton.cdiv(tokens, block_t)
    programs = min(tiles, 64)
    dx = torch.empty_like(x)
    partial = torch.empty(programs, n, b, b, device=x.device, dtype=torch.float32)
    _backward_kernel[(programs, n)](x, blocks, dy, dx, partial, tokens, width, n, tiles, B=b, BLOCK_T=block_t,
                                    USE_DOT=use_dot)
    return dx, partial.sum(0).to(blocks.dtype)


@_block_rotate_backward.register_fake
def _(x, blocks, dy):
    return torch.empty_like(x), torch.empty_like(blocks)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    x, blocks = ctx.saved_tensors
    return _block_rotate_backward(x, blocks, dy.contiguous())


_block_rotate.register_autograd(_backward, setup_context=_setup_context)
