"""BOFT (Liu et al., ICLR 2024): the input side of W0 is rotated by ``R = B_{m−1} ⋯ B_0`` (butterfly
components of Cayley-orthogonal b×b blocks) and the output scaled by a learnable ``s``.

PEFT's layout: ``boft_R`` (m, N, b, b) — full blocks, the skew part is used; ``boft_s`` (n, 1) for
Linear, (1, n) for Conv2d. ``y = s ⊙ ((x R) W0ᵀ) + bias``. The rotation is never built as a d×d matrix:
it is applied to the activations or to the rows of W0, whichever costs less for the call.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import BOFTConfig
from ..ops.orthogonal import cayley, skew_from_square
from .base import LayerShape
from .orthogonal import OrthogonalAdapter, block_size_for_layer


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

    def raw(self) -> torch.Tensor:
        return self.boft_R

    def blocks_from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        return cayley(skew_from_square(raw))

    def output_scale(self) -> torch.Tensor:
        return self.boft_s

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {"boft_R": self.boft_R, "boft_s": self.boft_s}


