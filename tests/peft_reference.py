"""PEFT as the numerical reference, including BOFT with m > 1 on CPU.

PEFT forces BOFT to one butterfly factor when its CUDA extension does not build (always on CPU). To
get its true m > 1 reference we make ``get_fbd_cuda`` report success while layers are built and swap
``FastBlockDiag`` for a torch block-diagonal ((N, D, H, H) → (N, D·H, D·H)). The
swap stays in place: layers built without the patch never call ``FastBlockDiag``.
"""
from __future__ import annotations

import copy
import warnings

import torch


class _TorchBlockDiag:
    @staticmethod
    def apply(blocks: torch.Tensor) -> torch.Tensor:  # (N, D, H, H) -> (N, D*H, D*H)
        return torch.stack([torch.block_diag(*torch.unbind(b)) for b in blocks])


def _build(make):
    import peft.tuners.boft.layer as boft_layer

    boft_layer.FastBlockDiag = _TorchBlockDiag
    saved = boft_layer.get_fbd_cuda
    boft_layer.get_fbd_cuda = lambda: True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return make()
    finally:
        boft_layer.get_fbd_cuda = saved


def peft_model(base: torch.nn.Module, peft_config):
    """``get_peft_model`` on a copy of ``base``; BOFT keeps its requested number of factors."""
    import peft

    return _build(lambda: peft.get_peft_model(copy.deepcopy(base), peft_config))


def peft_from_pretrained(base: torch.nn.Module, path):
    """``PeftModel.from_pretrained`` on a copy of ``base``; BOFT keeps its number of factors."""
    from peft import PeftModel

    return _build(lambda: PeftModel.from_pretrained(copy.deepcopy(base), path))
