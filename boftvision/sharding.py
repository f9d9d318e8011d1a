"""Models wrapped for data-parallel training — FSDP2 (``fully_shard``), FSDP1
(``FullyShardedDataParallel``, ``use_orig_params=True``), DeepSpeed ZeRO (stages 1–3) and DDP — as io
sees them: the wrappers' names taken out of module paths, full tensors gathered from the shards, one
process writing.

Adapters go in before wrapping (:func:`boftvision.inject.check_not_wrapped` refuses the reverse). Every
process must call a saving function of a sharded model: gathering is collective.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")  # FSDP1, checkpointing, compile


def clean_name(name: str) -> str:
    """A module path without the wrappers' own levels (FSDP1, activation checkpointing, torch.compile)."""
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


ROOT_WRAPPERS = ("DistributedDataParallel", "FullyShardedDataParallel", "DeepSpeedEngine")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DDP, FSDP1 or DeepSpeed root wrapper (FSDP2 wraps nothing: the model
    itself)."""
    while type(model).__name__ in ROOT_WRAPPERS:
        model = model.module
    return model


def is_fsdp1(module: nn.Module) -> bool:
    return type(module).__name__ == "FullyShardedDataParallel"


def is_zero3(tensor: torch.Tensor) -> bool:
    """A parameter DeepSpeed ZeRO-3 partitions: outside its module's forward it holds no data here (shape
    ``(0,)``), its shape is ``ds_shape``."""
    return hasattr(tensor, "ds_id")


def whole_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with whole, plain parameters. A module built partitioned by DeepSpeed ZeRO-3
    (``zero.Init``) is gathered for it (collective: every process calls it) and the copy's parameters carry
    no partition state, so the engine partitions the copy as a new module when it wraps the model (a plain
    deep copy held the empty partitions, and the engine then partitioned empty tensors)."""
    clone = copy.deepcopy(module)
    partitioned = [name for name, p in module.named_parameters() if is_zero3(p)]
    if partitioned:
        import deepspeed

        originals = dict(module.named_parameters())
        with deepspeed.zero.GatheredParameters([originals[n] for n in partitioned], modifier_rank=None):
            for name in partitioned:
                owner, _, leaf = name.rpartition(".")
                whole = originals[name].data.detach().clone()
                setattr(clone.get_submodule(owner), leaf, nn.Parameter(whole, originals[name].requires_grad))
    return clone


def is_sharded(model: nn.Module) -> bool:
    """Whether parameters of the model are sharded across processes: FSDP2's DTensors, DeepSpeed ZeRO-3's
    partitions, or FSDP1 units that shard (FSDP1's NO_SHARD — its choice for a single process — keeps every
    parameter whole, as DDP does, and torch's state-dict API then loses frozen root-level parameters after
    a backward). ZeRO-1/2 shard the optimizer's state only: the parameters are whole."""
    from torch.distributed.tensor import DTensor

    return (any(is_fsdp1(m) and getattr(m.sharding_strategy, "name", None) != "NO_SHARD" for m in model.modules())
            or any(isinstance(p, DTensor) or is_zero3(p) for p in model.parameters()))


@contextmanager
def built_whole():
    """Inside, transformers builds models whole even where accelerate runs DeepSpeed ZeRO-3 (elsewhere its
    ``from_pretrained`` builds them partitioned, under ``zero.Init``). For models used outside DeepSpeed's
    engine — a pipeline's frozen text encoder — which would otherwise hold empty partitions nobody gathers;
    what the engine trains it partitions at ``prepare``. (accelerate's ``zero3_init_context_manager`` does
    not reach transformers 5, which reads only its DeepSpeed config.)"""
    try:
        from accelerate.state import AcceleratorState, is_initialized
        from transformers.integrations import unset_hf_deepspeed_config
    except ImportError:
        yield
        return
    plugin = AcceleratorState().deepspeed_plugin if is_initialized() else None
    if plugin is None or not plugin.hf_ds_config.is_zero3():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def deepspeed_optimizer(optimizer):
    """DeepSpeed's own optimizer (ZeRO 1–3, bf16/fp16 wrappers: each process holds a part of the state)
    inside accelerate's wrapper, or None when the optimizer is not one of DeepSpeed's."""
    while optimizer is not None and not type(optimizer).__module__.startswith("deepspeed."):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


_GATHERED: list[nn.Module] = []  # FSDP1 roots inside full_parameters now


@contextmanager
def full_parameters(model: nn.Module):
    """Inside, FSDP1's parameters are whole on every process (collective; read only). FSDP2 keeps its
    DTensors: :func:`full_tensor` gathers each. A part of an FSDP1 model may be read inside the whole's
    ``full_parameters`` (see :class:`Parts`)."""
    if any(model is m for root in _GATHERED for m in root.modules()):
        yield
        return
    if not is_fsdp1(model):
        if any(is_fsdp1(m) for m in model.modules()):
            raise ValueError("the model's FSDP1 root wrapper was taken off: pass the FullyShardedDataParallel "
                             "model itself (as accelerate.prepare returned it) to save it")
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(model, writeback=False, recurse=True):
        _GATHERED.append(model)
        try:
            yield
        finally:
            _GATHERED.pop()


class Parts(nn.ModuleDict):
    """Several trained models as one, for accelerate's FSDP, which prepares one model per run (FSDP2
    refuses more; FSDP1's auto-wrap wants every block class in each): e.g. a UNet and its text encoder.
    Call a part through the prepared whole — ``Part(prepared, "unet")(…)`` — so that the sharded root's
    forward gathers its own parameters first."""

    def forward(self, name: str, *args, **kwargs):
        return self[name](*args, **kwargs)


class Part:
    """``prepared(name, …)`` as a callable that reads like the part (attributes come from the part)."""

    def __init__(self, prepared: nn.Module, name: str):
        self.prepared, self.name = prepared, name

    def __call__(self, *args, **kwargs):
        return self.prepared(self.name, *args, **kwargs)

    @property
    def module(self) -> nn.Module:
        """The part itself (under FSDP1 save it inside ``full_parameters(prepared)``)."""
        return unwrap(self.prepared)[self.name]

    def __getattr__(self, attr):
        if attr.startswith("__") or attr in ("prepared", "name"):  # copy/pickle probe before __init__ ran
            raise AttributeError(attr)
        return getattr(self.module, attr)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A whole CPU copy of a parameter (an FSDP2 DTensor or a ZeRO-3 partition is gathered: collective —
    every process calls it, for the same parameters in the same order). A parameter DeepSpeed trains gives
    its optimizer's fp32 weight: under DeepSpeed's bf16/fp16 the module holds a 16-bit copy."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    elif is_zero3(tensor) or hasattr(tensor, "_hp_mapping"):  # DeepSpeed's: ZeRO-3, or trained by ZeRO-1/2
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        master = safe_get_full_fp32_param(tensor) if tensor.requires_grad else None
        if master is not None:
            return master.detach().cpu().clone().contiguous()
        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None, enabled=is_zero3(tensor)):
            return tensor.detach().cpu().clone().contiguous()
    return tensor.detach().cpu().clone().contiguous()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
