"""VB-LoRA's top-k admixture over a shared vector bank: pure functions, no module state.

A bank ``𝔅`` holds h vectors of length L. Every length-L sub-vector of the LoRA factors has logits
``σ ∈ R^h``; ``u = Σ_{s ∈ TopK(σ)} softmax(σ_TopK)_s · 𝔅_s`` (entries outside the top k weigh 0).
"""
from __future__ import annotations

import torch


def admix(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """(..., h) logits, (h, L) bank → (..., L) sub-vectors, noise-free top-k softmax mixture."""
    top_logits, indices = logits.topk(topk, dim=-1)
    weights = torch.softmax(top_logits, dim=-1)
    return (weights.unsqueeze(-1) * bank[indices]).sum(-2)


def lora_factors(
    logits_a: torch.Tensor, logits_b: torch.Tensor, bank: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Assemble A (r × d) and B (n × r) from the bank, in PEFT's layout.

    logits_a: (r, d/L, h) — row k of A is the concatenation of its d/L sub-vectors.
    logits_b: (n/L, r, h) — column k of B is the concatenation of its n/L sub-vectors.
    """
    r = logits_a.shape[0]
    a = admix(logits_a, bank, topk).reshape(r, -1)
    b = admix(logits_b, bank, topk).transpose(1, 2).reshape(-1, logits_b.shape[1])
    return a, b


def topk_compress(logits: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What VB-LoRA stores after training: top-k indices (smallest unsigned/int dtype) and k−1 weights."""
    top_logits, indices = logits.topk(topk, dim=-1)
    h = logits.shape[-1]
    dtype = torch.uint8 if h <= 256 else torch.int16 if h <= 2**15 else torch.int32
    weights = torch.softmax(top_logits, dim=-1)[..., :-1].contiguous()
    return indices.to(dtype), weights


def topk_expand(indices: torch.Tensor, weights: torch.Tensor, num_vectors: int) -> torch.Tensor:
    """Logits that reproduce stored (indices, k−1 weights): −inf outside the top k, log-weights inside.

    Only for inference/merging: the discarded logits cannot be trained further.
    """
    last = 1.0 - weights.sum(-1, keepdim=True)
    full_weights = torch.cat([weights, last], dim=-1).float()
    logits = torch.full((*indices.shape[:-1], num_vectors), float("-inf"), dtype=torch.float32,
                        device=weights.device)
    return logits.scatter(-1, indices.long(), full_weights.log())
