"""Model surgery: match target modules, wrap them, freeze the base, switch/merge/remove adapters.

The model is adapted in place. Its adapter configs live in ``model.boftvision_configs``
({name: config}); the wrapped layers are :class:`~boftvision.adapters.AdaptedLayer` objects and the
modules trained in full (``modules_to_save``) are :class:`~boftvision.adapters.ModulesToSaveWrapper`
objects holding the original module and one copy per adapter name.

Every public call here either completes or leaves the model as it was: module tree, registered
adapters, ``requires_grad`` flags and hooks (see :func:`all_or_nothing`).
"""
from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .adapters import AdaptedLayer, LayerShape, ModulesToSaveWrapper, method_of
from .adapters.base import SharedParameters, is_supported, shared_arguments
from .adapters.orthogonal import OrthogonalAdapter, forget_rotations, share_rotations
from .config import AdapterConfig
from .sharding import ROOT_WRAPPERS

CONFIGS_ATTR = "boftvision_configs"
# the flags the model's parameters had before its first adapter, by name (holding the parameters
# themselves would keep a sharded model's full weights alive)
REQUIRES_GRAD_ATTR = "boftvision_requires_grad"
SHARED_ATTR = "boftvision_shared"  # adapter name → SharedParameters
WRAPPERS = (AdaptedLayer, ModulesToSaveWrapper)


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    return model.__dict__.setdefault(CONFIGS_ATTR, {})


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def saved_module_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            yield name, module


@contextmanager
def all_or_nothing(model: nn.Module):
    """Undo every structural change made inside the block when it raises: each module's children and
    hooks, the wrappers' active/disabled/merged state, ``requires_grad`` flags, the configs."""
    modules = list(model.modules())
    saved = [(m, dict(m._modules), dict(m._forward_pre_hooks), dict(m._forward_hooks),
              dict(m._forward_hooks_always_called),
              {k: m.__dict__[k] for k in ("active", "disabled", "merged") if k in m.__dict__})
             for m in modules]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    configs = dict(adapter_configs(model))
    model_state = {k: model.__dict__[k] for k in (REQUIRES_GRAD_ATTR,) if k in model.__dict__}
    root_parameters, shared = dict(model._parameters), dict(shared_parameters_of(model))
    try:
        yield
    except BaseException:
        for m, children, pre, post, always, attrs in saved:
            for store, old in ((m._modules, children), (m._forward_pre_hooks, pre), (m._forward_hooks, post),
                               (m._forward_hooks_always_called, always)):
                store.clear()
                store.update(old)
            m.__dict__.update(attrs)
        for p, flag in flags:
            p.requires_grad_(flag)
        adapter_configs(model).clear()
        adapter_configs(model).update(configs)
        model.__dict__.pop(REQUIRES_GRAD_ATTR, None)
        model.__dict__.update(model_state)
        model._parameters.clear()
        model._parameters.update(root_parameters)
        shared_parameters_of(model).clear()
        shared_parameters_of(model).update(shared)
        raise


def layer_index_matches(config: AdapterConfig, name: str) -> bool:
    """PEFT's ``layers_to_transform`` / ``layers_pattern``: the first number after ``<pattern>.`` in the
    module name (after any module name when no pattern is given) must be one of the listed layer
    indices; names without such a number do not match."""
    indices = config.layers_to_transform
    if indices is None or indices == []:
        return True
    patterns = config.layers_pattern
    if not patterns:
        found = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            found = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
            if found:
                break
    if not found:
        return False
    index = int(found.group(1))
    return index == indices if isinstance(indices, int) else index in indices


def matches(pattern: str | list[str], name: str) -> bool:
    """PEFT's rule: a string is a regex that must match the whole name; a list matches exact names or
    dotted suffixes (``"to_q"`` matches ``"down.0.attn.to_q"``)."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == t or name.endswith("." + t) for t in pattern)


def is_target(config: AdapterConfig, name: str) -> bool:
    """``target_modules`` minus ``exclude_modules`` and ``modules_to_save`` (and what they hold), with
    PEFT's layer-index filter for suffix matches."""
    if config.exclude_modules and matches(config.exclude_modules, name):
        return False
    if any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in config.modules_to_save or []):
        return False
    if not matches(config.target_modules, name):
        return False
    if isinstance(config.target_modules, str) or name in config.target_modules:
        return True  # PEFT applies the layer filter to suffix matches only
    return layer_index_matches(config, name)


def _inside_wrapper(name: str, wrappers: list[str]) -> bool:
    return any(name.startswith(w + ".") for w in wrappers)


def find_targets(model: nn.Module, config: AdapterConfig) -> dict[str, nn.Module]:
    """Base layers (unwrapped) to adapt, by module name; a clear error when nothing fits or when a
    target is a module type boftvision cannot adapt."""
    if config.target_modules is None:
        raise ValueError("target_modules is empty: give module names (e.g. ['to_q', 'to_v']) or a regex; "
                         "integrations provide presets")
    wrappers = [name for name, m in model.named_modules() if isinstance(m, WRAPPERS)]
    targets, unsupported, parents = {}, [], dict(model.named_modules())
    for name, module in model.named_modules():
        if not name or not is_target(config, name) or _inside_wrapper(name, wrappers):
            continue
        if isinstance(module, AdaptedLayer):
            targets[name] = module.base_layer
        elif is_supported(module):
            targets[name] = module
            parent = parents[name.rpartition(".")[0]]
            if isinstance(parent, nn.MultiheadAttention):
                warnings.warn(f"target '{name}' is the output projection of an nn.MultiheadAttention, which "
                              "reads its weight directly and never calls it: the adapter will have no effect. "
                              "Adapt the attention's callers' Linear layers instead", stacklevel=3)
        else:
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise ValueError(f"target_modules={config.target_modules!r} matches modules boftvision cannot adapt: "
                         f"{unsupported[:5]}{' …' if len(unsupported) > 5 else ''}; it adapts nn.Linear, "
                         "nn.Conv2d and transformers' Conv1D — narrow target_modules to those (or list "
                         "the others in exclude_modules)")
    if not targets:
        layer_names = [n for n, m in model.named_modules() if is_supported(m)]
        suffixes = sorted({n.split(".")[-1] for n in layer_names})
        raise ValueError(f"target_modules={config.target_modules!r} matches no module of "
                         f"{type(model).__name__}; its Linear/Conv2d layers end in: {suffixes[:30]}")
    return targets


def modules_to_save(model: nn.Module, config: AdapterConfig) -> dict[str, nn.Module]:
    """The modules ``config.modules_to_save`` names (suffix match; names a model lacks are skipped, as
    PEFT lists both ``classifier`` and ``score`` for sequence classification): their wrappers once
    the adapter is added."""
    if not config.modules_to_save:
        return {}
    wrappers = [name for name, m in model.named_modules() if isinstance(m, WRAPPERS)]
    return {name: module for name, module in model.named_modules()
            if name and matches(list(config.modules_to_save), name) and not _inside_wrapper(name, wrappers)}


def add_adapter(model: nn.Module, config: AdapterConfig, name: str = "default") -> nn.Module:
    """Add adapter ``name`` to every target layer, freeze everything else, make it active.

    Raises (and leaves the model as it was) for an existing name, a merged adapter, targets that do
    not fit.
    """
    configs = adapter_configs(model)
    if name in configs:
        raise ValueError(f"adapter {name!r} already exists on this model; pick another name or "
                         f"remove_adapter(model, {name!r}) first")
    merged = {layer.merged for _, layer in adapted_layers(model)} - {None}
    if merged:
        raise RuntimeError(f"adapter {sorted(merged)[0]!r} is merged; unmerge_adapter(model) before adding another")
    check_not_wrapped(model)
    targets = find_targets(model, config)
    adapter_cls = method_of(config).adapter
    device = next(iter(targets.values())).weight.device
    shared = shared_arguments(adapter_cls, config, model, name, device)  # VB-LoRA's bank
    new = {}
    for layer_name, base in targets.items():
        adapter = adapter_cls(LayerShape(base, layer_name), config, base, **shared)
        adapter.train(base.training)  # a model in eval mode gets adapters in eval mode (no dropout)
        new[layer_name] = adapter.to(device=base.weight.device)

    if config.base_model_name_or_path is None:  # recorded in adapter_config.json, as PEFT does
        config.base_model_name_or_path = model_name_or_path(model)
    with all_or_nothing(model):
        if not configs:
            model.__dict__[REQUIRES_GRAD_ATTR] = {n: p.requires_grad for n, p in model.named_parameters()}
        for layer_name, adapter in new.items():
            wrapper = model.get_submodule(layer_name)
            if not isinstance(wrapper, AdaptedLayer):
                wrapper = AdaptedLayer(wrapper)
                _replace(model, layer_name, wrapper)
            wrapper.adapters[name] = adapter
        for module_name, module in modules_to_save(model, config).items():
            if not isinstance(module, ModulesToSaveWrapper):
                module = ModulesToSaveWrapper(module)
                _replace(model, module_name, module)
            module.add_copy(name)
        if shared:  # registered once, on the model (see SharedParameters)
            shared["shared"].register()
            shared_parameters_of(model)[name] = shared["shared"]
        configs[name] = config
        for p in model.parameters():
            p.requires_grad_(False)
        set_adapter(model, name)
        if any(isinstance(a, OrthogonalAdapter) for a in new.values()):
            _attach_rotation_hooks(model)
    return model


def model_name_or_path(model: nn.Module) -> str | None:
    """Where a model was loaded from (transformers' ``name_or_path``, diffusers' ``_name_or_path``)."""
    name = getattr(model, "name_or_path", None)
    if not name:
        config = getattr(model, "config", None)
        name = getattr(config, "_name_or_path", None) or (config.get("_name_or_path") if isinstance(config, dict)
                                                          else None)
    return str(name) if name else None


def _active_orthogonal(model: nn.Module) -> list[OrthogonalAdapter]:
    return [layer.adapters[layer.active] for layer in model.modules()
            if isinstance(layer, AdaptedLayer) and layer.active is not None and not layer.disabled
            and layer.merged is None and isinstance(layer.adapters[layer.active], OrthogonalAdapter)]


def share_model_rotations(model: nn.Module, args) -> None:
    """Forward pre-hook of an adapted model: the rotations of all its active OFT/BOFT layers are
    computed in one batched pass per group (see :func:`~boftvision.adapters.orthogonal.share_rotations`)."""
    share_rotations(_active_orthogonal(model))


def forget_model_rotations(model: nn.Module, args, output) -> None:
    """Forward hook (always called, errors included): the batched rotations serve one forward only, so
    a layer called on its own later (a recomputation in checkpointing, a direct call after its
    parameters changed) computes its own."""
    forget_rotations([layer.adapters[layer.active] for layer in model.modules()
                      if isinstance(layer, AdaptedLayer) and layer.active is not None])


def _attach_rotation_hooks(model: nn.Module) -> None:
    if share_model_rotations not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(share_model_rotations)
        model.register_forward_hook(forget_model_rotations, always_call=True)


def _detach_rotation_hooks(model: nn.Module) -> None:
    for store, hook in ((model._forward_pre_hooks, share_model_rotations),
                        (model._forward_hooks, forget_model_rotations)):
        for key in [k for k, h in store.items() if h is hook]:
            del store[key]
            model._forward_hooks_always_called.pop(key, None)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active adapter: its parameters (and its copies of ``modules_to_save``) train,
    every other adapter's are frozen."""
    if name not in adapter_configs(model):
        raise ValueError(f"no adapter named {name!r}; this model has {sorted(adapter_configs(model))}")
    merged = {layer.merged for _, layer in adapted_layers(model)} - {None, name}
    if merged:
        raise RuntimeError(f"adapter {sorted(merged)[0]!r} is merged; unmerge_adapter(model) before switching")
    for _, layer in adapted_layers(model):
        layer.active = name if name in layer.adapters else None
        for adapter_name, adapter in layer.adapters.items():
            adapter.requires_grad_(adapter_name == name)
    for _, wrapper in saved_module_wrappers(model):
        wrapper.set_active(name)
    for adapter_name, shared in shared_parameters_of(model).items():
        for p in shared.parameters():
            p.requires_grad_(adapter_name == name)


def shared_parameters_of(model: nn.Module) -> dict[str, SharedParameters]:
    """Each adapter's parameters shared by all its layers (VB-LoRA's bank), by adapter name."""
    return model.__dict__.setdefault(SHARED_ATTR, {})


def _drop_shared(model: nn.Module, names) -> None:
    for n in names:
        shared = shared_parameters_of(model).pop(n, None)
        if shared is not None:
            shared.unregister()


def check_not_wrapped(model: nn.Module) -> None:
    """Adapters go in before FSDP/DDP/DeepSpeed wraps the model: wrapping flattens or shards the
    parameters the targets are found by (and DDP would not synchronise parameters added after it)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        FSDPModule = ()
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, FSDPModule) or kind in ROOT_WRAPPERS:
            raise ValueError(f"the model is already wrapped ({kind} at {name or 'the root'}); add adapters to the "
                             "plain model first, then wrap it with FSDP/DDP/DeepSpeed (accelerate.prepare does so)")


@contextmanager
def disable_adapter(model: nn.Module):
    """Run the base model: adapters bypassed and the original ``modules_to_save`` used (merged adapters
    unmerged, and merged again on exit)."""
    layers = [layer for _, layer in adapted_layers(model)] + [w for _, w in saved_module_wrappers(model)]
    merged = [layer for layer in layers if isinstance(layer, AdaptedLayer) and layer.merged is not None]
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
    """Fold the active adapter into the base weights (forward then costs exactly the base's). Never
    applies dropout, whatever the model's mode."""
    layers = [layer for _, layer in adapted_layers(model)]
    if any(layer.disabled for layer in layers):
        raise RuntimeError("merge_adapter inside `with disable_adapter(model)`: the disabled model would run "
                           "merged weights; merge after the with-block")
    done = []
    try:
        for layer in layers:
            layer.merge()
            done.append(layer)
    except BaseException:
        for layer in done:
            layer.unmerge()
        raise


def unmerge_adapter(model: nn.Module) -> None:
    for _, layer in adapted_layers(model):
        layer.unmerge()


def _restore_requires_grad(model: nn.Module) -> None:
    flags = model.__dict__.pop(REQUIRES_GRAD_ATTR, {})
    for name, p in model.named_parameters():  # the adapters' wrappers are gone: the original names again
        if name in flags:
            p.requires_grad_(flags[name])


def remove_adapter(model: nn.Module, name: str | None = None) -> nn.Module:
    """Remove adapter ``name`` (all adapters when None). Layers left with no adapter get their
    original module object back; so do ``modules_to_save`` left with no copy. A merged adapter is
    unmerged first. With no adapter left, every parameter gets back the ``requires_grad`` it had
    before the first :func:`add_adapter`."""
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
    for module_name, wrapper in list(saved_module_wrappers(model)):
        for n in names:
            wrapper.remove_copy(n)
        if not wrapper.modules_to_save:
            _replace(model, module_name, wrapper.original_module)
    for n in names:
        del configs[n]
    _drop_shared(model, names)
    if not configs:
        _detach_rotation_hooks(model)
        _restore_requires_grad(model)
    elif all(layer.active is None for _, layer in adapted_layers(model)):
        set_adapter(model, next(iter(configs)))
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter and drop every wrapper: a plain model with the fine-tuned weights (and
    the active adapter's ``modules_to_save``)."""
    merge_adapter(model)
    for layer_name, layer in list(adapted_layers(model)):
        layer.merged = None  # keep the merged weights
        _replace(model, layer_name, layer.base_layer)
    for module_name, wrapper in list(saved_module_wrappers(model)):
        _replace(model, module_name, wrapper.active_module())
    _drop_shared(model, list(adapter_configs(model)))
    adapter_configs(model).clear()
    _detach_rotation_hooks(model)
    _restore_requires_grad(model)
    return model


def parameter_groups(model: nn.Module, lr: float, weight_decay: float = 0.0,
                     vector_bank_lr: float | None = None, logits_lr: float | None = None) -> list[dict]:
    """Optimizer groups: parameters an adapter puts in a named group (VB-LoRA's ``vector_bank`` and
    ``logits``; paper: lr 1e-3 / 1e-2, no weight decay) get that group's learning rate; every other
    trainable parameter gets ``lr``. Parameters shared between layers appear once."""
    rates = {"vector_bank": vector_bank_lr, "logits": logits_lr}
    named: dict[str, list] = {}
    seen = set()
    for _, layer in adapted_layers(model):
        for adapter in layer.adapters.values():
            for group, params in adapter.optimizer_groups().items():
                for p in params:
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        named.setdefault(group, []).append(p)
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
    groups += [{"params": params, "lr": rates.get(group) or lr, "weight_decay": 0.0}
               for group, params in named.items()]
    return [g for g in groups if g["params"]]
