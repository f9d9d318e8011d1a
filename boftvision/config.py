"""One validated dataclass per method; ``to_dict``/``from_dict`` speak PEFT's ``adapter_config.json``.

Field names are ours; each config maps them to PEFT's names (``PEFT_NAMES``) so a saved directory
loads in PEFT and a PEFT directory loads here. Unknown keys warn and are ignored; PEFT features we do
not implement (DoRA, rank patterns, COFT, block sharing, …) raise when they are switched on.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from .files import check_regex

TargetModules = Union[str, list[str], None]

# PEFT keys that describe bookkeeping, not the adapter: accepted silently.
_PEFT_BOOKKEEPING = {
    "peft_type", "peft_version", "auto_mapping", "base_model_name_or_path", "task_type",
    "inference_mode", "fan_in_fan_out",
}
# PEFT options every method shares that boftvision does not implement: the value that means "off"
_SHARED_UNSUPPORTED = {"bias": "none"}

# Upper bounds on sizes read from a config, checked before anything is allocated (far above any
# published setting; a file asking for more is refused, not obeyed)
LIMITS = {"r": 65536, "num_vectors": 2**20, "vector_length": 2**20, "topk": 2**20, "block_size": 2**16,
          "block_num": 2**24, "n_butterfly_factor": 32, "num_cayley_neumann_terms": 64}


ORIENTATIONS = ("input", "output")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(config, name: str, minimum: int) -> None:
    value = getattr(config, name)
    limit = LIMITS.get(name)
    _check(_is_int(value) and value >= minimum and (limit is None or value <= limit),
           f"{type(config).__name__}: {name} must be an int in [{minimum}, {limit}], got {value!r}"
           if limit else f"{type(config).__name__}: {name} must be an int ≥ {minimum}, got {value!r}")


def _check_float(config, name: str, low: float | None = None, high: float | None = None) -> None:
    """A number (not a bool or a string) in [low, high); either bound may be left open."""
    value = getattr(config, name)
    ok = _is_number(value) and (low is None or value >= low) and (high is None or value < high)
    where = "" if low is None and high is None else \
        f" ≥ {low:g}" if high is None else f" in [{low:g}, {high:g})"
    _check(ok, f"{type(config).__name__}: {name} must be a number{where}, got {value!r}")


def option(default, help: str):
    """A hyperparameter a training script exposes as ``--<method>_<name>`` (see
    :func:`boftvision.training.add_adapter_arguments`), with its help text."""
    return field(default=default, metadata={"help": help})


def _names_or_regex(value) -> bool:
    return value is None or isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(v, str) for v in value))


@dataclass
class AdapterConfig:
    """Fields every method shares. ``target_modules``: a list (exact names or dotted suffixes) or one
    regex string matched against full module names, as in PEFT; ``exclude_modules`` (same forms) are
    never adapted; ``layers_to_transform`` keeps only suffix matches whose layer index (the number after
    ``layers_pattern``, by default after any module name) is listed. ``modules_to_save``: names (or
    suffixes) of modules trained fully and saved in the adapter file: as in PEFT, each adapter trains its
    own copy and the original module is left untouched."""

    target_modules: TargetModules = None
    init_weights: bool = True
    base_model_name_or_path: str | None = None
    revision: str | None = None  # of the base model on the hub, when one was asked for
    modules_to_save: list[str] | None = None  # e.g. a task head: trained fully and saved with the adapter
    exclude_modules: TargetModules = None  # PEFT's: names/suffixes or a regex never adapted
    layers_to_transform: int | list[int] | None = None  # PEFT's: only these layer indices …
    layers_pattern: str | list[str] | None = None  # … found after this module name ("layers", "h", …)

    method: ClassVar[str] = ""
    peft_type: ClassVar[str] = ""
    PEFT_NAMES: ClassVar[dict[str, str]] = {}
    # PEFT fields we do not implement: value that means "off"
    PEFT_UNSUPPORTED: ClassVar[dict[str, Any]] = {}
    # method-specific PEFT keys with no effect on the adapter's math (accepted silently)
    PEFT_BOOKKEEPING: ClassVar[set[str]] = set()
    # defaults of the scripts' flags where they differ from the dataclass's (the published recipes)
    CLI_DEFAULTS: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        name = type(self).__name__
        for key in ("target_modules", "exclude_modules", "modules_to_save", "layers_pattern"):
            value = getattr(self, key)
            if isinstance(value, (set, tuple)):
                setattr(self, key, value := sorted(value))
            _check(_names_or_regex(value) and not (key == "modules_to_save" and isinstance(value, str)),
                   f"{name}: {key} must be a list of module names"
                   f"{'' if key == 'modules_to_save' else ' or a regex string'}, got {value!r}")
        for key in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, key), str):
                check_regex(getattr(self, key), f"{name}: {key}")
        patterns = self.layers_pattern
        for pattern in [patterns] if isinstance(patterns, str) else patterns or []:
            check_regex(pattern, f"{name}: layers_pattern")
        layers = self.layers_to_transform
        _check(layers is None or _is_int(layers) or (isinstance(layers, list) and all(_is_int(i) for i in layers)),
               f"{name}: layers_to_transform must be a layer index or a list of them, got {layers!r}")
        _check(isinstance(self.init_weights, bool), f"{name}: init_weights must be true or false, got "
                                                    f"{self.init_weights!r}")
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
        if out.get("orientation") == "input":
            del out["orientation"]  # the default; PEFT's configs have no such key
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
            elif key in cls.PEFT_UNSUPPORTED or key in _SHARED_UNSUPPORTED:
                supported = {**_SHARED_UNSUPPORTED, **cls.PEFT_UNSUPPORTED}[key]
                if value not in (supported, None) and value != {}:
                    raise ValueError(
                        f"{cls.__name__}: PEFT option {key}={value!r} is not supported by boftvision; "
                        f"re-train without it (supported value: {supported!r})"
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

    r: int = option(8, "rank r of the update B·A")
    alpha: float = option(8, "scale numerator: ΔW = (alpha/r)·B·A")
    dropout: float = option(0.0, "dropout on the LoRA branch's input")

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
        _check_int(self, "r", 1)
        _check_float(self, "alpha")
        _check_float(self, "dropout", 0.0, 1.0)


@dataclass
class VBLoRAConfig(AdapterConfig):
    """VB-LoRA: LoRA factors assembled from one shared bank of ``num_vectors`` vectors of length
    ``vector_length`` by a top-``topk`` softmax admixture per sub-vector (no alpha scaling, as PEFT).

    Defaults follow PEFT (``init_logits_std=0.1``); the paper's are r=4, k=2, b=256 and lr 1e-3 for the
    bank, 1e-2 for the logits (see :func:`boftvision.parameter_groups`).
    """

    r: int = option(4, "rank r of the assembled factors")
    num_vectors: int = option(256, "vectors in the shared bank (h)")
    vector_length: int = option(256, "length of each bank vector; divides every adapted width")
    topk: int = option(2, "bank vectors mixed per sub-vector (k)")
    dropout: float = option(0.0, "dropout on the branch's input")
    init_vector_bank_bound: float = option(0.02, "bank initialised uniform in ±bound")
    init_logits_std: float = option(0.1, "std of the initial mixture logits")
    save_only_topk_weights: bool = option(False, "save only the top-k indices and weights (inference-only file)")

    method: ClassVar[str] = "vblora"
    peft_type: ClassVar[str] = "VBLORA"
    PEFT_NAMES: ClassVar[dict[str, str]] = {"dropout": "vblora_dropout"}

    def validate(self) -> None:
        for name in ("r", "num_vectors", "vector_length", "topk"):
            _check_int(self, name, 1)
        _check(self.topk <= self.num_vectors,
               f"VBLoRAConfig: topk={self.topk} exceeds num_vectors={self.num_vectors}; use topk ≤ num_vectors "
               "(paper: 2)")
        _check_float(self, "dropout", 0.0, 1.0)
        _check_float(self, "init_vector_bank_bound", 0.0)
        _check_float(self, "init_logits_std", 0.0)
        _check(isinstance(self.save_only_topk_weights, bool),
               f"VBLoRAConfig: save_only_topk_weights must be true or false, got {self.save_only_topk_weights!r}")


@dataclass
class _BlockConfig(AdapterConfig):
    """Shared by OFT and BOFT: give exactly one of ``block_size`` (b) or ``block_num`` (N = d / b)."""

    block_size: int = option(0, "size b of each orthogonal block (divides every adapted width)")
    block_num: int = option(0, "number of blocks N per layer, instead of block_size (b = d/N)")
    # which side of W0 the rotation acts on: "input" (W0·Rᵀ: the papers, PEFT; the only one PEFT's
    # format holds) or "output" (R·W0: LyCORIS, as ComfyUI/AUTOMATIC1111/kohya load it); the scripts'
    # --orientation flag
    orientation: str = "input"

    def validate(self) -> None:
        name = type(self).__name__
        _check_int(self, "block_size", 0)
        _check_int(self, "block_num", 0)
        _check(self.orientation in ORIENTATIONS,
               f"{name}: orientation must be one of {ORIENTATIONS}, got {self.orientation!r}")
        _check((self.block_size > 0) != (self.block_num > 0),
               f"{name}: give exactly one of block_size or block_num (>0), got "
               f"block_size={self.block_size}, block_num={self.block_num}")


@dataclass
class OFTConfig(_BlockConfig):
    """OFT: block-diagonal orthogonal R from Cayley; PEFT ≥0.18 layout (upper-triangle parameters).

    ``use_cayley_neumann`` (PEFT's default) is a truncated series and not exactly orthogonal.
    ``dropout`` is BOFT's multiplicative dropout over blocks.
    """

    use_cayley_neumann: bool = option(True, "truncated Neumann series instead of the exact Cayley solve (PEFT's "
                                            "default; not exactly orthogonal)")
    num_cayley_neumann_terms: int = option(5, "terms of the Neumann series")
    dropout: float = option(0.0, "multiplicative dropout: a share of blocks set to the identity per step")

    method: ClassVar[str] = "oft"
    CLI_DEFAULTS: ClassVar[dict[str, Any]] = {"block_size": 16, "use_cayley_neumann": False, "dropout": 0.1}
    peft_type: ClassVar[str] = "OFT"
    PEFT_NAMES: ClassVar[dict[str, str]] = {
        "block_size": "oft_block_size", "block_num": "r", "dropout": "module_dropout",
    }
    PEFT_UNSUPPORTED: ClassVar[dict[str, Any]] = {"coft": False, "block_share": False, "eps": 6e-5}

    def validate(self) -> None:
        super().validate()
        _check_int(self, "num_cayley_neumann_terms", 1)
        _check(isinstance(self.use_cayley_neumann, bool),
               f"OFTConfig: use_cayley_neumann must be true or false, got {self.use_cayley_neumann!r}")
        _check_float(self, "dropout", 0.0, 1.0)


@dataclass
class BOFTConfig(_BlockConfig):
    """BOFT: R = product of ``n_butterfly_factor`` butterfly components of b×b Cayley blocks, plus a
    learnable output scale. ``dropout`` is the paper's multiplicative dropout."""

    n_butterfly_factor: int = option(1, "butterfly factors m (1 = OFT; 0 = the full butterfly, log2(N)+1 per "
                                        "layer, as LyCORIS builds it); b·2^(m−1) divides every adapted width")
    dropout: float = option(0.0, "multiplicative dropout: a share of blocks set to the identity per step")

    method: ClassVar[str] = "boft"
    CLI_DEFAULTS: ClassVar[dict[str, Any]] = {"block_size": 8, "n_butterfly_factor": 2, "dropout": 0.1}
    peft_type: ClassVar[str] = "BOFT"
    PEFT_NAMES: ClassVar[dict[str, str]] = {
        "block_size": "boft_block_size", "block_num": "boft_block_num",
        "n_butterfly_factor": "boft_n_butterfly_factor", "dropout": "boft_dropout",
    }

    def validate(self) -> None:
        super().validate()
        _check_int(self, "n_butterfly_factor", 0)
        _check_float(self, "dropout", 0.0, 1.0)
        if self.n_butterfly_factor != 1 and self.block_size:
            _check(self.block_size % 2 == 0,
                   f"BOFTConfig: block_size must be even when n_butterfly_factor ≠ 1, got {self.block_size}")
