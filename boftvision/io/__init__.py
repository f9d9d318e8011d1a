"""Adapter files, one module per format: PEFT directories (``peft``; ours and PEFT's), LyCORIS/kohya
files for ComfyUI, AUTOMATIC1111 and kohya (``lycoris``), and merged single-file Stable Diffusion
checkpoints (``single_file``). ``save_adapter``/``load_adapter`` pick the format."""
from __future__ import annotations

from . import lycoris, peft
from .peft import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    adapter_state_dict,
    check_tensors,
    expected_file_tensors,
    load_adapter,
    load_adapter_state,
    read_adapter,
    resolve_adapter_dir,
    save_adapter,
    save_merged,
)

__all__ = ["lycoris", "peft", "CONFIG_NAME", "PREFIX", "WEIGHTS_NAME", "adapter_state_dict", "check_tensors",
           "expected_file_tensors", "load_adapter", "load_adapter_state", "read_adapter", "resolve_adapter_dir",
           "save_adapter", "save_merged"]
