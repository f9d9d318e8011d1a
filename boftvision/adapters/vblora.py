"""VB-LoRA (Li et al., NeurIPS 2024): LoRA factors assembled from one vector bank shared by every
adapted layer, by a top-k softmax admixture per sub-vector. PEFT's layout: ``vblora_logits_A``
(r, d/L, h), ``vblora_logits_B`` (n/L, r, h), bank ``vblora_vector_bank`` (h, L); no alpha scaling."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VBLoRAConfig
from ..ops.vector_bank import lora_factors
from .base import AdditiveAdapter, LayerShape, conv_like


def new_vector_bank(config: VBLoRAConfig, device: torch.device | None = None) -> nn.Parameter:
    """The bank every layer of one adapter shares: U(−bound, bound), (num_vectors, vector_length)."""
    bank = torch.empty(config.num_vectors, config.vector_length, device=device)
    nn.init.uniform_(bank, -config.init_vector_bank_bound, config.init_vector_bank_bound)
    return nn.Parameter(bank)


class VBLoRA(AdditiveAdapter):
    """Forward never builds ΔW: ``y = base(x) + (x Aᵀ) Bᵀ`` with A, B re-assembled each step.

    Conv2d (not in PEFT): A is reshaped to a conv kernel (r, in, kh, kw), B is a 1×1 conv, as LoRA's.
    Not identity at init (both factors come from the random bank, as in the paper and PEFT): the
    initial ΔW is O(r·bound²) per entry.
    """

    def __init__(self, shape: LayerShape, config: VBLoRAConfig, base: nn.Module, bank: nn.Parameter):
        super().__init__(shape, config)
        length = config.vector_length
        for what, width in (("input width", shape.d), ("output width", shape.n)):
            if width % length:
                divisors = [v for v in range(1, width + 1) if width % v == 0 and shape.d % v == 0
                            and shape.n % v == 0]
                near = min(divisors, key=lambda v: abs(v - length))
                raise ValueError(f"{shape.describe()}: vector_length {length} does not divide its {what} "
                                 f"{width}; use a vector_length dividing every targeted width (e.g. {near})")
        self.topk = config.topk
        self.vblora_vector_bank = bank
        self.vblora_logits_A = nn.Parameter(torch.randn(config.r, shape.d // length, config.num_vectors)
                                            * config.init_logits_std)
        self.vblora_logits_B = nn.Parameter(torch.randn(shape.n // length, config.r, config.num_vectors)
                                            * config.init_logits_std)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.topk_only = False  # set when loaded from a save_only_topk_weights file

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and self.topk_only and torch.is_grad_enabled():
            raise RuntimeError(f"{self.shape.describe()}: this VB-LoRA adapter was loaded from a "
                               "save_only_topk_weights file (logits discarded); it can be used for inference "
                               "and merging only — retrain from a file saved with save_only_topk_weights=False")
        return lora_factors(self.vblora_logits_A, self.vblora_logits_B, self.vblora_vector_bank, self.topk)

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = base(x)
        a, b = self.factors()
        h = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            h = h.to(a.dtype)
        if self.shape.is_conv:
            kernel = a.reshape(a.shape[0], *base.weight.shape[1:])
            delta = F.conv2d(conv_like(base, kernel, h), b[:, :, None, None])
        else:
            delta = F.linear(F.linear(h, a), b)
        return out + delta.to(out.dtype)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        a, b = self.factors()
        return (b.float() @ a.float()).reshape(self.shape.weight(base).shape)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {"vblora_logits_A": self.vblora_logits_A, "vblora_logits_B": self.vblora_logits_B}

    def stored_parameters(self) -> int:
        """fp32-equivalent size of what ``save_only_topk_weights`` keeps per sub-vector: k indices at their
        integer width (uint8 = ¼ of an fp32 when h ≤ 256) + (k−1) mixture weights — the paper's
        ``3·L·M·r·(d/b)`` term for k = 2 — bank counted once per model by count_parameters."""
        subvectors = (self.vblora_logits_A.numel() + self.vblora_logits_B.numel()) // self.config.num_vectors
        h = self.config.num_vectors
        index_size = 0.25 if h <= 256 else 0.5 if h <= 2**15 else 1.0
        return round(subvectors * (self.topk * index_size + self.topk - 1))
