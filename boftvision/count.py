"""Parameter counts: trainable (what the optimizer sees), stored (what the papers count: BOFT/OFT's
skew-symmetric degrees of freedom plus scale, VB-LoRA's bank + top-k indices + k−1 weights) and total."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .inject import adapted_layers


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    stored: int
    total: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return (f"trainable params: {self.trainable:,d} || stored params: {self.stored:,d} || "
                f"all params: {self.total:,d} || trainable%: {share:.4f}")


def _unique(params):
    seen = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())


def count_parameters(model: nn.Module) -> ParameterCount:
    """Counts for the active adapters plus any other trainable parameter (e.g. a task head)."""
    all_params = _unique(model.parameters())
    trainable = sum(p.numel() for p in all_params if p.requires_grad)
    stored, adapter_params = 0, set()
    for _, layer in adapted_layers(model):
        for adapter in layer.adapters.values():
            adapter_params.update(id(p) for p in adapter.parameters())
            adapter_params.update(id(t) for t in adapter.shared_state().values())
        if layer.active is None:
            continue
        adapter = layer.adapters[layer.active]
        stored += adapter.stored_parameters()
    shared = _unique(t for _, layer in adapted_layers(model) if layer.active is not None
                     for t in layer.adapters[layer.active].shared_state().values())  # VB-LoRA's bank, once
    stored += sum(t.numel() for t in shared)
    stored += sum(p.numel() for p in all_params if p.requires_grad and id(p) not in adapter_params)
    return ParameterCount(trainable, stored, sum(p.numel() for p in all_params))


def print_trainable_parameters(model: nn.Module) -> ParameterCount:
    counts = count_parameters(model)
    print(counts)
    return counts
