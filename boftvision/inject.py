"""Model surgery: match target modules, wrap them, freeze the base, switch/merge/remove adapters.

The model is adapted in place. Its adapter configs live in ``model.boftvision_configs``
({name: config}); the wrapped layers are :class:`~boftvision.adapters.AdaptedLayer` objects.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .adapters import ADAPTER_CLASSES, AdaptedLayer, LayerShape, VBLoRA, new_vector_bank
from .adapters.base import is_supported
from .adapters.boft import OrthogonalAdapter, share_rotations
from .config import AdapterConfig

CONFIGS_ATTR = "boftvision_configs"


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    return model.__dict__.setdefault(CONFIGS_ATTR, {})


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def matches(pattern: str | list[str], name: str) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list matches exact names or
    dotted suffixes (``"to_q"`` matches ``"down.0.attn.to_q"``)."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == t or name.endswith("." + t) for t in pattern)


def find_targets(model: nn.Module, config: AdapterConfig) -> dict[str, nn.Module]:
    """Base layers (unwrapped) to adapt, by module name; a clear error when nothing fits."""
    if config.target_modules is None:
        raise ValueError("target_modules is empty: give module names (e.g. ['to_q', 'to_v']) or a regex; "
                         "integrations provide presets")
    wrappers = [name for name, _ in adapted_layers(model)]
    targets, unsupported = {}, []
    for name, module in model.named_modules():
        if not name or not matches(config.target_modules, name):
            continue
        if isinstance(module, AdaptedLayer):
            targets[name] = module.base_layer
        elif any(name.startswith(w + ".") for w in wrappers):
            continue  # inside a wrapper: its base layer or another adapter's modules
        elif is_supported(module):
            targets[name] = module
        else:
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported and not targets:
        raise ValueError(f"target_modules={config.target_modules!r} matched only unsupported modules: "
                         f"{unsupported[:5]}; boftvision adapts nn.Linear, nn.Conv2d and transformers' Conv1D")
    if not targets:
        layer_names = [n for n, m in model.named_modules() if is_supported(m)]
        suffixes = sorted({n.split(".")[-1] for n in layer_names})
        raise ValueError(f"target_modules={config.target_modules!r} matches no module of "
                         f"{type(model).__name__}; its Linear/Conv2d layers end in: {suffixes[:30]}")
    return targets


def modules_to_save(model: nn.Module, config: AdapterConfig) -> dict[str, nn.Module]:
    """The modules ``config.modules_to_save`` names (suffix match; names a model lacks are skipped, as
    PEFT lists both ``classifier`` and ``score`` for sequence classification)."""
    if not config.modules_to_save:
        return {}
    wrappers = [name for name, _ in adapted_layers(model)]
    return {name: module for name, module in model.named_modules()
            if name and matches(list(config.modules_to_save), name)
            and not any(name.startswith(w + ".") for w in wrappers)}


def add_adapter(model: nn.Module, config: AdapterConfig, name: str = "default") -> nn.Module:
    """Add adapter ``name`` to every target layer, freeze everything else, make it active.

    All layers are validated before any is changed, so an error leaves the model as it was.
    """
    configs = adapter_configs(model)
    if name in configs:
        raise ValueError(f"adapter {name!r} already exists on this model; pick another name or "
                         f"remove_adapter(model, {name!r}) first")
    targets = find_targets(model, config)
    adapter_cls = ADAPTER_CLASSES[config.method]
    device = next(iter(targets.values())).weight.device
    extra = {"bank": new_vector_bank(config, device)} if config.method == "vblora" else {}
    new = {}
    for layer_name, base in targets.items():
        adapter = adapter_cls(LayerShape(base, layer_name), config, base, **extra)
        adapter.train(base.training)  # a model in eval mode gets adapters in eval mode (no dropout)
        new[layer_name] = adapter.to(device=base.weight.device)  # keeps Parameter objects (bank stays shared)

    for layer_name, adapter in new.items():
        wrapper = model.get_submodule(layer_name)
        if not isinstance(wrapper, AdaptedLayer):
            wrapper = AdaptedLayer(wrapper)
            _replace(model, layer_name, wrapper)
        wrapper.adapters[name] = adapter
    configs[name] = config
    for p in model.parameters():
        p.requires_grad_(False)
    set_adapter(model, name)
    if any(isinstance(a, OrthogonalAdapter) for a in new.values()) and \
            share_model_rotations not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(share_model_rotations)
    return model


def share_model_rotations(model: nn.Module, args) -> None:
    """Forward pre-hook of an adapted model: the rotations of all its active OFT/BOFT layers are
    computed in one batched pass per group (see :func:`~boftvision.adapters.boft.share_rotations`)."""
    share_rotations([layer.adapters[layer.active] for layer in model.modules()
                     if isinstance(layer, AdaptedLayer) and layer.active is not None and not layer.disabled
                     and layer.merged is None and isinstance(layer.adapters[layer.active], OrthogonalAdapter)])


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active adapter: its parameters train, every other adapter's are frozen."""
    if name not in adapter_configs(model):
        raise ValueError(f"no adapter named {name!r}; this model has {sorted(adapter_configs(model))}")
    for _, layer in adapted_layers(model):
        if layer.merged is not None and layer.merged != name:
            raise RuntimeError(f"adapter {layer.merged!r} is merged; unmerge_adapter(model) before switching")
        layer.active = name if name in layer.adapters else None
        for adapter_name, adapter in layer.adapters.items():
            adapter.requires_grad_(adapter_name == name)
    for module in modules_to_save(model, adapter_configs(model)[name]).values():
        module.requires_grad_(True)


@contextmanager
def disable_adapter(model: nn.Module):
    """Run the base model: adapters bypassed (merged ones unmerged and re-merged on exit)."""
    layers = [layer for _, layer in adapted_layers(model)]
    merged = [layer for layer in layers if layer.merged is not None]
    for layer in merged:
        layer.unmerge()
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
        for layer in merged:
            layer.merge()


def merge_adapter(model: nn.Module) -> None:
    """Fold the active adapter into the base weights (forward then costs exactly the base's)."""
    for _, layer in adapted_layers(model):
        layer.merge()


def unmerge_adapter(model: nn.Module) -> None:
    for _, layer in adapted_layers(model):
        layer.unmerge()


def remove_adapter(model: nn.Module, name: str | None = None) -> nn.Module:
    """Remove adapter ``name`` (all adapters when None). Layers left with no adapter get their
    original module object back. A merged adapter is unmerged first."""
    configs = adapter_configs(model)
    names = list(configs) if name is None else [name]
    for n in names:
        if n not in configs:
            raise ValueError(f"no adapter named {n!r}; this model has {sorted(configs)}")
    for layer_name, layer in list(adapted_layers(model)):
        for n in names:
            if n in layer.adapters:
                if layer.merged == n:
                    layer.unmerge()
                del layer.adapters[n]
                if layer.active == n:
                    layer.active = None
        if not layer.adapters:
            _replace(model, layer_name, layer.base_layer)
    for n in names:
        del configs[n]
    if configs and all(layer.active is None for _, layer in adapted_layers(model)):
        set_adapter(model, next(iter(configs)))
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter and drop every wrapper: a plain model with the fine-tuned weights."""
    merge_adapter(model)
    for layer_name, layer in list(adapted_layers(model)):
        layer.merged = None  # keep the merged weights
        _replace(model, layer_name, layer.base_layer)
    adapter_configs(model).clear()
    return model


def parameter_groups(model: nn.Module, lr: float, weight_decay: float = 0.0,
                     vector_bank_lr: float | None = None, logits_lr: float | None = None) -> list[dict]:
    """Optimizer groups: VB-LoRA's bank and logits get their own learning rates (paper: 1e-3 / 1e-2);
    every other trainable parameter gets ``lr``. Parameters shared between layers appear once."""
    banks, logits, seen = [], [], set()
    for _, layer in adapted_layers(model):
        for adapter in layer.adapters.values():
            if isinstance(adapter, VBLoRA):
                for p, bucket in ((adapter.vblora_vector_bank, banks), (adapter.vblora_logits_A, logits),
                                  (adapter.vblora_logits_B, logits)):
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        bucket.append(p)
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
    if banks:
        groups.append({"params": banks, "lr": vector_bank_lr or lr, "weight_decay": 0.0})
    if logits:
        groups.append({"params": logits, "lr": logits_lr or lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]
