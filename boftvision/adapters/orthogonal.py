"""What OFT and BOFT share: orthogonal blocks from the trainable tensor → multiplicative dropout and
interpolation → the rotation applied on the cheaper side (activations or the rows of W0), and the
batched per-step computation of many layers' rotations (:func:`share_rotations`).

The rotation is never built as a d×d matrix. Its fp32 operand (R's collapsed diagonal blocks, the
blocks of its two-product form R = H·L for deeper butterflies, or the m factors) always comes from
:class:`RotationOperands`, alone or batched over layers: a function that keeps the small batched
computation's graph for its backward, so any number of backward passes — reentrant gradient
checkpointing's included — may go through it, and that refuses a parameter changed in between.
"""
from __future__ import annotations

import weakref
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..config import BOFTConfig, OFTConfig
from ..ops.block_kernel import block_rotate, two_product_rotate
from ..ops.orthogonal import (
    apply_dropout_mask,
    butterfly_apply,
    butterfly_span,
    check_butterfly_shape,
    collapse_butterfly,
    max_butterfly_factors,
    multiplicative_dropout_mask,
    rotate_weight,
    scale_shift,
    scaled_linear,
    two_product_operands,
    two_product_split,
)
from .base import Adapter, LayerShape, compute_dtype


def rotated_width(shape: LayerShape, config: BOFTConfig | OFTConfig) -> int:
    """The width R rotates: the layer's input width d, or its output width n (``orientation="output"``)."""
    return shape.n if config.orientation == "output" else shape.d


def block_size_for_layer(shape: LayerShape, config: BOFTConfig | OFTConfig, n_factors: int) -> int:
    """Resolve b for this layer and check (width, b, m); the error names the layer and values that work."""
    d = rotated_width(shape, config)
    if config.block_num:
        if d % config.block_num:
            good = [k for k in range(1, d + 1) if d % k == 0 and check_butterfly_shape(d, d // k, n_factors) is None]
            near = min(good, key=lambda k: abs(k - config.block_num))
            raise ValueError(f"{shape.describe()}: block_num {config.block_num} does not divide width {d}; "
                             f"use a block_num dividing it (e.g. {near})")
        b = d // config.block_num
    else:
        b = config.block_size
    problem = check_butterfly_shape(d, b, n_factors)
    if problem:
        good = [k for k in range(1, d + 1) if check_butterfly_shape(d, k, n_factors) is None]
        hint = f"block_size={min(good, key=lambda k: abs(k - b))}" if good else "n_butterfly_factor=1"
        if b <= d and d % b == 0 and n_factors > max_butterfly_factors(d, b):
            hint += f" or n_butterfly_factor ≤ {max_butterfly_factors(d, b)}"
        side = " (orientation='output' rotates the output width)" if config.orientation == "output" else ""
        raise ValueError(f"{shape.describe()}: {problem}{side}; try {hint}")
    return b


# adapter → (rotation operand, state key), filled by share_rotations when an adapted model's forward
# starts and emptied when it ends (forget_rotations): a layer called outside that forward computes its
# own. Weak keys: copies of a model and dropped adapters never see or keep another's tensors
SHARED_ROTATIONS: "weakref.WeakKeyDictionary[OrthogonalAdapter, tuple]" = weakref.WeakKeyDictionary()

# MAC-equivalents per element of one memory-bound pass over activations, per device type (see
# choose_side). CPU: `python benchmarks/bench_ops.py` on a 2-core x86 CPU (1024-wide layer, 2048 fp32
# tokens, three runs): one GEMM of the layer 24–25 ms (2.1 G MACs), a collapsed block product's forward
# + backward (3 passes) 6.3–7.8 ms, the two block products' as the layers run them 14–18 ms: ~100 MACs per
# element and pass, two products ≈ 2 passes (two later runs, `--iters 40`, with the products chained over
# token chunks: 20.3–20.5, 4.5 and 11.0–11.3 ms — ~75 per pass, two products ≈ 2.5 passes; kept, the
# choice for these shapes is the same either way). H100: measured with benchmarks/bench_models.py, where the
# weight side won on DINOv2-L and SD's UNet (an activation pass there is a handful of permute/copy
# kernels, a GEMM runs near 800 TFLOP/s)
PASS_COST = {"cpu": 100, "cuda": 4000}
TWO_PRODUCT_PASSES = 2  # two block products and their permuted copies, in units of one collapsed pass
COLLAPSE_SPAN = 64  # collapse the m factors into R's diagonal blocks when they are at most this wide


class OrthogonalAdapter(Adapter):
    """What OFT and BOFT share: blocks → (dropout, interpolation) → rotation on the cheaper side.

    One code path for both orientations: the input side computes ``s ⊙ ((x R) W0ᵀ)`` (= ``W0 Rᵀ``), the
    output side ``s ⊙ ((x W0ᵀ) Rᵀ)`` (= ``R W0``); either on the activations or on W0, whichever is
    cheaper for the call (``choose_side``; "weight" means on W0, on whichever side of it R acts).
    """

    rotation_side = "auto"  # "auto" | "input" | "weight" (tests and benchmarks pin a side)
    raw_axis = 1  # the block axis of the raw parameter (BOFT: (m, N, b, b); OFT: (N, b(b−1)/2) → 0)

    def __init__(self, shape: LayerShape, config, n_factors: int, block_size: int):
        super().__init__(shape, config)
        self.n_factors, self.block_size = n_factors, block_size
        self.output_side = config.orientation == "output"
        self.width = rotated_width(shape, config)
        self.block_num = self.width // block_size
        self.identity_factors = 0  # butterfly interpolation: leftmost components set to I
        self.reset_scale = False
        self.collapse = n_factors > 1 and butterfly_span(block_size, n_factors) <= COLLAPSE_SPAN
        # deeper butterflies: R = H·L, two block products whatever m (see ops.two_product_operands)
        self.two_product = not self.collapse and n_factors >= 3

    # --- method-specific parametrisation -------------------------------------------------
    def raw(self) -> torch.Tensor:  # pragma: no cover
        """The trainable tensor the blocks are computed from."""
        raise NotImplementedError

    def raw_shape(self) -> tuple[int, ...]:  # pragma: no cover
        """The shape of :meth:`raw` (whole, unsharded)."""
        raise NotImplementedError

    def blocks_from_raw(self, raw: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """(m, N, b, b) fp32 orthogonal blocks; works on raw tensors of several layers concatenated
        along ``raw_axis``."""
        raise NotImplementedError

    def output_scale(self) -> torch.Tensor | None:
        return None

    # --- shared -------------------------------------------------------------------------
    def set_interpolation(self, n_identity: int, reset_scale: bool = False) -> None:
        """Butterfly interpolation: the leftmost ``n_identity`` components of R act as I (all of them
        when n_identity ≥ m); ``reset_scale`` also sets the output scale to 1. Changes what the forward
        uses, never the parameters; ``set_interpolation(0)`` restores the adapter."""
        self.identity_factors = n_identity
        self.reset_scale = reset_scale

    def orthogonal_blocks(self) -> torch.Tensor:
        return self.blocks_from_raw(self.raw())

    def finish_blocks(self, blocks: torch.Tensor, dropout_mask: torch.Tensor | None) -> torch.Tensor:
        """Apply multiplicative dropout (training) and the interpolation's identity factors."""
        if dropout_mask is not None:
            blocks = apply_dropout_mask(blocks, dropout_mask.to(blocks.device))
        if self.identity_factors:
            keep = self.n_factors - min(self.identity_factors, self.n_factors)
            eye = torch.eye(self.block_size, device=blocks.device, dtype=blocks.dtype)
            blocks = torch.cat([blocks[:keep], eye.expand_as(blocks[keep:])])
        return blocks

    def dropout_mask(self) -> torch.Tensor | None:
        if not (self.training and self.config.dropout > 0):
            return None
        return multiplicative_dropout_mask(self.n_factors, self.block_num, self.config.dropout)

    def rotation_blocks(self, dropout: bool = True) -> torch.Tensor:
        """(m, N, b, b) fp32 blocks as the forward uses them; ``dropout=False`` for merging."""
        return self.finish_blocks(self.orthogonal_blocks(), self.dropout_mask() if dropout else None)

    def operand(self, blocks: torch.Tensor) -> torch.Tensor:
        """What :meth:`rotate` multiplies by: R's collapsed diagonal blocks, the two products' blocks
        (flattened into one tensor), or the m factors."""
        if self.two_product:
            low, high = two_product_operands(blocks)
            return torch.cat([low.reshape(-1), high.reshape(-1)])
        return collapse_butterfly(blocks) if self.collapse else blocks

    def product_widths(self) -> tuple[int, int]:
        """The widths of the two products' blocks (``two_product``): b·2^k for L, b·2^(m−k−2) for H."""
        k = two_product_split(self.n_factors)
        return self.block_size * 2 ** k, self.block_size * 2 ** (self.n_factors - k - 2)

    def state_key(self) -> tuple:
        """Everything a computed rotation depends on besides the module's identity: the parameter object
        (``load_state_dict(assign=True)`` replaces it), its in-place version, grad and train mode,
        the interpolation."""
        raw = self.raw()
        return (id(raw), raw._version, torch.is_grad_enabled(), self.training, self.identity_factors)

    def batch_key(self) -> tuple:
        """Adapters with equal keys get their rotations from one batched computation."""
        return (type(self), id(self.config), self.output_side, self.block_size, self.n_factors, self.collapse,
                self.training, self.identity_factors, self.raw().dtype, self.raw().device)

    def rotation_operand(self) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a compiled graph fuses the per-layer kernels itself
            return self.operand(self.rotation_blocks())
        shared = SHARED_ROTATIONS.get(self)
        if shared is not None and shared[1] == self.state_key():
            return shared[0]
        return rotation_operands([self])[0]

    def scale(self) -> torch.Tensor | None:
        return None if self.reset_scale else self.output_scale()

    def choose_side(self, x: torch.Tensor) -> str:
        """Cheaper side for this call, in multiply-add equivalents.

        A pass of a factor over a (rows × d) tensor is memory-bound: ~PASS_COST MACs per element
        (measured per device type); factors after the first need two extra reshape passes unless the
        butterfly is collapsed. The weight side rotates n rows instead of the tokens, but in training it
        adds a tokens×n×d matmul for the rotated weight's gradient.
        """
        if self.shape.is_conv:
            return "weight"
        if self.rotation_side != "auto":
            return self.rotation_side
        tokens, (n, d) = x.numel() // self.shape.d, (self.shape.n, self.shape.d)
        width = self.width  # what an activation pass touches per token: the rotated side
        cost = PASS_COST.get(x.device.type, PASS_COST["cpu"])
        factors = 1 if self.collapse else TWO_PRODUCT_PASSES if self.two_product else 1 + 3 * (self.n_factors - 1)
        passes = cost * factors
        training = torch.is_grad_enabled() and self.raw().requires_grad
        sweeps = 3 if training else 1  # forward + two backward products
        input_cost = tokens * width * passes * sweeps
        weight_cost = n * d * passes * sweeps + (2 * tokens * n * d if training else 0)
        return "input" if input_cost < weight_cost else "weight"

    def rotate(self, x: torch.Tensor, operand: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``x @ R`` (``x @ Rᵀ``) with the fp32 operand cast to x's dtype: one block product over R's
        collapsed diagonal blocks when they are narrow (see ``COLLAPSE_SPAN``), two block products for
        deeper butterflies, else (m = 2, wide blocks) factor by factor."""
        if self.two_product:
            low_width, high_width = self.product_widths()
            n_low = self.width * low_width
            low = operand[:n_low].reshape(-1, low_width, low_width).to(x.dtype)
            high = operand[n_low:].reshape(-1, high_width, high_width).to(x.dtype)
            return two_product_rotate(x, low, high, self.n_factors, self.block_size, transpose=transpose)
        if self.collapse or self.n_factors == 1:  # one block-diagonal matrix: the fused kernel on GPU
            blocks = operand if self.collapse else operand[0]
            return block_rotate(x, (blocks.transpose(-1, -2) if transpose else blocks).to(x.dtype))
        return butterfly_apply(x, operand.to(x.dtype), transpose=transpose)

    def rotated_weight(self, base: nn.Module, operand: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``s ⊙ W0 Rᵀ`` (input side) or ``s ⊙ R W0`` (output side), W0 flattened to (n, d)."""
        weight = self.shape.weight(base).to(dtype)
        flat = weight.reshape(weight.shape[0], -1)
        flat = self.rotate(flat.T, operand, transpose=True).T if self.output_side else \
            self.rotate(flat, operand, transpose=True)
        weight = flat.reshape(weight.shape)
        s = self.scale()
        if s is not None:
            weight = weight * s.reshape(-1, *[1] * (weight.dim() - 1)).to(dtype)
        return weight

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        quantized = not base.weight.is_floating_point()  # e.g. bitsandbytes 4-bit: only the input side works
        dtype = compute_dtype(x, base.weight)
        operand = self.rotation_operand()
        x = x if quantized else x.to(dtype)
        if not quantized and self.choose_side(x) == "weight":
            bias = None if base.bias is None else base.bias.to(dtype)
            weight = self.rotated_weight(base, operand, dtype)
            if self.shape.is_conv:
                return base._conv_forward(x, weight, bias)
            return F.linear(x, weight, bias)
        if self.output_side:
            return self.rotate_outputs(base, x, operand, quantized)
        x = self.rotate(x, operand)  # PEFT's order: rotate, base layer, scale without the bias
        if self.scale() is None:
            return base(x)
        if quantized:
            y = base(x)
            return self.scale_and_shift(y if base.bias is None else y - base.bias.to(y.dtype), base)
        # the product and the scaling in one function: the bias added in the scaling pass, the scale folded
        # into the input gradient's product
        bias = None if base.bias is None else base.bias.to(dtype)
        return scaled_linear(x, self.shape.weight(base).to(dtype), self.scale().reshape(-1).to(dtype), bias)

    def scale_and_shift(self, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """``s ⊙ y + bias`` over y's last axis for the layer's product y taken without its bias: one pass."""
        s, bias = self.scale(), None if base.bias is None else base.bias.to(y.dtype)
        if s is None:
            return y if bias is None else y + bias
        return scale_shift(y, s.reshape(-1).to(y.dtype), bias)

    def rotate_outputs(self, base: nn.Module, x: torch.Tensor, operand: torch.Tensor,
                       quantized: bool = False) -> torch.Tensor:
        """Output side on the activations: ``s ⊙ ((x W0ᵀ) Rᵀ) + bias`` (channels last for the rotation).
        A float linear layer's product is taken without its bias, which the scaling pass adds."""
        if not (quantized or self.shape.is_conv):
            return self.scale_and_shift(self.rotate(F.linear(x, self.shape.weight(base).to(x.dtype)), operand,
                                                    transpose=True), base)
        y = base(x)
        conv = y.dim() > 2 and self.shape.is_conv
        if conv:
            y = y.movedim(1, -1)
        z = self.rotate(y if base.bias is None else y - base.bias.to(y.dtype), operand, transpose=True)
        z = self.scale_and_shift(z, base)
        return z.movedim(-1, 1) if conv else z

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        """W0 → s ⊙ W0 Rᵀ (or s ⊙ R W0), never with dropout (whatever the mode)."""
        operand = self.operand(self.rotation_blocks(dropout=False))
        self.shape.write_weight(base, self.rotated_weight(base, operand, torch.float32))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        """The inverse of :meth:`merge` (R⁻ᵀ or R⁻¹ by block inverses, the scale divided out), in fp32."""
        weight = self.shape.weight(base).float()
        s = self.scale()
        if s is not None:
            weight = weight / s.reshape(-1, *[1] * (weight.dim() - 1)).float()
        self.shape.write_weight(base, rotate_weight(weight, self.rotation_blocks(dropout=False), inverse=True,
                                                       output_side=self.output_side))

    def stored_parameters(self) -> int:
        """Effective count: b(b−1)/2 free entries per skew block, plus the output scale if any."""
        b = self.block_size
        s = self.output_scale()
        return self.n_factors * self.block_num * b * (b - 1) // 2 + (0 if s is None else s.numel())


def keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class RotationOperands(torch.autograd.Function):
    """``compute(*raws)`` → one fp32 tensor, differentiable in ``raws``, its small graph kept for any
    number of backward passes.

    Forward runs ``compute`` on detached leaves (with autograd when a gradient will be wanted) and returns
    the result without that graph; backward differentiates the kept graph with ``retain_graph``, so
    several backward passes may go through one result: reentrant checkpointing differentiates a
    recomputed block on its own and the rest of the model afterwards, both reaching the same rotations.
    What is kept is the batched Cayley step's intermediates (a few blocks-sized tensors), freed with the
    step's graph.
    """

    @staticmethod
    def forward(ctx, compute, *raws):
        ctx.raws = tuple(r.detach() for r in raws)  # share the parameters' in-place version counters
        ctx.versions = tuple(r._version for r in raws)
        needed = ctx.needs_input_grad[1:]
        if not any(needed):
            return compute(*raws)
        # identity hooks: what this small graph saves stays out of any outer saved-tensor hooks
        # (non-reentrant checkpointing would count it against its recomputation)
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(keep, keep):
            ctx.leaves = [r.detach().requires_grad_(need) for r, need in zip(raws, needed)]
            ctx.result = compute(*ctx.leaves)
        return ctx.result.detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if any(r._version != v for r, v in zip(ctx.raws, ctx.versions)):
            raise RuntimeError("an OFT/BOFT parameter was modified in place (an optimizer step?) between the "
                               "forward and the backward that needs it; step after backward")
        needed = ctx.needs_input_grad[1:]
        wanted = [leaf for leaf in ctx.leaves if leaf.requires_grad]
        # contiguous: an expanded gradient would send the batched products' backward to a slow path
        grads = iter(torch.autograd.grad(ctx.result, wanted, grad.contiguous(), retain_graph=True))
        return (None, *[next(grads) if need else None for need in needed])


def rotation_operands(group: list[OrthogonalAdapter]) -> list[torch.Tensor]:
    """The rotation operands of adapters with one ``batch_key``: one concatenation of their raw
    parameters, one batched Cayley transform, dropout, interpolation and collapse, then one split.

    Works because every step is blockwise along the block axis, and a layer's width is a multiple of the
    butterfly's span, so no butterfly segment straddles two layers — for the two block products too
    (each layer gets its slice of the low and of the high blocks). fp32 throughout (autocast off).
    """
    first = group[0]
    masks = [a.dropout_mask() for a in group]
    mask = None
    if any(m is not None for m in masks):
        mask = torch.cat([torch.zeros(a.n_factors, a.block_num, 1, 1) if m is None else m
                          for a, m in zip(group, masks)], dim=1)

    def compute(*raws: torch.Tensor) -> torch.Tensor:
        with torch.autocast(raws[0].device.type, enabled=False):
            raw = raws[0] if len(raws) == 1 else torch.cat(raws, dim=first.raw_axis)
            return first.operand(first.finish_blocks(first.blocks_from_raw(raw), mask))

    operand = RotationOperands.apply(compute, *[a.raw() for a in group])
    if len(group) == 1:
        return [operand]
    if first.collapse:  # (Σ d/span, span, span)
        return list(operand.split([a.width // operand.shape[-1] for a in group], dim=0))
    if first.two_product:  # [low blocks of every layer, high blocks of every layer], flat: width·B each
        low_width, high_width = first.product_widths()
        n_low = sum(a.width for a in group) * low_width
        lows = operand[:n_low].split([a.width * low_width for a in group])
        highs = operand[n_low:].split([a.width * high_width for a in group])
        return [torch.cat([low, high]) for low, high in zip(lows, highs)]
    return list(operand.split([a.block_num for a in group], dim=1))  # (m, Σ N, b, b)


def is_whole(adapter: OrthogonalAdapter) -> bool:
    """The adapter's parameter is a plain tensor holding all of it here: not a DTensor (FSDP2's shards)
    and not an FSDP1 flat-parameter view (its shape is the parameter's only while its unit is gathered)."""
    raw = adapter.raw()
    return type(raw) in (torch.Tensor, nn.Parameter) and tuple(raw.shape) == adapter.raw_shape()


def share_rotations(adapters: list[OrthogonalAdapter]) -> None:
    """Compute the rotation operands of many adapters at once, per group of equal ``batch_key``, and
    keep them for the layers' calls until :func:`forget_rotations`.

    Replaces a dozen small kernels per layer and step (forward and backward) by a dozen per group:
    what a step of a large model spends with per-layer 8×8 solves is launch overhead. Each adapter
    checks the stored state key (parameter object and version, grad mode, train mode) when it is
    called and computes its own rotation when the key is stale.

    Under sharding (FSDP) the model's forward starts before the units have gathered their parameters:
    adapters whose parameter is not a plain full tensor then (a DTensor shard, an FSDP1 flat-parameter
    view) are left to compute their rotation inside their own unit's forward, after the gather.
    """
    if torch.compiler.is_compiling():
        return
    groups = defaultdict(list)
    for adapter in adapters:
        if is_whole(adapter):
            groups[adapter.batch_key()].append(adapter)
    for group in groups.values():
        if len(group) < 2:
            continue
        for adapter, part in zip(group, rotation_operands(group)):
            SHARED_ROTATIONS[adapter] = (part, adapter.state_key())


def forget_rotations(adapters: list[OrthogonalAdapter]) -> None:
    for adapter in adapters:
        SHARED_ROTATIONS.pop(adapter, None)
