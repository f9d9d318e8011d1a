"""Save/load adapters in PEFT's layout: ``adapter_model.safetensors`` + ``adapter_config.json``.

Keys are ``base_model.model.<module path>.<PEFT parameter name>`` with the adapter name stripped;
VB-LoRA's shared bank is ``base_model.vblora_vector_bank``. A directory written by PEFT's
``save_pretrained`` loads here and ours loads in ``PeftModel.from_pretrained``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .adapters import ADAPTER_CLASSES, LayerShape, VBLoRA, new_vector_bank
from .config import AdapterConfig, config_from_dict
from .files import atomic_folder
from .inject import (
    adapted_layers, adapter_configs, add_adapter, all_or_nothing, find_targets, merge_and_unload, modules_to_save,
    saved_module_wrappers,
)
from .ops.vector_bank import topk_compress, topk_expand

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
BANK_KEY = "base_model.vblora_vector_bank"
TOPK_INDICES, TOPK_WEIGHTS = "_topk_indices", "_topk_weights"


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (live tensors, not copies)."""
    if name not in adapter_configs(model):
        raise ValueError(f"no adapter named {name!r}; this model has {sorted(adapter_configs(model))}")
    state = {}
    for layer_name, layer in adapted_layers(model):
        if name in layer.adapters:
            adapter = layer.adapters[name]
            for key, tensor in adapter.peft_state_dict().items():
                state[f"{PREFIX}{layer_name}.{key}"] = tensor
            if isinstance(adapter, VBLoRA):
                state[BANK_KEY] = adapter.vblora_vector_bank
    for module_name, wrapper in saved_module_wrappers(model):
        if name in wrapper.modules_to_save:  # the adapter's own copy, under the original module's name
            for key, tensor in wrapper.modules_to_save[name].named_parameters():
                state[f"{PREFIX}{module_name}.{key}"] = tensor
    return state


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Write ``path/adapter_model.safetensors`` and ``path/adapter_config.json``; returns the dir."""
    config = adapter_configs(model).get(name)
    state = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model, name).items()}
    if getattr(config, "save_only_topk_weights", False):
        for key in [k for k in state if "vblora_logits" in k]:
            indices, weights = topk_compress(state.pop(key), config.topk)
            state[key + TOPK_INDICES], state[key + TOPK_WEIGHTS] = indices, weights
    data = config.to_dict()
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
    with atomic_folder(path, owns={WEIGHTS_NAME, CONFIG_NAME, "README.md"}) as tmp:  # weights + config together
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return Path(path)


def resolve_adapter_dir(path: str | os.PathLike) -> Path:
    """A local directory, or a Hub repo id fetched with huggingface_hub (when online)."""
    local = Path(path)
    if local.is_dir():
        return local
    if local.exists() or str(path).startswith((".", "/")) or str(path).count("/") != 1:
        raise FileNotFoundError(f"adapter directory {str(path)!r} not found (expected a folder holding "
                                f"{WEIGHTS_NAME} and {CONFIG_NAME})")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover
        raise FileNotFoundError(f"{path!r} is not a local folder and huggingface_hub is not installed") from err
    return Path(snapshot_download(str(path), allow_patterns=[WEIGHTS_NAME, CONFIG_NAME]))


def read_adapter(path: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Config and tensors of an adapter directory, with clear errors for missing or corrupt files."""
    folder = resolve_adapter_dir(path)
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing; an adapter directory holds {WEIGHTS_NAME} and {CONFIG_NAME}")
    try:
        config = config_from_dict(json.loads(config_file.read_text()))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from err
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights_file} is not a readable safetensors file (truncated or corrupt?): {err}. "
                         "Re-save or re-download the adapter.") from err
    return config, state


def check_tensors(state: dict[str, torch.Tensor], source, num_vectors: int | None = None) -> None:
    """Every tensor floating point and finite (VB-LoRA's top-k indices: integers below ``num_vectors``);
    the error names the tensor and the count of bad values."""
    for key, tensor in state.items():
        if key.endswith(TOPK_INDICES):
            if tensor.is_floating_point() or tensor.dtype == torch.bool or tensor.is_complex():
                raise ValueError(f"adapter at {source}: {key} is {tensor.dtype}; top-k indices must be integers")
            bad = int(((tensor < 0) | (tensor >= (num_vectors or 0))).sum())
            if bad:
                raise ValueError(f"adapter at {source}: {key} has {bad} indices outside [0, {num_vectors}) "
                                 "(num_vectors of its config); the file is corrupt or belongs to another config")
            continue
        if not tensor.is_floating_point():
            raise ValueError(f"adapter at {source}: {key} is {tensor.dtype}, not floating point; an adapter's "
                             "tensors are float32/float16/bfloat16 — the file is corrupt or not an adapter")
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(f"adapter at {source}: {key} has {bad} non-finite values (NaN or inf) of "
                             f"{tensor.numel()}; refusing to load it (was the training run diverging?)")


def expected_layout(model: nn.Module, config: AdapterConfig) -> dict[str, tuple[int, ...]]:
    """The keys and shapes :func:`adapter_state_dict` will have once ``config`` is added to ``model``,
    worked out on the meta device: nothing is allocated, so a file asking for huge adapters is refused
    before any memory is spent."""
    targets = find_targets(model, config)
    adapter_cls = ADAPTER_CLASSES[config.method]
    layout = {}
    with torch.device("meta"):
        extra = {"bank": new_vector_bank(config)} if config.method == "vblora" else {}
        for layer_name, base in targets.items():
            adapter = adapter_cls(LayerShape(base, layer_name), config, base, **extra)
            for key, tensor in adapter.peft_state_dict().items():
                layout[f"{PREFIX}{layer_name}.{key}"] = tuple(tensor.shape)
    if config.method == "vblora":
        layout[BANK_KEY] = (config.num_vectors, config.vector_length)
    for module_name, module in modules_to_save(model, config).items():
        original = getattr(module, "original_module", module)
        for key, tensor in original.named_parameters():
            layout[f"{PREFIX}{module_name}.{key}"] = tuple(tensor.shape)
    return layout


def _expand_topk(state: dict[str, torch.Tensor], num_vectors: int) -> tuple[dict[str, torch.Tensor], bool]:
    keys = [k for k in state if k.endswith(TOPK_INDICES)]
    for key in keys:
        base = key[: -len(TOPK_INDICES)]
        state[base] = topk_expand(state.pop(key), state.pop(base + TOPK_WEIGHTS), num_vectors)
    return state, bool(keys)


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default",
                 is_trainable: bool = True) -> nn.Module:
    """Add adapter ``name`` from a PEFT-layout directory and load its weights.

    Everything is checked before anything is allocated or changed (the model is left as it was on any
    error): the name exists already; a tensor that is not floating point or not finite; a key for a
    module the model lacks; a tensor whose shape differs (module and both shapes named); a corrupt file.
    """
    if name in adapter_configs(model):
        raise ValueError(f"adapter {name!r} is already loaded; use another name= or remove_adapter first")
    config, state = read_adapter(path)
    check_tensors(state, path, getattr(config, "num_vectors", None))
    topk_only = False
    if config.method == "vblora":
        state, topk_only = _expand_topk(state, config.num_vectors)
    layout = expected_layout(model, config)
    missing = sorted(set(layout) - set(state))
    unexpected = sorted(set(state) - set(layout))
    if unexpected or missing:
        raise ValueError(
            f"adapter at {path} does not fit this model: keys for modules it lacks "
            f"{unexpected[:5]}{' …' if len(unexpected) > 5 else ''}; missing keys {missing[:5]}. "
            "Was it trained on another architecture, or with other target_modules?")
    for key, tensor in state.items():
        if tuple(tensor.shape) != layout[key]:
            module = key[len(PREFIX):] if key.startswith(PREFIX) else key
            raise ValueError(f"adapter at {path} does not fit this model: {module} has shape "
                             f"{tuple(tensor.shape)} in the file but {layout[key]} here "
                             f"(made for another model or other {config.method} settings)")
    with all_or_nothing(model):  # any error below leaves the model exactly as it was
        add_adapter(model, config, name)
        own = adapter_state_dict(model, name)
        with torch.no_grad():
            for key, tensor in state.items():
                own[key].copy_(tensor.to(own[key].dtype))
    for _, layer in adapted_layers(model):
        adapter = layer.adapters[name] if name in layer.adapters else None
        if isinstance(adapter, VBLoRA):
            adapter.topk_only = topk_only
        if adapter is not None and (not is_trainable or topk_only):
            adapter.requires_grad_(False)
    if not is_trainable:
        for _, wrapper in saved_module_wrappers(model):
            if name in wrapper.modules_to_save:
                wrapper.modules_to_save[name].requires_grad_(False)
    return model


def save_merged(model: nn.Module, path: str | os.PathLike) -> Path:
    """Merge the active adapter into the weights, drop the wrappers and save the plain model's
    state dict as ``model.safetensors`` (for models without their own ``save_pretrained``)."""
    model = merge_and_unload(model)
    with atomic_folder(path, owns={"model.safetensors"}) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    return Path(path)
