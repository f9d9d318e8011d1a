"""Orthogonal-transform math for OFT and BOFT: pure functions on tensors, no module state.

Notation (the BOFT paper's): a layer has input width ``d``; the rotation ``R`` (d×d) is the product of
``m`` butterfly factors ``R = B_{m-1} ⋯ B_0`` with ``B_i = P_i · blockdiag(D_i) · P_iᵀ``. Each ``D_i`` holds
``N = d / b`` orthogonal blocks of size ``b``. ``P_0`` is the identity; ``P_i`` (i ≥ 1) reorders the
``b/2``-wide chunks of every segment of ``b·2^i`` features even-indexed first, then odd, exactly as
PEFT's ``block_butterfly_perm`` does, so block ``j`` of factor ``i`` joins chunks ``j`` and ``j + 2^i``.

With the output orientation (LyCORIS's) the same R, of size n, acts on a layer's n output channels
instead: ``W' = R W0``; every function here is side-agnostic except :func:`rotate_weight`.

No function here builds a dense d×d matrix: permutations are reshapes/transposes folded into one
batched block product per factor.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def skew_from_square(params: torch.Tensor) -> torch.Tensor:
    """Skew-symmetric part ``Q = (S − Sᵀ)/2`` of square blocks ``S`` (..., b, b); PEFT BOFT's convention."""
    return 0.5 * (params - params.transpose(-1, -2))


def skew_from_upper(vec: torch.Tensor, block_size: int) -> torch.Tensor:
    """Skew-symmetric blocks ``Q = U − Uᵀ`` from strict-upper-triangle entries (PEFT OFT's convention).

    vec: (N, b(b−1)/2), filled row-major like ``torch.triu_indices(b, b, 1)``. Returns (N, b, b).
    """
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=vec.device)
    upper = vec.new_zeros(vec.shape[0], block_size, block_size)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(-1, -2)


def upper_from_skew(q: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`skew_from_upper`: (N, b, b) skew blocks → (N, b(b−1)/2)."""
    b = q.shape[-1]
    rows, cols = torch.triu_indices(b, b, 1, device=q.device)
    return q[:, rows, cols]


def cayley(q: torch.Tensor) -> torch.Tensor:
    """Exact Cayley transform of skew blocks, batched, in fp32: ``R = (I − Q)(I + Q)⁻¹``.

    This is PEFT's sign convention (the transpose of the paper's ``(I + Q)(I − Q)⁻¹``); both are exactly
    orthogonal and equal the identity at ``Q = 0``. q: (..., b, b) → (..., b, b) fp32 (see :class:`Cayley`).
    """
    return Cayley.apply(q.float())


class Cayley(torch.autograd.Function):
    """``R = (I − Q)(I + Q)⁻¹ = 2A⁻¹ − I`` with ``A = I + Q`` (never singular: its symmetric part is I).

    The backward needs R alone: ``A⁻¹ = (R + I)/2``, so ``dQ = −2 A⁻ᵀ dR A⁻ᵀ = −½ (R + I)ᵀ dR (R + I)ᵀ``,
    two batched products where autograd through a solve runs a second batched LU solve (4096 8×8 blocks with
    their skew step, forward + backward: 3.9 against 5.6–5.7 ms on a 2-core x86 CPU,
    ``python benchmarks/bench_ops.py --iters 40``). Differentiable twice.
    """

    @staticmethod
    def forward(ctx, q):
        eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
        r = 2 * torch.linalg.inv(eye + q) - eye
        ctx.save_for_backward(r)
        return r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        grad = grad.contiguous()  # an expanded gradient (of a sum) would take batched matmul's slow path
        h = (r + torch.eye(r.shape[-1], device=r.device, dtype=r.dtype)).transpose(-1, -2)
        return -0.5 * (h @ grad @ h)


def inverse_cayley(r: torch.Tensor) -> torch.Tensor:
    """The skew blocks ``Q`` with ``cayley(Q) == R``: ``Q = (I + R)⁻¹(I − R)``, batched, fp32.

    Exists when no block of R has the eigenvalue −1 (``I + R`` singular); the caller checks the round
    trip. r: (..., b, b) orthogonal → (..., b, b) skew-symmetric.
    """
    r = r.float()
    eye = torch.eye(r.shape[-1], device=r.device, dtype=r.dtype)
    q = torch.linalg.solve(eye + r, eye - r)
    return 0.5 * (q - q.transpose(-1, -2))  # exactly skew (removes rounding)


def cayley_neumann(q: torch.Tensor, num_terms: int = 5) -> torch.Tensor:
    """Truncated-Neumann Cayley transform (PEFT OFT's default), batched, in fp32.

    ``R ≈ (I + Q)(I + Q + Q² + …) = I + 2Q + 2Q² + … + 2Q^{n−2} + Q^{n−1}`` for ``n = num_terms ≥ 4``
    (PEFT's loop, which we match exactly: n = 3 gives the n = 4 series).
    Note the sign: this approximates ``(I + Q)(I − Q)⁻¹``, the transpose of :func:`cayley`'s result,
    because PEFT's two OFT paths differ in this way; we follow PEFT. It is *not* exactly orthogonal: the
    error grows like ‖Q‖^n.
    """
    q = q.float()
    b = q.shape[-1]
    r = torch.eye(b, device=q.device, dtype=q.dtype).expand_as(q).clone()
    if num_terms > 1:
        r = r + 2.0 * q
    if num_terms > 2:
        power = q @ q
        r = r + 2.0 * power
        for _ in range(3, num_terms - 1):
            power = power @ q
            r = r + 2.0 * power
        r = r + power @ q  # PEFT's loop: num_terms=3 therefore also ends in Q³ (same as 4)
    return r


def orthogonality_error(r: torch.Tensor) -> torch.Tensor:
    """max ‖RᵀR − I‖_F over a batch of square matrices (..., b, b)."""
    eye = torch.eye(r.shape[-1], device=r.device, dtype=r.dtype)
    return torch.linalg.matrix_norm(r.transpose(-1, -2) @ r - eye).max()


def butterfly_perm(width: int, block_size: int, factor: int) -> torch.Tensor:
    """Index form of ``P_i`` (PEFT's ``block_butterfly_perm``): ``x @ P_iᵀ == x[..., perm]``.

    Only used to check the reshape form and to build reference matrices in tests.
    """
    if factor == 0:
        return torch.arange(width)
    half = block_size // 2
    group = 2 ** factor
    chunks = torch.arange(width).view(width // (2 * half * group), 2 * group, half)
    order = torch.cat([torch.arange(0, 2 * group, 2), torch.arange(1, 2 * group, 2)])
    return chunks[:, order].reshape(width)


def apply_factor(x: torch.Tensor, blocks: torch.Tensor, factor: int) -> torch.Tensor:
    """``x @ B_i`` for ``B_i = P_i · blockdiag(blocks) · P_iᵀ``, with ``P_i`` as reshapes.

    x: (..., d); blocks: (N, b, b) with N·b = d. Factor 0 is plain block-diagonal. For factor i ≥ 1
    the features of each segment of b·2^i are viewed as (2, 2^i, b/2): block j mixes chunk (0, j) with
    chunk (1, j), i.e. chunks j and j + 2^i, which is what the permutation sandwich does.
    """
    n, b, _ = blocks.shape
    lead = x.shape[:-1]  # explicit sizes below (no -1): an empty batch reshapes too
    rows = math.prod(lead)
    if factor == 0 and b >= 16:  # the einsum's own copies are as fast here (2048 × 1024 fp32, a 2-core x86 CPU)
        y = torch.einsum("...nk,nkc->...nc", x.reshape(*lead, n, b), blocks)
        return y.reshape(*lead, n * b)
    if factor == 0:  # (rows, n, b) → (n, rows, b), one batched product, and back (the copies as below):
        # 8-wide blocks, forward + backward on 2048 × 1024 fp32 tokens: 7.5–11.7 ms against the einsum's
        # 12.1–14.7 (a 2-core x86 CPU, benchmarks/bench_ops.py --iters 40)
        y = torch.bmm(PermuteCopy.apply(x, (rows, n, b), (1, 0, 2)), blocks)
        return PermuteCopy.apply(y, (n, rows, b), (1, 0, 2)).reshape(*lead, n * b)
    group, half = 2 ** factor, b // 2
    segments = n // group
    # (rows, s, e, j, t) → (s, j, rows, e, t): one batched product over the N blocks, and back; the copies
    # move whole b/2-chunks (see permute_copy), faster than the einsum's element copies
    xv = PermuteCopy.apply(x, (rows, segments, 2, group, half), (1, 3, 0, 2, 4)).reshape(n, rows, b)
    y = PermuteCopy.apply(torch.bmm(xv, blocks), (segments, group, rows, 2, half), (2, 0, 3, 1, 4))
    return y.reshape(*lead, n * b)


def butterfly_apply(
    x: torch.Tensor, blocks: torch.Tensor, transpose: bool = False, inverse: bool = False
) -> torch.Tensor:
    """Multiply the rows of ``x`` by the butterfly rotation: ``x @ R`` (or ``Rᵀ``, ``R⁻¹``, ``R⁻ᵀ``).

    x: (..., d). blocks: (m, N, b, b), factor ``i`` = ``blocks[i]``, ``R = B_{m−1} ⋯ B_0``.
    - ``x @ R`` applies B_{m−1} first (activation side: ``y = (x R) W0ᵀ``).
    - ``x @ Rᵀ`` applies B_0ᵀ first (weight side: rows of W0 become ``W0 Rᵀ``).
    Inverses use batched block inverses (exact for Neumann blocks too). Cost O(m·b·d) per row.
    """
    if inverse:
        wide = blocks.float() if blocks.dtype in (torch.float16, torch.bfloat16) else blocks
        blocks = torch.linalg.inv(wide).to(blocks.dtype)
    if transpose:
        blocks = blocks.transpose(-1, -2)
    order = range(blocks.shape[0])
    if transpose == inverse:
        order = reversed(order)
    for i in order:
        x = apply_factor(x, blocks[i], i)
    return x


def butterfly_span(block_size: int, n_factors: int) -> int:
    """Width of the independent diagonal blocks of R: factor i mixes within segments of b·2^i, so
    ``R = B_{m−1} ⋯ B_0`` is block-diagonal with blocks of size b·2^(m−1)."""
    return block_size * 2 ** (n_factors - 1)


def collapse_butterfly(blocks: torch.Tensor) -> torch.Tensor:
    """The diagonal blocks of R, (d/B, B, B) with B = :func:`butterfly_span`: ``x @ R`` then equals one
    block product ``apply_factor(x, collapsed, 0)`` — one pass over x instead of m passes and 2(m−1)
    reshapes.

    Built factor by factor on the blocks alone (O(d·b·B) work, no d-wide tensor). ``C = B_{j−1}⋯B_0`` is
    block-diagonal in W-wide blocks and ``B_j C`` in 2W-wide ones. Index a 2W-wide segment's coordinates
    (e, c, t): half e, b/2-chunk c of that half, element t. B_j's block c couples chunk c of both halves
    and C's block e' covers half e', so row (e, c, t) of ``B_j C`` is row (e, t) of B_j's block c times
    rows (c, ·) of C's two blocks, one per column half e' — one batched product (an einsum) per factor.
    """
    m, n, b, _ = blocks.shape
    half = b // 2
    factors = blocks.unbind(0)
    c = factors[0]
    for j in range(1, m):
        width, chunks = b * 2 ** (j - 1), 2 ** j
        pairs = n * b // (2 * width)
        factor = factors[j].reshape(pairs, chunks, 2, half, 2, half)  # (segment, c, e, t, e', t'')
        c = torch.einsum("scetfu,sfcuw->sectfw", factor, c.reshape(pairs, 2, chunks, half, width))
        c = c.reshape(pairs, 2 * width, 2 * width)
    return c


def rotate_weight(weight: torch.Tensor, blocks: torch.Tensor, inverse: bool = False,
                  output_side: bool = False) -> torch.Tensor:
    """Rotate a (n, d, ...) weight, flattened to (n, d'), on one side.

    Input side (default): ``W0 Rᵀ`` (or ``W R⁻ᵀ``), so ``F.linear(x, W0 Rᵀ) == F.linear(x @ R, W0)``;
    Conv2d weights are flattened over (in_channels, kh, kw), PyTorch's layout. Output side: ``R W0``
    (or ``R⁻¹ W``), R of size n, acting on the output channels (LyCORIS's side): B_0 reaches W0 first.
    """
    flat = weight.reshape(weight.shape[0], -1)
    if output_side:
        return butterfly_apply(flat.T, blocks, transpose=True, inverse=inverse).T.reshape(weight.shape)
    return butterfly_apply(flat, blocks, transpose=True, inverse=inverse).reshape(weight.shape)


def dense_rotation(blocks: torch.Tensor) -> torch.Tensor:
    """The d×d matrix R (for tests, merging checks and analysis only; never in a training step)."""
    m, n, b, _ = blocks.shape
    eye = torch.eye(n * b, device=blocks.device, dtype=blocks.dtype)
    return butterfly_apply(eye, blocks)


def check_butterfly_shape(width: int, block_size: int, n_factors: int) -> str | None:
    """Why (width, block_size, m) cannot form a butterfly, or None when it can.

    Needs b | d, and for m > 1: b even and b·2^(m−1) | d (each factor doubles the span a block reaches).
    """
    if block_size < 1 or width % block_size:
        return f"block size {block_size} does not divide width {width}"
    if n_factors > 1:
        if block_size % 2:
            return f"block size {block_size} must be even for n_butterfly_factor > 1"
        span = block_size * 2 ** (n_factors - 1)
        if width % span:
            return (
                f"n_butterfly_factor={n_factors} with block size {block_size} needs width divisible by "
                f"{block_size}·2^{n_factors - 1} = {span}, but width is {width}"
            )
    return None


def max_butterfly_factors(width: int, block_size: int) -> int:
    """Largest m for which (width, block_size, m) is valid; log2(d/b)+1 for a power-of-two ratio."""
    if width % block_size:
        return 0
    if block_size % 2:
        return 1
    m = 1
    while width % (block_size * 2 ** m) == 0:
        m += 1
    return m


def multiplicative_dropout_mask(n_factors: int, n_blocks: int, p: float) -> torch.Tensor | None:
    """BOFT's multiplicative dropout, as a CPU mask (m, N, 1, 1): in one randomly chosen factor,
    ⌊p·N⌋ random blocks are marked (1) to be replaced by the identity. None when nothing drops."""
    n_drop = int(p * n_blocks)
    if n_drop == 0:
        return None
    factor = int(torch.randint(0, n_factors, (1,)))
    mask = torch.zeros(n_factors, n_blocks, 1, 1)
    mask[factor, torch.randperm(n_blocks)[:n_drop]] = 1.0
    return mask


def apply_dropout_mask(blocks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Replace the blocks marked in ``mask`` by I; gradients flow to the kept blocks."""
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    mask = mask.to(blocks.device, blocks.dtype)
    return blocks * (1 - mask) + eye * mask


def multiplicative_dropout(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """BOFT's multiplicative dropout: in one randomly chosen factor, replace ⌊p·N⌋ random blocks by I.

    blocks: (m, N, b, b) orthogonal blocks. Returns a new tensor; gradients flow to the kept blocks.
    """
    mask = multiplicative_dropout_mask(blocks.shape[0], blocks.shape[1], p)
    return blocks if mask is None else apply_dropout_mask(blocks, mask)


# --- two-product form ---------------------------------------------------------------------------------
# Factor i of a butterfly mixes the b/2-wide chunks whose index differs in bit i. So the first k+1 factors
# multiply to L = B_k ⋯ B_0, block-diagonal with contiguous b·2^k-wide blocks, and the others to
# H = B_{m−1} ⋯ B_{k+1}, block-diagonal after one fixed permutation (chunk bits 0…k moved above the rest):
# R = H·L applies as two batched block products and two permuted copies for any m (a Monarch-style form).

def two_product_split(n_factors: int) -> int:
    """k: the low product takes factors 0…k, the high one k+1…m−1 — both blocks near √(b·span)."""
    return (n_factors - 1) // 2


def two_product_operands(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(low, high)`` with ``x @ R == apply_two_product(x, low, high, m, b)`` for ``R = B_{m−1}⋯B_0``.

    blocks: (m, N, b, b). low: (d/Bₗ, Bₗ, Bₗ), Bₗ = b·2^k (R's first k+1 factors, collapsed); high:
    (groups, Bₕ, Bₕ), Bₕ = b·2^(m−k−2), in the permuted coordinates (None when m = 1). Both are
    :func:`collapse_butterfly` results: in the permuted coordinates each group of H (span segment s, low
    chunk bits l) is itself a butterfly of m−k−1 factors, factor k+1+i's block (s, segment, j) there being
    its block (s, segment, j·2^(k+1) + l) here — a reordering of the blocks.
    """
    m, n, b, _ = blocks.shape
    k = two_product_split(m)
    if m == k + 1:
        return collapse_butterfly(blocks), None
    low, high = blocks.split([k + 1, m - k - 1])
    spans, c_low = n * b // butterfly_span(b, m), 2 ** (k + 1)
    groups = [f.reshape(spans, 2 ** (m - 2 - k - i), 2 ** i, c_low, b, b).permute(0, 3, 1, 2, 4, 5).reshape(n, b, b)
              for i, f in enumerate(high.unbind(0))]  # factor k+1+i: (s, segment, j, l) → (s, l, segment, j)
    return collapse_butterfly(low), collapse_butterfly(torch.stack(groups))


SCALE_CHUNK = 1 << 18  # elements per chunk of scale_grads (1 MiB of fp32)


def scale_grads(grad: torch.Tensor, y: torch.Tensor | None, s: torch.Tensor, need_y: bool, need_s: bool,
                need_bias: bool) -> tuple[torch.Tensor | None, ...]:
    """Gradients of ``y ⊙ s + bias`` (y (..., n); s, bias (n,)) for the output gradient ``grad``: y's (``grad ⊙ s``),
    s's (``Σ grad ⊙ y`` over the rows) and the bias's (``Σ grad``), the sums at least in fp32. On CPU the rows go in
    cache-sized chunks, so ``grad`` is read from memory once for all three (autograd's addcmul reads it, and y,
    once per gradient and writes y·grad in full). On GPUs and in compiled graphs it is one chunk: a kernel launch
    per chunk would cost more there."""
    n, wide = s.shape[-1], torch.promote_types(s.dtype, torch.float32)
    rows = grad.reshape(-1, n)
    flat_y = y.reshape(-1, n) if need_s else None
    grad_y = torch.empty(rows.shape, dtype=grad.dtype, device=grad.device) if need_y else None
    grad_s = torch.zeros(n, dtype=wide, device=grad.device) if need_s else None
    grad_bias = torch.zeros(n, dtype=wide, device=grad.device) if need_bias else None
    chunked = grad.device.type == "cpu" and not torch.compiler.is_compiling()
    step = max(1, SCALE_CHUNK // n) if chunked else max(1, rows.shape[0])
    for start in range(0, rows.shape[0], step):
        g = rows[start:start + step]
        if need_y:
            torch.mul(g, s, out=grad_y[start:start + step])
        if need_s:
            grad_s += (g * flat_y[start:start + step]).sum(0, dtype=wide)
        if need_bias:
            grad_bias += g.sum(0, dtype=wide)
    return (None if grad_y is None else grad_y.view(grad.shape), None if grad_s is None else grad_s.to(s.dtype),
            None if grad_bias is None else grad_bias.to(s.dtype))


class ScaleShift(torch.autograd.Function):
    """``y ⊙ s + bias`` (bias may be None) for y (..., n), s and bias (n,): one pass forward, the backward by
    :func:`scale_grads`."""

    @staticmethod
    def forward(ctx, y, s, bias):
        ctx.save_for_backward(y if ctx.needs_input_grad[1] else None, s)
        ctx.has_bias = bias is not None
        return y * s if bias is None else torch.addcmul(bias, y, s)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        y, s = ctx.saved_tensors
        need_y, need_s, need_bias = ctx.needs_input_grad
        return scale_grads(grad, y, s, need_y, need_s, need_bias and ctx.has_bias)


def scale_shift(y: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``y ⊙ s + bias`` over the last axis (see :class:`ScaleShift`)."""
    return ScaleShift.apply(y, s, bias)


class ScaledLinear(torch.autograd.Function):
    """``(x Wᵀ) ⊙ s + bias`` for a frozen weight W (n, d): x (..., d), s and bias (n,).

    What :class:`ScaleShift` after ``F.linear`` computes, with the scale folded into the input gradient's
    product, ``dx = g (s ⊙ W)`` (a pass over the n×d weight), where the two write ``g ⊙ s`` (tokens×n) first
    and multiply that. The product y is kept for s's gradient, as there. The same cost warm in cache; in a step,
    one fresh activation-sized tensor fewer per layer: a full-butterfly step of four 1024-wide layers on 2048
    tokens 6–13 ms faster on a 2-core x86 CPU with glibc's default settings, half the page faults (see
    docs/benchmarks.md).
    """

    @staticmethod
    def forward(ctx, x, weight, s, bias):
        y = x.reshape(-1, x.shape[-1]) @ weight.T
        ctx.save_for_backward(weight, s, y if ctx.needs_input_grad[2] else None)
        ctx.has_bias, ctx.x_shape = bias is not None, x.shape
        out = y * s if bias is None else torch.addcmul(bias, y, s)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        weight, s, y = ctx.saved_tensors
        need_x, _, need_s, need_bias = ctx.needs_input_grad
        _, grad_s, grad_bias = scale_grads(grad, y, s, False, need_s, need_bias and ctx.has_bias)
        grad_x = (grad.reshape(-1, s.shape[-1]) @ (weight * s[:, None])).view(ctx.x_shape) if need_x else None
        return grad_x, None, grad_s, grad_bias


def scaled_linear(x: torch.Tensor, weight: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight) ⊙ s + bias`` (see :class:`ScaledLinear`); the plain form when the weight trains."""
    if weight.requires_grad:
        return scale_shift(F.linear(x, weight), s, bias)
    return ScaledLinear.apply(x, weight, s, bias)


WIDE_DTYPES = {16: torch.complex128, 8: torch.float64, 4: torch.float32, 2: torch.float16}


def wide_dtype(v: torch.Tensor) -> torch.dtype | None:
    """The widest dtype (up to 16 bytes) whose elements tile v's last axis, when v's layout lets it be viewed
    so (contiguous, aligned); None otherwise, and inside a compiled graph (no complex dtypes there)."""
    nbytes = v.shape[-1] * v.element_size()
    wide = next((WIDE_DTYPES[w] for w in WIDE_DTYPES if nbytes % w == 0), None)
    if (wide is None or torch.compiler.is_compiling() or not v.is_contiguous()
            or v.storage_offset() * v.element_size() % wide.itemsize):
        return None
    return wide


def permute_copy(x: torch.Tensor, sizes: tuple[int, ...], dims: tuple[int, ...]) -> torch.Tensor:
    """``x.reshape(sizes).permute(dims).contiguous()`` for ``dims`` that keep the last axis last.

    The last axis moves as one wider element (up to 16 bytes, reinterpreted, so the copy is bitwise):
    PyTorch's CPU copy moves runs of 4 floats as complex128 elements several times faster than as floats
    (2048 × 1024 fp32 in 4-float chunks: 0.3–0.5 ms against 1.2–2.4 ms on a 2-core x86 CPU,
    ``benchmarks/bench_ops.py``).
    A compiled graph gets the plain permute (its own generated copy).
    """
    v = x.reshape(sizes)
    wide = wide_dtype(v)
    if wide is None:
        return v.permute(dims).contiguous()
    return v.view(wide).permute(dims).contiguous().view(x.dtype)


def permute_into(out: torch.Tensor, x: torch.Tensor, sizes: tuple[int, ...], dims: tuple[int, ...]) -> torch.Tensor:
    """:func:`permute_copy` written into ``out`` (contiguous, x's size; returned), e.g. a slice of a larger tensor."""
    v, target = x.reshape(sizes), out.view([sizes[i] for i in dims])
    wide = wide_dtype(v)
    if wide is not None and wide_dtype(target) == wide:
        target.view(wide).copy_(v.view(wide).permute(dims))
    else:
        target.copy_(v.permute(dims))
    return out


class PermuteCopy(torch.autograd.Function):
    """:func:`permute_copy` with its inverse as the backward."""

    @staticmethod
    def forward(ctx, x, sizes, dims):
        ctx.shape = x.shape
        ctx.inverse = [sizes[i] for i in dims], tuple(sorted(range(len(dims)), key=dims.__getitem__))
        return permute_copy(x, sizes, dims)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        sizes, dims = ctx.inverse
        return permute_copy(grad, sizes, dims).reshape(ctx.shape), None, None


def block_product(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ blockdiag(blocks)``: x (..., N·b), blocks (N, b, b) — the einsum reference."""
    return apply_factor(x, blocks, 0)


SWAP_CHUNKS = (0, 1, 3, 2, 4)  # (T, s, j, l, h) ↔ (T, s, l, j, h): see high_coordinates


def high_coordinates(width: int, n_factors: int, block_size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A row's features as (segments, j, l, h) — span segment, high chunk bits, low chunk bits, element of a
    b/2-chunk — and as H's coordinates order them, (segments, l, j, h): ``permute_copy(x, (T, *to_h),
    SWAP_CHUNKS)`` moves T rows into H's coordinates, the same with ``from_h`` back."""
    k, half = two_product_split(n_factors), block_size // 2
    c_high, c_low = 2 ** (n_factors - k - 1), 2 ** (k + 1)
    segments = width // (c_high * c_low * half)
    return (segments, c_high, c_low, half), (segments, c_low, c_high, half)


def apply_two_product(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor | None, n_factors: int,
                      block_size: int, transpose: bool = False, product=block_product) -> torch.Tensor:
    """``x @ R`` (``x @ Rᵀ``) from :func:`two_product_operands`: x: (..., d). ``product(v, blocks)``
    multiplies by a block-diagonal matrix (the fused kernel, ``ops.block_kernel.block_rotate``, on GPU)."""
    if high is None:
        return product(x, low.transpose(-1, -2) if transpose else low)
    lead, d = x.shape[:-1], x.shape[-1]
    to_h, from_h = high_coordinates(d, n_factors, block_size)
    segments, c_high, c_low, half = to_h

    def high_product(v, blocks):  # (segments·c_low) blocks of c_high·half, on the coordinates (s, j, l, h)
        tokens = v.numel() // d
        if product is block_product:  # one batched product between two copies that move whole h-chunks
            v = PermuteCopy.apply(v, (tokens, segments, c_high, c_low, half), (1, 3, 0, 2, 4))  # (s, l, T, j, h)
            v = torch.bmm(v.reshape(segments * c_low, tokens, c_high * half), blocks)
            return PermuteCopy.apply(v, (segments, c_low, tokens, c_high, half), (2, 0, 3, 1, 4)).reshape(*lead, d)
        # the fused kernel takes blocks contiguous along the features: (T, s, l, j, h)
        v = PermuteCopy.apply(v, (tokens, *to_h), SWAP_CHUNKS).reshape(tokens, d)
        v = product(v, blocks)
        return PermuteCopy.apply(v, (tokens, *from_h), SWAP_CHUNKS).reshape(*lead, d)

    if transpose:  # x Rᵀ = x Lᵀ Hᵀ
        return high_product(product(x, low.transpose(-1, -2)), high.transpose(-1, -2))
    return product(high_product(x, high), low)
