"""Language models from transformers: target presets per family, "all linear layers but the head",
and the task head kept trainable (saved with the adapter, PEFT's ``modules_to_save``)."""
from __future__ import annotations

from torch import nn

from ..adapters.base import is_supported
from ..config import AdapterConfig
from ..inject import add_adapter

_BERT_ATTENTION = ["query", "key", "value", "attention.output.dense"]
_BERT_MLP = ["intermediate.dense", "output.dense"]
_DEBERTA_ATTENTION = ["query_proj", "key_proj", "value_proj", "attention.output.dense"]
_DECODER_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
_DECODER_MLP = ["gate_proj", "up_proj", "down_proj"]

PRESETS: dict[str, dict[str, list[str]]] = {
    "bert": {"attention": _BERT_ATTENTION, "all_linear": _BERT_ATTENTION + _BERT_MLP},
    "roberta": {"attention": _BERT_ATTENTION, "all_linear": _BERT_ATTENTION + _BERT_MLP},
    "deberta-v2": {"attention": _DEBERTA_ATTENTION, "all_linear": _DEBERTA_ATTENTION + _BERT_MLP},
    "gpt2": {"attention": ["attn.c_attn", "attn.c_proj"], "all_linear": ["c_attn", "c_proj", "c_fc"]},
    **{family: {"attention": _DECODER_ATTENTION, "all_linear": _DECODER_ATTENTION + _DECODER_MLP}
       for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
}
HEADS = ["classifier", "score", "lm_head", "qa_outputs"]
SEQ_CLS_HEADS = ["classifier", "score"]


def target_modules(model: nn.Module, preset: str = "all_linear") -> list[str]:
    """Suffixes for ``model``'s family; ``preset="all_linear_but_head"`` lists every Linear/Conv1D of
    the model except its output heads (any family)."""
    if preset == "all_linear_but_head":
        return [name for name, module in model.named_modules()
                if is_supported(module) and name.split(".")[-1] not in HEADS]
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in PRESETS:
        raise ValueError(f"no target preset for model_type={family!r} (presets: {sorted(PRESETS)}); pass "
                         "target_modules yourself or use preset='all_linear_but_head'")
    return PRESETS[family][preset]


def add_task_adapter(model: nn.Module, config: AdapterConfig, preset: str = "all_linear",
                     heads: list[str] | None = None, name: str = "default") -> nn.Module:
    """Adapter on the encoder/decoder; the task head (``classifier``/``score`` by default) trainable and
    saved with it."""
    if config.target_modules is None:
        config.target_modules = target_modules(model, preset)
    if config.modules_to_save is None:
        config.modules_to_save = list(SEQ_CLS_HEADS if heads is None else heads)
    return add_adapter(model, config, name)
