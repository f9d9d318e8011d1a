"""The shared contract: a wrapper that holds a frozen base layer and named adapters, and the
``Adapter`` interface every method implements (forward given the base layer, merge/unmerge,
PEFT-named state, stored-parameter count)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..sharding import whole_copy

SUPPORTED_LAYERS = (nn.Linear, nn.Conv2d)


def is_conv1d(layer: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer storing its weight as (in, out)."""
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")


def is_supported(layer: nn.Module) -> bool:
    return isinstance(layer, SUPPORTED_LAYERS) or is_conv1d(layer)


class LayerShape:
    """Geometry of a supported base layer: ``d`` (flattened input width: in_features, or
    in_channels·kh·kw for Conv2d) and ``n`` (out features/channels). Adapters see every weight in
    PyTorch's (n, d[, kh, kw]) layout through :meth:`weight` / :meth:`write_weight`, Conv1D included."""

    def __init__(self, layer: nn.Module, name: str):
        self.name = name
        self.is_conv = isinstance(layer, nn.Conv2d)
        self.kernel_size = tuple(layer.kernel_size) if self.is_conv else ()
        self.transposed = is_conv1d(layer)
        if self.transposed:  # (DeepSpeed ZeRO-3 keeps a partitioned weight's shape in ds_shape)
            self.in_features, self.out_features = getattr(layer.weight, "ds_shape", layer.weight.shape)
            self.d = self.in_features
        elif isinstance(layer, nn.Linear):
            self.in_features, self.out_features = layer.in_features, layer.out_features
            self.d = layer.in_features
        elif isinstance(layer, nn.Conv2d):
            if layer.groups != 1:
                raise ValueError(f"layer '{name}': Conv2d with groups={layer.groups} is not supported; "
                                 "target only convs with groups=1")
            self.in_features, self.out_features = layer.in_channels, layer.out_channels
            self.d = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
        else:
            raise TypeError(f"layer '{name}' is a {type(layer).__name__}; boftvision adapts nn.Linear, "
                            "nn.Conv2d and transformers' Conv1D — narrow target_modules to those")
        self.n = self.out_features

    def describe(self) -> str:
        if self.is_conv:
            return f"layer '{self.name}' (Conv2d, in_channels·kh·kw={self.d}, out_channels={self.n})"
        kind = "Conv1D" if self.transposed else "Linear"
        return f"layer '{self.name}' ({kind}, in_features={self.d}, out_features={self.n})"

    def weight(self, base: nn.Module) -> torch.Tensor:
        """The base weight as (n, d) for linear layers, (n, in, kh, kw) for Conv2d."""
        return base.weight.T if self.transposed else base.weight

    @torch.no_grad()
    def write_weight(self, base: nn.Module, weight: torch.Tensor) -> None:
        """Store a weight given in :meth:`weight`'s layout into the base layer, in its dtype."""
        self.weight(base).copy_(weight.to(base.weight.dtype))


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the base layer computes in: autocast's when on, else the base weight's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def conv_like(base: nn.Conv2d, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Run ``x`` through a conv with ``base``'s stride/padding (mode included)/dilation and another
    kernel: the base layer's own path, so the unmerged branch equals the merged weight's."""
    return base._conv_forward(x, weight, None)


def add_low_rank(out: torch.Tensor, h: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 scaling: float = 1.0) -> torch.Tensor:
    """``out + scaling · (h aᵀ) bᵀ`` for a linear layer's output ``out`` (..., n), all in one dtype: the
    second product and the sum as one ``addmm``, so the sum is written once — no (..., n) product tensor
    and no separate pass to add it (the frozen output's gradient passes through unchanged)."""
    low = F.linear(h, a)
    # bᵀ as a row-major copy (n·r elements): autograd then takes b's gradient as lowᵀ·grad; for bᵀ as a
    # view it computes (gradᵀ·low)ᵀ, a skinny product MKL runs ~10× slower at rank 4 (2048 tokens, n = 1024,
    # a 2-core x86 CPU: 5.6 against 0.5 ms; 0.9 against 0.6 at rank 16)
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, low.shape[-1]), b.t().contiguous(),
                       alpha=scaling)
    return flat.view(out.shape)


SHARED_PREFIX = "boftvision_shared_"  # parameters every layer of one adapter shares, on the adapted model


class SharedParameters:
    """The parameters every layer of one adapter shares (VB-LoRA's bank), registered once, directly on the
    adapted model as ``boftvision_shared_<adapter>_<key>`` (not in a submodule: containers such as
    ``nn.Sequential`` call every child). A sharded model (FSDP) then holds each in its outermost unit,
    gathered for the whole forward. Layers read them through :meth:`get` on every call, so they see
    whatever tensor the model holds under that name (sharding, ``load_state_dict(assign=True)``)."""

    def __init__(self, owner: nn.Module, adapter_name: str, parameters: dict[str, nn.Parameter]):
        self.owner, self.prefix = owner, f"{SHARED_PREFIX}{adapter_name.replace('.', '_')}_"
        self.initial = parameters

    def register(self) -> None:
        for key, param in self.initial.items():
            self.owner.register_parameter(self.prefix + key, param)

    def unregister(self) -> None:
        for key in self.initial:
            self.owner._parameters.pop(self.prefix + key, None)

    def get(self, key: str) -> nn.Parameter:
        return getattr(self.owner, self.prefix + key)

    def parameters(self) -> list[nn.Parameter]:
        return [self.get(key) for key in self.initial]


def shared_arguments(adapter_cls, config, owner: nn.Module, adapter_name: str, device=None) -> dict:
    """The ``shared=`` constructor argument of one adapter's layers: its shared parameters, to be
    registered on ``owner`` (none for methods that share nothing)."""
    params = adapter_cls.shared_parameters(config, device)
    return {"shared": SharedParameters(owner, adapter_name, params)} if params else {}


class Adapter(nn.Module):
    """One method's trainable state for one base layer. Subclasses implement the math by calling
    ``boftvision.ops``; they never hold the base layer (the wrapper passes it in).

    Hooks with defaults for what a method may share across layers or transform in files (VB-LoRA's
    bank and top-k files use them): :meth:`shared_parameters`, :meth:`shared_state`,
    :meth:`optimizer_groups`, :meth:`to_file`, :meth:`from_file`.
    """

    inference_only = False  # set when loaded from a file that cannot be trained further

    def __init__(self, shape: LayerShape, config):
        super().__init__()
        self.shape = shape
        self.config = config

    @classmethod
    def shared_parameters(cls, config, device=None) -> dict[str, nn.Parameter]:
        """Parameters every layer of one adapter shares, made once per ``add_adapter`` and handed to each
        layer as a :class:`SharedParameters` (``shared=``)."""
        return {}

    def shared_state(self) -> dict[str, torch.Tensor]:
        """Model-level tensors of the adapter under their full file keys (stored once per model)."""
        return {}

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters that want their own learning rate, by group name (see ``parameter_groups``)."""
        return {}

    @classmethod
    def to_file(cls, state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
        """The tensors as the adapter file stores them (default: unchanged)."""
        return state

    @classmethod
    def from_file(cls, state: dict[str, torch.Tensor], config) -> tuple[dict[str, torch.Tensor], bool]:
        """Inverse of :meth:`to_file`; also says whether the file can only be used for inference."""
        return state, False

    @classmethod
    def stock_peft_config(cls, config):
        """The config of an equal adapter that stock PEFT builds everywhere (default: this one)."""
        return config

    def stock_peft_state(self) -> dict[str, torch.Tensor]:
        """The tensors (PEFT names) that change for :meth:`stock_peft_config` (default: none)."""
        return {}

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def merge(self, base: nn.Module) -> None:  # pragma: no cover
        raise NotImplementedError

    def unmerge(self, base: nn.Module) -> None:  # pragma: no cover
        raise NotImplementedError

    def peft_state_dict(self) -> dict[str, torch.Tensor]:  # pragma: no cover
        """Tensors under PEFT's per-module key names (adapter name stripped)."""
        raise NotImplementedError

    def stored_parameters(self) -> int:
        """Parameters a trained adapter needs to store (the papers' count; shared state excluded)."""
        return sum(p.numel() for p in self.parameters(recurse=True))


class AdditiveAdapter(Adapter):
    """LoRA-style methods: ``W = W0 + ΔW``; subclasses give ``delta_weight`` in (n, d[, kh, kw])."""

    def delta_weight(self, base: nn.Module) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        self.shape.write_weight(base, self.shape.weight(base).float() + self.delta_weight(base))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        self.shape.write_weight(base, self.shape.weight(base).float() - self.delta_weight(base))


class AdaptedLayer(nn.Module):
    """Wraps a frozen base layer; holds named adapters; forwards through the active one.

    ``base_layer`` is the user's original module object: removing every adapter puts it back.
    Attributes the wrapper lacks (``weight``, ``in_features``, …) are read from the base layer.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.merged: str | None = None
        self.train(base_layer.training)  # follow the model's mode (eval: no adapter dropout)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self._modules.get("base_layer")
            if base is None:
                raise
            return getattr(base, name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled or self.active is None or self.merged is not None:
            return self.base_layer(x, *args, **kwargs)
        return self.adapters[self.active](self.base_layer, x)

    def merge(self) -> None:
        if self.active is None or self.merged is not None:
            return
        if self.disabled:
            raise RuntimeError("cannot merge a disabled adapter layer (inside `with disable_adapter(model)`)")
        if not self.base_layer.weight.is_floating_point():
            raise RuntimeError(f"cannot merge into the quantized weight of {type(self.base_layer).__name__}; "
                               "load the base model in bf16/fp16/fp32 to merge")
        self.adapters[self.active].merge(self.base_layer)
        self.merged = self.active

    def unmerge(self) -> None:
        if self.merged is None:
            return
        self.adapters[self.merged].unmerge(self.base_layer)
        self.merged = None

    def extra_repr(self) -> str:
        return f"active={self.active!r}, merged={self.merged!r}, disabled={self.disabled}"


class ModulesToSaveWrapper(nn.Module):
    """A module some adapters train in full (a task head: PEFT's ``modules_to_save``). The original is
    never trained or written; each adapter name gets its own copy (``modules_to_save[name]``, PEFT's
    attribute names). The forward runs the active adapter's copy, or the original when disabled or
    when the active adapter has no copy. Attributes the wrapper lacks are read from that module."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "original_module" not in self._modules:
                raise
            return getattr(self.active_module(), name)

    def add_copy(self, name: str) -> None:
        self.modules_to_save[name] = whole_copy(self.original_module)  # (a ZeRO-3 partitioned head gathered)

    def remove_copy(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active == name:
            self.active = None

    def set_active(self, name: str) -> None:
        """Copy ``name`` runs and trains; the original and every other copy are frozen."""
        self.active = name if name in self.modules_to_save else None
        self.original_module.requires_grad_(False)
        for copy_name, module in self.modules_to_save.items():
            module.requires_grad_(copy_name == name)

    def active_module(self) -> nn.Module:
        if self.disabled or self.active is None:
            return self.original_module
        return self.modules_to_save[self.active]

    def forward(self, *args, **kwargs):
        return self.active_module()(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"active={self.active!r}, disabled={self.disabled}"
