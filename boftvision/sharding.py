"""Models wrapped for data-parallel training — FSDP2 (``fully_shard``), FSDP1
(``FullyShardedDataParallel``, ``use_orig_params=True``) and DDP — as io sees them: the wrappers'
names taken out of module paths, full tensors gathered from the shards, one process writing.

Adapters go in before wrapping (:func:`boftvision.inject.check_not_wrapped` refuses the reverse). Every
process must call a saving function of a sharded model: gathering is collective.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")  # FSDP1, checkpointing, compile


def clean_name(name: str) -> str:
    """A module path without the wrappers' own levels (FSDP1, activation checkpointing, torch.compile)."""
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP or FSDP1 root wrapper (FSDP2 wraps nothing: the model itself)."""
    while type(model).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel"):
        model = model.module
    return model


def is_fsdp1(module: nn.Module) -> bool:
    return type(module).__name__ == "FullyShardedDataParallel"


def is_sharded(model: nn.Module) -> bool:
    """Whether parameters of the model are sharded across processes (FSDP1 or FSDP2)."""
    from torch.distributed.tensor import DTensor

    return any(is_fsdp1(m) for m in model.modules()) or any(isinstance(p, DTensor) for p in model.parameters())


@contextmanager
def full_parameters(model: nn.Module):
    """Inside, FSDP1's parameters are whole on every process (collective; read only). FSDP2 keeps its
    DTensors: :func:`full_tensor` gathers each."""
    if not is_fsdp1(model):
        if any(is_fsdp1(m) for m in model.modules()):
            raise ValueError("the model's FSDP1 root wrapper was taken off: pass the FullyShardedDataParallel "
                             "model itself (as accelerate.prepare returned it) to save it")
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=False, recurse=True):
        yield


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A whole CPU copy of a parameter (an FSDP2 DTensor is gathered: collective)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().clone().contiguous()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
