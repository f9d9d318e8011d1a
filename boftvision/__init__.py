"""boftvision: LoRA, VB-LoRA, OFT and BOFT adapters for PyTorch models, PEFT-compatible."""
from .adapters import config_from_dict
from .config import BOFTConfig, LoRAConfig, OFTConfig, VBLoRAConfig
from .count import ParameterCount, count_parameters, print_trainable_parameters
from .inject import (
    add_adapter,
    disable_adapter,
    merge_adapter,
    merge_and_unload,
    parameter_groups,
    remove_adapter,
    set_adapter,
    unmerge_adapter,
)
from .interpolate import butterfly_interpolation, interpolated, num_butterfly_components
from .io import adapter_state_dict, load_adapter, load_adapter_state, save_adapter, save_merged

__version__ = "0.1.0"

__all__ = [
    "BOFTConfig", "LoRAConfig", "OFTConfig", "VBLoRAConfig", "config_from_dict",
    "ParameterCount", "count_parameters", "print_trainable_parameters",
    "add_adapter", "disable_adapter", "merge_adapter", "merge_and_unload", "parameter_groups",
    "remove_adapter", "set_adapter", "unmerge_adapter",
    "butterfly_interpolation", "interpolated", "num_butterfly_components",
    "adapter_state_dict", "load_adapter", "load_adapter_state", "save_adapter", "save_merged",
]
