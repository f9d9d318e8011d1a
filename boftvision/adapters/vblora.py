"""VB-LoRA (Li et al., NeurIPS 2024): LoRA factors assembled from one vector bank shared by every
adapted layer, by a top-k softmax admixture per sub-vector. PEFT's layout: ``vblora_logits_A``
(r, d/L, h), ``vblora_logits_B`` (n/L, r, h), bank ``vblora_vector_bank`` (h, L); no alpha scaling."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VBLoRAConfig
from ..ops.vector_bank import lora_factors, topk_compress, topk_expand
from .base import AdditiveAdapter, LayerShape, SharedParameters, add_low_rank, conv_like

BANK_KEY = "base_model.vblora_vector_bank"  # PEFT's file key of the shared bank
TOPK_INDICES, TOPK_WEIGHTS = "_topk_indices", "_topk_weights"  # suffixes of save_only_topk_weights files


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

    def __init__(self, shape: LayerShape, config: VBLoRAConfig, base: nn.Module, shared: SharedParameters):
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
        self.shared = shared  # the bank is registered once, on the model (see SharedParameters)
        self.vblora_logits_A = nn.Parameter(torch.randn(config.r, shape.d // length, config.num_vectors)
                                            * config.init_logits_std)
        self.vblora_logits_B = nn.Parameter(torch.randn(shape.n // length, config.r, config.num_vectors)
                                            * config.init_logits_std)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @property
    def vblora_vector_bank(self) -> nn.Parameter:
        return self.shared.get("vblora_vector_bank")

    @classmethod
    def shared_parameters(cls, config: VBLoRAConfig, device=None) -> dict[str, nn.Parameter]:
        return {"vblora_vector_bank": new_vector_bank(config, device)}

    def shared_state(self) -> dict[str, torch.Tensor]:
        return {BANK_KEY: self.vblora_vector_bank}

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"vector_bank": [self.vblora_vector_bank], "logits": [self.vblora_logits_A, self.vblora_logits_B]}

    @classmethod
    def to_file(cls, state: dict[str, torch.Tensor], config: VBLoRAConfig) -> dict[str, torch.Tensor]:
        """``save_only_topk_weights``: each logits tensor becomes its top-k indices and k−1 weights."""
        if not config.save_only_topk_weights:
            return state
        state = dict(state)
        for key in [k for k in state if "vblora_logits" in k]:
            state[key + TOPK_INDICES], state[key + TOPK_WEIGHTS] = topk_compress(state.pop(key), config.topk)
        return state

    @classmethod
    def from_file(cls, state: dict[str, torch.Tensor], config: VBLoRAConfig) -> tuple[dict[str, torch.Tensor], bool]:
        """Logits re-expanded from a top-k file (then usable for inference and merging only)."""
        keys = [k for k in state if k.endswith(TOPK_INDICES)]
        state = dict(state)
        for key in keys:
            bad = int(((state[key] < 0) | (state[key] >= config.num_vectors)).sum())
            if bad:
                raise ValueError(f"{key} has {bad} indices outside [0, {config.num_vectors}) (the bank's size); "
                                 "the file is corrupt or belongs to another config")
            base = key[: -len(TOPK_INDICES)]
            state[base] = topk_expand(state.pop(key), state.pop(base + TOPK_WEIGHTS), config.num_vectors)
        return state, bool(keys)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and self.inference_only and torch.is_grad_enabled():
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
            return out + delta.to(out.dtype)
        if h.dtype == out.dtype:  # else (a low-precision model without autocast) the branch keeps a's dtype
            return add_low_rank(out, h, a, b)
        return out + F.linear(F.linear(h, a), b).to(out.dtype)

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
