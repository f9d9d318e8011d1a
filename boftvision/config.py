"""One validated dataclass per method; ``to_dict``/``from_dict`` speak PEFT's ``adapter_config.json``.

Field names are ours; each config maps them to PEFT's names (``PEFT_NAMES``) so a saved directory
loads in PEFT and a PEFT directory loads here. Unknown keys warn and are ignored; PEFT features we do
not implement (DoRA, rank patterns, COFT, block sharing, …) raise when they are switched on.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Union

TargetModules = Union[str, list[str], None]

# PEFT keys that describe bookkeeping, not the adapter: accepted silently.
_PEFT_BOOKKEEPING = {
    "peft_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision", "task_type",
    "inference_mode", "fan_in_fan_out", "bias", "layers_to_transform",
    "layers_pattern", "exclude_modules",
}


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class AdapterConfig:
    """Fields every method shares. ``target_modules``: a list (exact names or dotted suffixes) or one
    regex string matched against full module names, as in PEFT. ``modules_to_save``: names (or suffixes)
    of modules trained fully and saved in the adapter file (PEFT's convention; unlike PEFT they are
    trained in place, not copied per adapter name)."""

    target_modules: TargetModules = None
    init_weights: bool = True
    base_model_name_or_path: str | None = None
    modules_to_save: list[str] | None = None  # e.g. a task head: trained fully and saved with the adapter

    method: ClassVar[str] = ""
    peft_type: ClassVar[str] = ""
    PEFT_NAMES: ClassVar[dict[str, str]] = {}
    # PEFT fields we do not implement: value that means "off"
    PEFT_UNSUPPORTED: ClassVar[dict[str, Any]] = {}
    # method-specific PEFT keys with no effect on the adapter's math (accepted silently)
    PEFT_BOOKKEEPING: ClassVar[set[str]] = set()

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        _check(
            self.target_modules is None or isinstance(self.target_modules, (str, list)),
            f"target_modules must be a list of names or a regex string, got {self.target_modules!r}",
        )
        self.validate()

    def validate(self) -> None:  # overridden per method
        pass

    def to_dict(self) -> dict[str, Any]:
        """PEFT-format dict (``adapter_config.json``)."""
        out: dict[str, Any] = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            key = self.PEFT_NAMES.get(f.name, f.name)
            out[key] = getattr(self, f.name)
        out.update({k: v for k, v in self.PEFT_UNSUPPORTED.items() if k not in out})
        out.setdefault("bias", "none")
        out.setdefault("fan_in_fan_out", False)
        out.setdefault("inference_mode", True)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        """Accepts our field names or PEFT's; warns on unknown keys; refuses unsupported features."""
        ours = {f.name for f in dataclasses.fields(cls)}
        peft_to_ours = {v: k for k, v in cls.PEFT_NAMES.items()}
        kwargs, unknown = {}, []
        for key, value in data.items():
            name = peft_to_ours.get(key, key)
            if name in ours:
                kwargs[name] = value
            elif key in cls.PEFT_UNSUPPORTED:
                if value not in (cls.PEFT_UNSUPPORTED[key], None) and value != {}:
                    raise ValueError(
                        f"{cls.__name__}: PEFT option {key}={value!r} is not supported by boftvision; "
                        f"re-train without it (supported value: {cls.PEFT_UNSUPPORTED[key]!r})"
                    )
            elif key not in _PEFT_BOOKKEEPING | cls.PEFT_BOOKKEEPING and key != "method" \
                    and value not in (None, False, {}, []):
                unknown.append(key)  # PEFT options left off (None/False/empty) need no warning
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring unknown config keys {sorted(unknown)}", stacklevel=2)
        init = kwargs.get("init_weights")
        if isinstance(init, str):
            if init.lower() != "gaussian":  # PiSSA/OLoRA/LoftQ/... also rewrite the base weights
                raise ValueError(f"{cls.__name__}: PEFT initialisation {init!r} changes the base model's "
                                 "weights and is not supported; use an adapter trained with the default init")
            kwargs["init_weights"] = True
        return cls(**kwargs)


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA: ``W = W0 + (alpha/r)·B A``; B zero-initialised (identity at start)."""

    r: int = 8
    alpha: float = 8
    dropout: float = 0.0

    method: ClassVar[str] = "lora"
    peft_type: ClassVar[str] = "LORA"
    PEFT_NAMES: ClassVar[dict[str, str]] = {
        "alpha": "lora_alpha", "dropout": "lora_dropout", "init_weights": "init_lora_weights",
    }
    PEFT_UNSUPPORTED: ClassVar[dict[str, Any]] = {
        "use_dora": False, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
        "lora_bias": False, "layer_replication": None, "target_parameters": None,
        "trainable_token_indices": None,
    }
    PEFT_BOOKKEEPING: ClassVar[set[str]] = {"qalora_group_size", "megatron_core"}

    def validate(self) -> None:
        _check(isinstance(self.r, int) and self.r > 0, f"LoRAConfig: r must be a positive int, got {self.r!r}")
        _check(0.0 <= self.dropout < 1.0, f"LoRAConfig: dropout must be in [0, 1), got {self.dropout}")


@dataclass
class VBLoRAConfig(AdapterConfig):
    """VB-LoRA: LoRA factors assembled from one shared bank of ``num_vectors`` vectors of length
    ``vector_length`` by a top-``topk`` softmax admixture per sub-vector (no alpha scaling, as PEFT).

    Defaults follow PEFT (``init_logits_std=0.1``); the paper's are r=4, k=2, b=256 and lr 1e-3 for the
    bank, 1e-2 for the logits (see :func:`boftvision.parameter_groups`).
    """

    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    dropout: float = 0.0
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    save_only_topk_weights: bool = False

    method: ClassVar[str] = "vblora"
    peft_type: ClassVar[str] = "VBLORA"
    PEFT_NAMES: ClassVar[dict[str, str]] = {"dropout": "vblora_dropout"}

    def validate(self) -> None:
        for name in ("r", "num_vectors", "vector_length", "topk"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0, f"VBLoRAConfig: {name} must be a positive int, got {value!r}")
        _check(self.topk <= self.num_vectors,
               f"VBLoRAConfig: topk={self.topk} exceeds num_vectors={self.num_vectors}; use topk ≤ num_vectors (paper: 2)")
        _check(0.0 <= self.dropout < 1.0, f"VBLoRAConfig: dropout must be in [0, 1), got {self.dropout}")


@dataclass
class _BlockConfig(AdapterConfig):
    """Shared by OFT and BOFT: give exactly one of ``block_size`` (b) or ``block_num`` (N = d / b)."""

    block_size: int = 0
    block_num: int = 0

    def validate(self) -> None:
        name = type(self).__name__
        _check((self.block_size > 0) != (self.block_num > 0),
               f"{name}: give exactly one of block_size or block_num (>0), got "
               f"block_size={self.block_size}, block_num={self.block_num}")

    def block_size_for(self, width: int) -> int:
        if self.block_size:
            return self.block_size
        if width % self.block_num:
            raise ValueError(f"block_num {self.block_num} does not divide width {width}")
        return width // self.block_num


@dataclass
class OFTConfig(_BlockConfig):
    """OFT: block-diagonal orthogonal R from Cayley; PEFT ≥0.18 layout (upper-triangle parameters).

    ``use_cayley_neumann`` (PEFT's default) is a truncated series and not exactly orthogonal.
    ``dropout`` is BOFT's multiplicative dropout over blocks.
    """

    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    dropout: float = 0.0

    method: ClassVar[str] = "oft"
    peft_type: ClassVar[str] = "OFT"
    PEFT_NAMES: ClassVar[dict[str, str]] = {
        "block_size": "oft_block_size", "block_num": "r", "dropout": "module_dropout",
    }
    PEFT_UNSUPPORTED: ClassVar[dict[str, Any]] = {"coft": False, "block_share": False, "eps": 6e-5}

    def validate(self) -> None:
        super().validate()
        _check(self.num_cayley_neumann_terms >= 1,
               f"OFTConfig: num_cayley_neumann_terms must be ≥ 1, got {self.num_cayley_neumann_terms}")
        _check(0.0 <= self.dropout < 1.0, f"OFTConfig: dropout must be in [0, 1), got {self.dropout}")


@dataclass
class BOFTConfig(_BlockConfig):
    """BOFT: R = product of ``n_butterfly_factor`` butterfly components of b×b Cayley blocks, plus a
    learnable output scale. ``dropout`` is the paper's multiplicative dropout."""

    n_butterfly_factor: int = 1
    dropout: float = 0.0

    method: ClassVar[str] = "boft"
    peft_type: ClassVar[str] = "BOFT"
    PEFT_NAMES: ClassVar[dict[str, str]] = {
        "block_size": "boft_block_size", "block_num": "boft_block_num",
        "n_butterfly_factor": "boft_n_butterfly_factor", "dropout": "boft_dropout",
    }

    def validate(self) -> None:
        super().validate()
        _check(isinstance(self.n_butterfly_factor, int) and self.n_butterfly_factor >= 1,
               f"BOFTConfig: n_butterfly_factor must be an int ≥ 1 (1 = OFT), got {self.n_butterfly_factor!r}")
        _check(0.0 <= self.dropout < 1.0, f"BOFTConfig: dropout must be in [0, 1), got {self.dropout}")
        if self.n_butterfly_factor > 1 and self.block_size:
            _check(self.block_size % 2 == 0,
                   f"BOFTConfig: block_size must be even when n_butterfly_factor > 1, got {self.block_size}")


CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {
    c.peft_type: c for c in (LoRAConfig, VBLoRAConfig, OFTConfig, BOFTConfig)
}


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Build the right config from a PEFT/boftvision ``adapter_config.json`` dict."""
    peft_type = data.get("peft_type", "")
    peft_type = str(getattr(peft_type, "value", peft_type)).upper()  # PEFT's enum or its JSON string
    if peft_type not in CONFIG_CLASSES:
        raise ValueError(
            f"adapter config has peft_type={data.get('peft_type')!r}; boftvision reads "
            f"{sorted(CONFIG_CLASSES)}"
        )
    return CONFIG_CLASSES[peft_type].from_dict(data)
