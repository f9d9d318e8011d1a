"""BOFT (Liu et al., ICLR 2024): the input side of W0 is rotated by ``R = B_{m−1} ⋯ B_0`` (butterfly
components of Cayley-orthogonal b×b blocks) and the output scaled by a learnable ``s``.

PEFT's layout: ``boft_R`` (m, N, b, b) — full blocks, the skew part is used; ``boft_s`` (n, 1) for
Linear, (1, n) for Conv2d. ``y = s ⊙ ((x R) W0ᵀ) + bias``. The rotation is never built as a d×d matrix:
it is applied to the activations or to the rows of W0, whichever costs less for the call.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..config import BOFTConfig
from ..ops.orthogonal import butterfly_span, cayley, collapse_butterfly, inverse_cayley, skew_from_square
from .base import LayerShape
from .orthogonal import OrthogonalAdapter, block_size_for_layer, rotated_width


def full_butterfly_factors(shape: LayerShape, config: BOFTConfig) -> int:
    """m of the full butterfly on this layer, log2(N) + 1 (``n_butterfly_factor=0``, LyCORIS's BOFT):
    R then mixes every rotated channel with every other. Needs N = width/b a power of two."""
    b = block_size_for_layer(shape, config, 1)
    n = rotated_width(shape, config) // b
    if n & (n - 1):
        raise ValueError(f"{shape.describe()}: the full butterfly (n_butterfly_factor=0) needs a power-of-two "
                         f"number of blocks, but the width {n * b} / block size {b} = {n}; choose a block size "
                         "that leaves a power of two, or give n_butterfly_factor explicitly")
    return n.bit_length()


class BOFT(OrthogonalAdapter):
    def __init__(self, shape: LayerShape, config: BOFTConfig, base: nn.Module):
        m = config.n_butterfly_factor or full_butterfly_factors(shape, config)
        super().__init__(shape, config, m, block_size_for_layer(shape, config, m))
        b, n = self.block_size, self.block_num
        self.boft_R = nn.Parameter(torch.zeros(m, n, b, b))
        self.boft_s = nn.Parameter(torch.ones(1, shape.n) if shape.is_conv else torch.ones(shape.n, 1))
        if not config.init_weights:
            nn.init.normal_(self.boft_R, 0.0, 0.1)
            nn.init.normal_(self.boft_s, 1.0, 0.1)

    def raw(self) -> torch.Tensor:
        return self.boft_R

    def raw_shape(self) -> tuple[int, ...]:
        return (self.n_factors, self.block_num, self.block_size, self.block_size)

    def blocks_from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        return cayley(skew_from_square(raw))

    def output_scale(self) -> torch.Tensor:
        return self.boft_s

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {"boft_R": self.boft_R, "boft_s": self.boft_s}

    def single_factor_blocks(self) -> torch.Tensor:
        """This adapter as ``boft_R`` of an equal BOFT with one factor and blocks b·2^(m−1) wide:
        R = B_{m−1}⋯B_0 is block-diagonal with such orthogonal blocks (:func:`collapse_butterfly`), and
        each is the Cayley transform of the skew block returned here (the inverse transform). Raises,
        naming the layer, when a block has the eigenvalue −1 (no skew block gives it)."""
        with torch.no_grad():
            blocks = collapse_butterfly(self.orthogonal_blocks())  # (d/B, B, B)
            try:
                q = inverse_cayley(blocks)
                error = (cayley(q) - blocks).abs().max().item() if q.numel() else 0.0
            except torch.linalg.LinAlgError:  # I + R singular: the eigenvalue −1 exactly
                error = float("inf")
        if not error <= 1e-4:
            raise ValueError(f"{self.shape.describe()}: a rotation block has an eigenvalue near −1, so no one-factor "
                             f"BOFT (block size {butterfly_span(self.block_size, self.n_factors)}) reproduces it "
                             f"(round-trip error {error:.2g}); save it without peft_compatible (boftvision and "
                             "PEFT with its CUDA extension load it as it is)")
        return q.unsqueeze(0)  # (1, d/B, B, B); the skew part of a skew block is itself

    @classmethod
    def stock_peft_config(cls, config: BOFTConfig) -> BOFTConfig:
        """One factor, blocks b·2^(m−1) wide (or N/2^(m−1) of them): what PEFT builds without its CUDA
        extension, and equal to this adapter with :meth:`stock_peft_state`."""
        m = config.n_butterfly_factor
        if m == 1:
            return config
        if m == 0:
            raise ValueError("the full butterfly (n_butterfly_factor=0) has a different m per layer, which PEFT's "
                             "BOFT cannot hold: save it without peft_compatible, or export a merged model")
        return dataclasses.replace(config, n_butterfly_factor=1,
                                   block_size=config.block_size * 2 ** (m - 1) if config.block_size else 0,
                                   block_num=config.block_num // 2 ** (m - 1) if config.block_num else 0)

    def stock_peft_state(self) -> dict[str, torch.Tensor]:
        return {} if self.n_factors == 1 else {"boft_R": self.single_factor_blocks()}
