"""OFT (Qiu et al., 2023): BOFT with one butterfly factor and no output scale; PEFT ≥0.18 layout.

``oft_R.weight`` (N, b(b−1)/2) holds the strict upper triangle of each skew block ``Q = U − Uᵀ``.
Exact Cayley gives ``(I − Q)(I + Q)⁻¹``; the Cayley–Neumann option (PEFT's default) gives
``I + 2Q + 2Q² + … + Q^{n−1}`` ≈ ``(I + Q)(I − Q)⁻¹`` — not exactly orthogonal (PEFT's conventions).

Matches PEFT 0.21's OFT. For Conv2d with kernels > 1×1 PEFT 0.21's unmerged forward rotates
overlapping unfolded patches and does not equal its own merged weights; ours rotates the flattened
filters (its merge), so the two agree on 1×1 convs and on merged models.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import OFTConfig
from ..ops.orthogonal import cayley, cayley_neumann, skew_from_upper
from .base import LayerShape
from .orthogonal import OrthogonalAdapter, block_size_for_layer


class OFT(OrthogonalAdapter):
    def __init__(self, shape: LayerShape, config: OFTConfig, base: nn.Module):
        super().__init__(shape, config, 1, block_size_for_layer(shape, config, 1))
        b = self.block_size
        self.oft_R = nn.Parameter(torch.zeros(self.block_num, b * (b - 1) // 2))
        if not config.init_weights:
            nn.init.normal_(self.oft_R, 0.0, 0.1)

    raw_axis = 0

    def raw(self) -> torch.Tensor:
        return self.oft_R

    def raw_shape(self) -> tuple[int, ...]:
        return (self.block_num, self.block_size * (self.block_size - 1) // 2)

    def blocks_from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        q = skew_from_upper(raw.float(), self.block_size)
        if self.config.use_cayley_neumann:
            blocks = cayley_neumann(q, self.config.num_cayley_neumann_terms)
        else:
            blocks = cayley(q)
        return blocks.unsqueeze(0)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {"oft_R.weight": self.oft_R}
