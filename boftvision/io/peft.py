"""Save/load adapters in PEFT's layout: ``adapter_model.safetensors`` + ``adapter_config.json``.

Keys are ``base_model.model.<module path>.<PEFT parameter name>`` with the adapter name stripped;
VB-LoRA's shared bank is ``base_model.vblora_vector_bank``. A directory written by PEFT's
``save_pretrained`` loads here and ours loads in ``PeftModel.from_pretrained`` — except BOFT with
m ≥ 2 factors, which PEFT builds only when its CUDA extension compiles (never on CPU); for those,
``save_adapter(..., peft_compatible=True)`` writes the equal one-factor BOFT every PEFT build loads.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapters import LayerShape, config_from_dict, method_of
from ..adapters.base import shared_arguments
from ..config import AdapterConfig
from ..files import atomic_folder
from ..inject import (
    adapted_layers,
    adapter_configs,
    add_adapter,
    all_or_nothing,
    find_targets,
    merge_and_unload,
    modules_to_save,
    saved_module_wrappers,
    shared_parameters_of,
)
from ..sharding import barrier, clean_name, full_parameters, full_tensor, is_sharded, rank, unwrap

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (live tensors, not copies; under FSDP, shards — see
    :func:`save_adapter`). Wrappers' levels (FSDP1, checkpointing) are not part of the names."""
    model = unwrap(model)
    if name not in adapter_configs(model):
        raise ValueError(f"no adapter named {name!r}; this model has {sorted(adapter_configs(model))}")
    state = {}
    for layer_name, layer in adapted_layers(model):
        if name in layer.adapters:
            adapter = layer.adapters[name]
            for key, tensor in adapter.peft_state_dict().items():
                state[f"{PREFIX}{clean_name(layer_name)}.{key}"] = tensor
            state.update(adapter.shared_state())  # e.g. VB-LoRA's bank, once per model
    for module_name, wrapper in saved_module_wrappers(model):
        if name in wrapper.modules_to_save:  # the adapter's own copy, under the original module's name
            for key, tensor in wrapper.modules_to_save[name].named_parameters():
                state[f"{PREFIX}{clean_name(module_name)}.{clean_name(key)}"] = tensor
    return state


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default",
                 allow_nonfinite: bool = False, peft_compatible: bool = False, format: str = "peft",
                 prefix: str | None = None) -> Path:
    """Write ``path/adapter_model.safetensors`` and ``path/adapter_config.json`` together (a temporary
    sibling, then a rename); returns the dir. A NaN or inf in the adapter is refused (naming the first
    such tensor) unless ``allow_nonfinite``: such a file breaks every model it is loaded into.

    ``format="lycoris"``: write one LyCORIS/kohya ``.safetensors`` (``path``) for ComfyUI, AUTOMATIC1111
    and kohya instead, with the kohya ``prefix`` of this model (``lora_unet``, ``lora_te``); see
    :mod:`boftvision.io.lycoris`.

    ``peft_compatible``: write the equal adapter every PEFT build loads. BOFT with m ≥ 2 factors becomes
    BOFT with one factor of b·2^(m−1)-wide blocks (stock PEFT drops to one factor when its CUDA
    extension does not build, so it cannot read m ≥ 2); other methods are written as they are.
    """
    if format == "lycoris":
        from .lycoris import PREFIXES, save_lycoris

        if prefix is None:
            raise ValueError(f"format='lycoris' needs prefix= (one of {PREFIXES}: lora_unet for a UNet, lora_te for "
                             "a text encoder), the names ComfyUI/AUTOMATIC1111 look the modules up by")
        if peft_compatible:
            raise ValueError("peft_compatible applies to format='peft' only")
        return save_lycoris({prefix: model}, path, name, allow_nonfinite)
    if format != "peft":
        raise ValueError(f"format={format!r}: use 'peft' (a PEFT adapter folder) or 'lycoris' (one kohya-named "
                         ".safetensors file)")
    sharded = is_sharded(model)
    if sharded and peft_compatible:
        raise ValueError("peft_compatible on a sharded model: save it as it is, load that into an unsharded model, "
                         "and save that with peft_compatible=True")
    with full_parameters(model):
        state = {k: full_tensor(v) for k, v in adapter_state_dict(model, name).items()}
    if not allow_nonfinite:  # on every process alike (the gathered tensors are equal)
        refuse_nonfinite(state, name)
    if rank() != 0:  # process 0 writes (sharded: the others wait for it; DDP: they have nothing to add)
        if sharded:
            barrier()
        return Path(path)
    model = unwrap(model)
    config = adapter_configs(model)[name] if name in adapter_configs(model) else None
    if peft_compatible:
        if getattr(config, "orientation", "input") != "input":
            raise ValueError(f"adapter {name!r} rotates the output side (orientation='output'), which PEFT's format "
                             "cannot hold: save it without peft_compatible (boftvision reads it), as a LyCORIS file "
                             "(format='lycoris', for ComfyUI/AUTOMATIC1111/kohya), or merged")
        for layer_name, layer in adapted_layers(model):
            if name in layer.adapters:
                for key, tensor in layer.adapters[name].stock_peft_state().items():
                    state[f"{PREFIX}{layer_name}.{key}"] = tensor.detach().contiguous().cpu()
        config = method_of(config).adapter.stock_peft_config(config)
    try:
        state = method_of(config).adapter.to_file(state, config)
        data = config.to_dict()
        if isinstance(data.get("target_modules"), list):
            data["target_modules"] = sorted(data["target_modules"])
        with atomic_folder(path, owns={WEIGHTS_NAME, CONFIG_NAME, "README.md"}) as tmp:  # weights + config together
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    finally:
        if sharded:
            barrier()
    return Path(path)


def refuse_nonfinite(state: dict[str, torch.Tensor], name: str) -> None:
    """Refuse to save an adapter holding NaN/inf (naming the first such tensor): such a file breaks every
    model it is loaded into."""
    for key, tensor in state.items():
        bad = int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0
        if bad:
            raise ValueError(f"not saving adapter {name!r}: {key} has {bad} non-finite values (the run "
                             "diverged?); pass allow_nonfinite=True to write it anyway")


def resolve_adapter_dir(path: str | os.PathLike) -> Path:
    """A local directory, or a Hub repo id fetched with huggingface_hub (when online)."""
    local = Path(path)
    if local.is_dir():
        if not (local / CONFIG_NAME).is_file() and (local / "adapter" / CONFIG_NAME).is_file():
            return local / "adapter"  # a script's run folder: its adapter/ subfolder
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


def check_tensors(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source) -> None:
    """Every tensor of an adapter file is floating point and finite where a floating-point tensor is
    expected, an integer tensor where integers are (VB-LoRA's top-k indices); the error names the
    tensor and counts the bad values."""
    for key, tensor in state.items():
        if not expected[key].is_floating_point():
            if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
                raise ValueError(f"adapter at {source}: {key} is {tensor.dtype}; integers were expected")
            continue
        if not tensor.is_floating_point():
            raise ValueError(f"adapter at {source}: {key} is {tensor.dtype}, not floating point; an adapter's "
                             "tensors are float32/float16/bfloat16 — the file is corrupt or not an adapter")
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(f"adapter at {source}: {key} has {bad} non-finite values (NaN or inf) of "
                             f"{tensor.numel()}; refusing to load it (was the training run diverging?)")


def expected_file_tensors(model: nn.Module, config: AdapterConfig) -> dict[str, torch.Tensor]:
    """The tensors (on the meta device: shapes and dtypes, nothing allocated) an adapter file for
    ``config`` on ``model`` holds, so a file is checked against the model before any memory is spent."""
    targets = find_targets(model, config)
    adapter_cls = method_of(config).adapter
    state = {}
    with torch.device("meta"):
        shared = shared_arguments(adapter_cls, config, nn.Module(), "default")  # held by a throwaway module
        for holder in shared.values():
            holder.register()
        for layer_name, base in targets.items():
            adapter = adapter_cls(LayerShape(base, layer_name), config, base, **shared)
            state.update({f"{PREFIX}{layer_name}.{k}": t for k, t in adapter.peft_state_dict().items()})
            state.update(adapter.shared_state())
        for module_name, module in modules_to_save(model, config).items():
            original = getattr(module, "original_module", module)
            state.update({f"{PREFIX}{module_name}.{k}": torch.empty_like(t, device="meta")
                          for k, t in original.named_parameters()})
        return adapter_cls.to_file({k: t.detach() for k, t in state.items()}, config)


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default",
                 is_trainable: bool = True, prefix: str | None = None) -> nn.Module:
    """Add adapter ``name`` from a PEFT-layout directory and load its weights — or from a LyCORIS/kohya
    ``.safetensors`` file (``prefix`` picks this model's modules in it, see :mod:`boftvision.io.lycoris`).

    Everything is checked before anything is allocated or changed (the model is left as it was on any
    error): the name exists already; a tensor that is not floating point or not finite; a key for a
    module the model lacks; a tensor whose shape differs (module and both shapes named); a corrupt file.
    """
    if name in adapter_configs(model):
        raise ValueError(f"adapter {name!r} is already loaded; use another name= or remove_adapter first")
    if Path(path).is_file() and Path(path).suffix == ".safetensors":
        from .lycoris import load_lycoris

        return load_lycoris(model, path, prefix, name, is_trainable)
    config, state = read_adapter(path)
    return load_adapter_state(model, config, state, name, is_trainable, source=path)


def load_adapter_state(model: nn.Module, config: AdapterConfig, state: dict[str, torch.Tensor],
                       name: str = "default", is_trainable: bool = True, source="the given state") -> nn.Module:
    """:func:`load_adapter` from a config and tensors in the file's layout (PEFT keys) already in memory:
    the same checks, then the adapter is added and filled, or the model is left as it was."""
    if name in adapter_configs(model):
        raise ValueError(f"adapter {name!r} is already loaded; use another name= or remove_adapter first")
    path = source
    layout = expected_file_tensors(model, config)
    missing = sorted(set(layout) - set(state))
    unexpected = sorted(set(state) - set(layout))
    if unexpected or missing:
        raise ValueError(
            f"adapter at {path} does not fit this model: keys for modules it lacks "
            f"{unexpected[:5]}{' …' if len(unexpected) > 5 else ''}; missing keys {missing[:5]}. "
            "Was it trained on another architecture, or with other target_modules?")
    for key, tensor in state.items():
        if tensor.shape != layout[key].shape:
            module = key[len(PREFIX):] if key.startswith(PREFIX) else key
            raise ValueError(f"adapter at {path} does not fit this model: {module} has shape "
                             f"{tuple(tensor.shape)} in the file but {tuple(layout[key].shape)} here "
                             f"(made for another model or other {config.method} settings)")
    check_tensors(state, layout, path)
    state, inference_only = method_of(config).adapter.from_file(state, config)
    with all_or_nothing(model):  # any error below leaves the model exactly as it was
        add_adapter(model, config, name)
        own = adapter_state_dict(model, name)
        with torch.no_grad():
            for key, tensor in state.items():
                own[key].copy_(tensor.to(own[key].dtype))
    for _, layer in adapted_layers(model):
        adapter = layer.adapters[name] if name in layer.adapters else None
        if adapter is not None:
            adapter.inference_only = inference_only
            if not is_trainable or inference_only:
                adapter.requires_grad_(False)
    if not is_trainable or inference_only:
        for p in shared_parameters_of(model)[name].parameters() if name in shared_parameters_of(model) else []:
            p.requires_grad_(False)
    if not is_trainable:
        for _, wrapper in saved_module_wrappers(model):
            if name in wrapper.modules_to_save:
                wrapper.modules_to_save[name].requires_grad_(False)
    return model


def save_merged(model: nn.Module, path: str | os.PathLike) -> Path:
    """Merge the active adapter into the weights, drop the wrappers and save the plain model: with the
    model's own ``save_pretrained`` when it has one (transformers, diffusers — so their
    ``from_pretrained`` loads the result), else its state dict as ``model.safetensors``. A pipeline with
    adapted parts is exported by :func:`boftvision.integrations.diffusers.export_merged`."""
    model = merge_and_unload(model)
    if hasattr(model, "save_pretrained"):
        with atomic_folder(path) as tmp:
            model.save_pretrained(str(tmp))
        return Path(path)
    with atomic_folder(path, owns={"model.safetensors"}) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    return Path(path)
