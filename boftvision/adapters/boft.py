"""BOFT (Liu et al., ICLR 2024): the input side of W0 is rotated by ``R = B_{m−1} ⋯ B_0`` (butterfly
components of Cayley-orthogonal b×b blocks) and the output scaled by a learnable ``s``.

PEFT's layout: ``boft_R`` (m, N, b, b) — full blocks, the skew part is used; ``boft_s`` (n, 1) for
Linear, (1, n) for Conv2d. ``y = s ⊙ ((x R) W0ᵀ) + bias``. The rotation is never built as a d×d matrix:
it is applied to the activations or to the rows of W0, whichever costs less for the call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BOFTConfig, OFTConfig
from ..ops.orthogonal import (
    apply_factor, butterfly_apply, butterfly_span, cayley, check_butterfly_shape, collapse_butterfly,
    max_butterfly_factors, multiplicative_dropout, rotate_weight, skew_from_square,
)
from .base import Adapter, LayerShape, compute_dtype


def block_size_for_layer(shape: LayerShape, config: BOFTConfig | OFTConfig, n_factors: int) -> int:
    """Resolve b for this layer and check (d, b, m); the error names the layer and values that work."""
    d = shape.d
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
        raise ValueError(f"{shape.describe()}: {problem}; try {hint}")
    return b


PASS_COST = 500  # MAC-equivalents per element of one memory-bound pass (see choose_side)
COLLAPSE_SPAN = 64  # collapse the m factors into R's diagonal blocks when they are at most this wide


class OrthogonalAdapter(Adapter):
    """What OFT and BOFT share: blocks → (dropout, interpolation) → rotation on the cheaper side."""

    rotation_side = "auto"  # "auto" | "input" | "weight" (tests and benchmarks pin a side)

    def __init__(self, shape: LayerShape, config, n_factors: int, block_size: int):
        super().__init__(shape, config)
        self.n_factors, self.block_size = n_factors, block_size
        self.block_num = shape.d // block_size
        self.identity_factors = 0  # butterfly interpolation: leftmost components set to I
        self.reset_scale = False
        self.collapse = n_factors > 1 and butterfly_span(block_size, n_factors) <= COLLAPSE_SPAN

    # --- method-specific parametrisation -------------------------------------------------
    def orthogonal_blocks(self) -> torch.Tensor:  # pragma: no cover
        """(m, N, b, b) fp32 blocks from the parameters."""
        raise NotImplementedError

    def output_scale(self) -> torch.Tensor | None:
        return None

    # --- shared -------------------------------------------------------------------------
    def rotation_blocks(self) -> torch.Tensor:
        blocks = self.orthogonal_blocks()
        if self.training and self.config.dropout > 0:
            blocks = multiplicative_dropout(blocks, self.config.dropout)
        if self.identity_factors:
            keep = self.n_factors - min(self.identity_factors, self.n_factors)
            eye = torch.eye(self.block_size, device=blocks.device, dtype=blocks.dtype)
            blocks = torch.cat([blocks[:keep], eye.expand_as(blocks[keep:])])
        return blocks

    def scale(self) -> torch.Tensor | None:
        return None if self.reset_scale else self.output_scale()

    def choose_side(self, x: torch.Tensor) -> str:
        """Cheaper side for this call, in multiply-add equivalents.

        A pass of a factor over a (rows × d) tensor is memory-bound: ~PASS_COST MACs per element,
        calibrated on this workplace's 2-core CPU (benchmarks/bench_layers.py) and of the same order on
        a GPU by its FLOP-to-bandwidth ratio (not yet measured there); factors after the first need two
        extra reshape passes unless the butterfly is collapsed. The weight side rotates n rows instead of the tokens, but in
        training it adds a tokens×n×d matmul for the rotated weight's gradient.
        """
        if self.shape.is_conv:
            return "weight"
        if self.rotation_side != "auto":
            return self.rotation_side
        tokens, (n, d) = x.numel() // self.shape.d, (self.shape.n, self.shape.d)
        passes = PASS_COST if self.collapse else PASS_COST * (1 + 3 * (self.n_factors - 1))
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        sweeps = 3 if training else 1  # forward + two backward products
        input_cost = tokens * d * passes * sweeps
        weight_cost = n * d * passes * sweeps + (2 * tokens * n * d if training else 0)
        return "input" if input_cost < weight_cost else "weight"

    def rotate(self, x: torch.Tensor, blocks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """``x @ R`` (``x @ Rᵀ``) with fp32 ``blocks`` cast to x's dtype: one block product over R's
        collapsed diagonal blocks when they are narrow (see ``COLLAPSE_SPAN``), else factor by factor."""
        if self.collapse:
            diagonal = collapse_butterfly(blocks)
            return apply_factor(x, (diagonal.transpose(-1, -2) if transpose else diagonal).to(x.dtype), 0)
        return butterfly_apply(x, blocks.to(x.dtype), transpose=transpose)

    def rotated_weight(self, base: nn.Module, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        weight = self.shape.weight(base).to(dtype)
        weight = self.rotate(weight.reshape(weight.shape[0], -1), blocks, transpose=True).reshape(weight.shape)
        s = self.scale()
        if s is not None:
            weight = weight * s.reshape(-1, *[1] * (weight.dim() - 1)).to(dtype)
        return weight

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        quantized = not base.weight.is_floating_point()  # e.g. bitsandbytes 4-bit: only the input side works
        dtype = compute_dtype(x, base.weight)
        blocks = self.rotation_blocks()
        x = x if quantized else x.to(dtype)
        if not quantized and self.choose_side(x) == "weight":
            bias = None if base.bias is None else base.bias.to(dtype)
            weight = self.rotated_weight(base, blocks, dtype)
            if self.shape.is_conv:
                return base._conv_forward(x, weight, bias)
            return F.linear(x, weight, bias)
        y = base(self.rotate(x, blocks))  # PEFT's order: rotate, base layer, scale w/o bias
        s = self.scale()
        if s is None:
            return y
        if base.bias is None:
            return y * s.reshape(-1).to(y.dtype)
        bias = base.bias.to(y.dtype)
        return (y - bias) * s.reshape(-1).to(y.dtype) + bias

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        self.shape.write_weight(base, self.rotated_weight(base, self.rotation_blocks(), torch.float32))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        weight = self.shape.weight(base).float()
        s = self.scale()
        if s is not None:
            weight = weight / s.reshape(-1, *[1] * (weight.dim() - 1)).float()
        self.shape.write_weight(base, rotate_weight(weight, self.rotation_blocks(), inverse=True))

    def stored_parameters(self) -> int:
        """Effective count: b(b−1)/2 free entries per skew block, plus the output scale if any."""
        b = self.block_size
        s = self.output_scale()
        return self.n_factors * self.block_num * b * (b - 1) // 2 + (0 if s is None else s.numel())


class BOFT(OrthogonalAdapter):
    def __init__(self, shape: LayerShape, config: BOFTConfig, base: nn.Module):
        m = config.n_butterfly_factor
        super().__init__(shape, config, m, block_size_for_layer(shape, config, m))
        b, n = self.block_size, self.block_num
        self.boft_R = nn.Parameter(torch.zeros(m, n, b, b))
        self.boft_s = nn.Parameter(torch.ones(1, shape.n) if shape.is_conv else torch.ones(shape.n, 1))
        if not config.init_weights:
            nn.init.normal_(self.boft_R, 0.0, 0.1)
            nn.init.normal_(self.boft_s, 1.0, 0.1)

    def orthogonal_blocks(self) -> torch.Tensor:
        return cayley(skew_from_square(self.boft_R))

    def output_scale(self) -> torch.Tensor:
        return self.boft_s

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {"boft_R": self.boft_R, "boft_s": self.boft_s}
