"""Adapter layers, one file per method, and the wrapper that holds them."""
from .base import AdaptedLayer, Adapter, LayerShape, ModulesToSaveWrapper
from .boft import BOFT
from .orthogonal import OrthogonalAdapter
from .lora import LoRA
from .oft import OFT
from .vblora import VBLoRA, new_vector_bank

ADAPTER_CLASSES = {"lora": LoRA, "vblora": VBLoRA, "oft": OFT, "boft": BOFT}

__all__ = ["AdaptedLayer", "Adapter", "LayerShape", "ModulesToSaveWrapper", "BOFT", "OFT", "LoRA", "VBLoRA", "OrthogonalAdapter",
           "new_vector_bank", "ADAPTER_CLASSES"]
