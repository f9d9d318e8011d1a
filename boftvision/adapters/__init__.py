"""Adapter layers, one file per method, the wrappers that hold them, and the registry of methods.

The registry is the one list of methods: model surgery, io, counts, the scripts' flags and the tests
iterate it. A new method is one adapter file, one config class and one line in ``METHODS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import AdapterConfig, BOFTConfig, LoRAConfig, OFTConfig, VBLoRAConfig
from .base import AdaptedLayer, Adapter, LayerShape, ModulesToSaveWrapper
from .boft import BOFT
from .lora import LoRA
from .oft import OFT
from .orthogonal import OrthogonalAdapter
from .vblora import VBLoRA


@dataclass(frozen=True)
class Method:
    name: str  # what configs call ``method`` and scripts take as ``--adapter``
    config: type[AdapterConfig]
    adapter: type[Adapter]
    cli_prefix: str  # the scripts' flags are --<cli_prefix>_<config field>


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("boft", BOFTConfig, BOFT, "boft"),
    Method("oft", OFTConfig, OFT, "oft"),
    Method("lora", LoRAConfig, LoRA, "lora"),
    Method("vblora", VBLoRAConfig, VBLoRA, "vblora"),
]}


def method_of(config: AdapterConfig) -> Method:
    return METHODS[config.method]


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Build the right config from a PEFT/boftvision ``adapter_config.json`` dict."""
    peft_type = data.get("peft_type", "")
    peft_type = str(getattr(peft_type, "value", peft_type)).upper()  # PEFT's enum or its JSON string
    by_type = {m.config.peft_type: m.config for m in METHODS.values()}
    if peft_type not in by_type:
        raise ValueError(f"adapter config has peft_type={data.get('peft_type')!r}; boftvision reads {sorted(by_type)}")
    return by_type[peft_type].from_dict(data)


__all__ = ["AdaptedLayer", "Adapter", "LayerShape", "ModulesToSaveWrapper", "BOFT", "OFT", "LoRA", "VBLoRA",
           "OrthogonalAdapter", "Method", "METHODS", "method_of", "config_from_dict"]
