"""DINOv2 backbones (transformers or timm) with a linear head on the class token, and target presets.

The BOFT paper's VTAB setting adapts every linear layer of attention and MLP; the head is trained fully
and not counted in the adapter's parameters.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import AdapterConfig
from ..files import check_model_location
from ..inject import add_adapter

# transformers ≥5 names (q_proj/k_proj/v_proj/o_proj), transformers 4.x names (attention.attention.query,
# …, attention.output.dense), timm names (attn.qkv, attn.proj): presets list all, a model matches its own.
ATTENTION_TARGETS = ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                     "attention.attention.query", "attention.attention.key", "attention.attention.value",
                     "attention.output.dense", "attn.qkv", "attn.proj"]
MLP_TARGETS = ["mlp.fc1", "mlp.fc2", "mlp.weights_in", "mlp.weights_out"]
PRESETS = {"attention": ATTENTION_TARGETS, "all_linear": ATTENTION_TARGETS + MLP_TARGETS}

# Published architecture sizes (hidden, layers, heads, SwiGLU FFN)
SIZES = {"small": (384, 12, 6, False), "base": (768, 12, 12, False), "large": (1024, 24, 16, False),
         "giant": (1536, 40, 24, True)}


def dinov2_config(size: str = "large", **overrides):
    """A transformers ``Dinov2Config`` for a published size (no download)."""
    from transformers import Dinov2Config

    hidden, layers, heads, swiglu = SIZES[size]
    kwargs = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  use_swiglu_ffn=swiglu, image_size=518, patch_size=14)
    kwargs.update(overrides)
    return Dinov2Config(**kwargs)


def load_backbone(name_or_path: str, source: str = "transformers", checkpoint: str | None = None,
                  image_size: int = 224, timm_kwargs: dict | None = None) -> nn.Module:
    """transformers: a hub id (``facebook/dinov2-large``) or local folder. timm: a model name
    (``vit_large_patch14_dinov2.lvd142m``) built for ``image_size``, its pretrained weights from the hub,
    or — as users load it offline — ``pretrained=False`` plus a local ``checkpoint`` file (safetensors
    or a weights-only torch file); ``timm_kwargs`` override the architecture (``embed_dim``, ``depth``, …)."""
    if source == "transformers":
        from transformers import Dinov2Model

        return Dinov2Model.from_pretrained(check_model_location(name_or_path, "DINOv2 backbone"))
    if source == "timm":
        import timm

        return timm.create_model(name_or_path, pretrained=checkpoint is None, num_classes=0, img_size=image_size,
                                 **(timm_kwargs or {}), **({"checkpoint_path": checkpoint} if checkpoint else {}))
    raise ValueError(f"unknown backbone source {source!r}; use 'transformers' or 'timm'")


class Dinov2Classifier(nn.Module):
    """Backbone → class token (after the final layer norm) → linear head."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        hidden = getattr(getattr(backbone, "config", None), "hidden_size", None) or backbone.num_features
        self.head = nn.Linear(hidden, num_classes)
        nn.init.zeros_(self.head.bias)
        nn.init.trunc_normal_(self.head.weight, std=0.02)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if hasattr(self.backbone, "forward_features"):  # timm
            return self.backbone.forward_head(self.backbone.forward_features(pixel_values), pre_logits=True)
        return self.backbone(pixel_values=pixel_values).pooler_output  # layer-normed class token

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixel_values))


def add_classifier_adapter(model: Dinov2Classifier, config: AdapterConfig, name: str = "default") -> Dinov2Classifier:
    """Adapter on the backbone (targets from ``config``, or the ``all_linear`` preset); head trainable."""
    if config.target_modules is None:
        config.target_modules = PRESETS["all_linear"]
    add_adapter(model.backbone, config, name)
    model.head.requires_grad_(True)
    return model
