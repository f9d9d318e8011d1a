"""LoRA (Hu et al., 2021): ``W = W0 + (alpha/r)·B A``; PEFT's layout (``lora_A.weight``, ``lora_B.weight``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoRAConfig
from .base import AdditiveAdapter, LayerShape, add_low_rank, conv_like


class LoRA(AdditiveAdapter):
    """A (r × d) Kaiming-uniform, B (n × r) zero ⇒ identity at init. Conv2d: A is a conv with the base
    kernel/stride/padding and r output channels, B a 1×1 conv (PEFT's shapes)."""

    def __init__(self, shape: LayerShape, config: LoRAConfig, base: nn.Module):
        super().__init__(shape, config)
        r = config.r
        self.scaling = config.alpha / r
        if shape.is_conv:
            self.lora_A = nn.Conv2d(shape.in_features, r, base.kernel_size, base.stride, base.padding,
                                    base.dilation, bias=False)
            self.lora_B = nn.Conv2d(r, shape.n, 1, bias=False)
        else:
            self.lora_A = nn.Linear(shape.d, r, bias=False)
            self.lora_B = nn.Linear(r, shape.n, bias=False)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if config.init_weights:
            nn.init.zeros_(self.lora_B.weight)
        # else: keep nn's default (Kaiming-uniform) init for B, as PEFT does: a non-trivial adapter

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The branch runs in the base output's dtype (autocast's or the base weight's): the small
        fp32 factors are cast, not the activations, so a bf16 model keeps bf16 activations."""
        out = base(x)
        a, b = self.lora_A.weight.to(out.dtype), self.lora_B.weight.to(out.dtype)
        h = self.dropout(x).to(out.dtype)
        if self.shape.is_conv:
            delta = F.conv2d(conv_like(base, a, h), b)
            return torch.add(out, delta, alpha=self.scaling)
        return add_low_rank(out, h, a, b, self.scaling)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """``(alpha/r)·B A`` in the base weight's shape, fp32."""
        a = self.lora_A.weight.float().reshape(self.config.r, -1)
        b = self.lora_B.weight.float().reshape(self.shape.n, -1)
        return (b @ a).reshape(self.shape.weight(base).shape) * self.scaling

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
