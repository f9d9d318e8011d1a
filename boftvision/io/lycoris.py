"""LyCORIS / kohya files: the one ``.safetensors`` that ComfyUI, AUTOMATIC1111/Forge and kohya's
sd-scripts load for LoRA, OFT and BOFT alike.

Keys are ``<prefix>_<module path, dots as underscores>.<tensor>`` with the prefix ``lora_unet`` (a
UNet), ``lora_te`` (a text encoder; ``lora_te1``/``lora_te2`` for SDXL's two). Per module:

- LoRA / LoCon: ``lora_down.weight`` (r, d[, kh, kw]), ``lora_up.weight`` (n, r[, 1, 1]), ``alpha``;
  ΔW = (alpha/r)·up·down — PEFT's ``lora_A``/``lora_B`` under other names.
- diag-OFT: ``oft_blocks`` (N, b, b); BOFT: ``oft_blocks`` (m, N, b, b); optional ``rescale`` (n, 1, …);
  ``alpha``: a bound on the Frobenius norm of the skew part (0 = none), times the output width.
  LyCORIS rotates the **output** channels, ``W' = rescale ⊙ (R W)``, with Q = blocks − blocksᵀ and
  r = (I + Q)(I − Q)⁻¹. diag-OFT applies rᵀ per block; BOFT applies stage 0 first, stage i mixing the
  rows of segments of 2^i·b, each block in an interleaved order (the two halves it joins alternate).

Our output-oriented OFT/BOFT (``orientation="output"``) compute exactly these functions; the tensors are
converted in closed form (a sign, a factor and a fixed within-block permutation), so a file round-trips
to the same outputs. lycoris-lora itself builds BOFT only as the full butterfly (m = log2(N) + 1) and
diag-OFT only with b ≤ N; a BOFT with fewer stages is written as the full one with identity (zero)
blocks in the stages it lacks.
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import BOFTConfig, LoRAConfig, OFTConfig
from ..files import atomic_file
from ..inject import adapted_layers, adapter_configs
from ..ops.orthogonal import skew_from_square, skew_from_upper, upper_from_skew
from .peft import PREFIX, check_tensors, load_adapter_state, refuse_nonfinite

PREFIXES = ("lora_unet", "lora_te", "lora_te1", "lora_te2")
LORA_KEYS = {"lora_down.weight", "lora_up.weight", "alpha"}
OFT_KEYS = {"oft_blocks", "rescale", "alpha"}
# per-module keys of the LyCORIS algorithms boftvision has no adapter for (refused by name)
OTHER_ALGORITHMS = {"hada_w1_a": "LoHa", "lokr_w1": "LoKr", "lokr_w1_a": "LoKr", "a1.weight": "GLoRA",
                    "diff": "full fine-tuning (diff)", "on_input": "(IA)³", "lora_mid.weight": "LoCon with CP/Tucker",
                    "dora_scale": "DoRA", "weight": "(IA)³"}


def module_key(prefix: str, module_name: str) -> str:
    """kohya's module name: ``lora_unet_down_blocks_0_attentions_0_proj_in``."""
    return f"{prefix}_{module_name}".replace(".", "_")


def lycoris_order(block_size: int) -> torch.Tensor:
    """For each position a of our (PEFT's) block layout, the position LyCORIS gives that channel.

    Ours puts the two b/2-wide halves a block joins one after the other (a = g·b/2 + t); LyCORIS
    interleaves them (2t + g). ``ours[a, c] = theirs[order[a], order[c]]``."""
    half = block_size // 2
    a = torch.arange(block_size)
    return 2 * (a % half) + a // half


# --- tensors: ours ↔ LyCORIS (pure functions) ---------------------------------------------------------

def boft_to_lycoris(boft_R: torch.Tensor) -> torch.Tensor:
    """Output-oriented BOFT ``boft_R`` (m, N, b, b) → LyCORIS ``oft_blocks`` of the same rotation.

    Our block is cayley(S̃) = (I − S̃)(I + S̃)⁻¹ with S̃ = (S − Sᵀ)/2 in our layout; LyCORIS's is
    (I + Q)(I − Q)⁻¹ with Q = L − Lᵀ in its layout, so Q = −S̃ permuted, and L = Q/2."""
    order = torch.argsort(lycoris_order(boft_R.shape[-1]))  # their position → ours
    skew = skew_from_square(boft_R.float())
    return -0.5 * skew[..., order, :][..., :, order]


def lycoris_to_boft(oft_blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`boft_to_lycoris`: LyCORIS BOFT ``oft_blocks`` → our ``boft_R`` (skew blocks)."""
    order = lycoris_order(oft_blocks.shape[-1])
    q = oft_blocks.float() - oft_blocks.float().transpose(-1, -2)
    return -q[..., order, :][..., :, order]


def oft_to_lycoris(oft_R: torch.Tensor, block_size: int) -> torch.Tensor:
    """Output-oriented OFT (exact Cayley) ``oft_R`` (N, b(b−1)/2) → LyCORIS diag-OFT ``oft_blocks``.

    LyCORIS applies rᵀ = (I − Q)(I + Q)⁻¹ per block — our Cayley of the same Q — so the blocks are our
    skew blocks' strict upper triangle (L − Lᵀ = Q)."""
    return torch.triu(skew_from_upper(oft_R.float(), block_size), diagonal=1)


def lycoris_to_oft(oft_blocks: torch.Tensor) -> torch.Tensor:
    """LyCORIS diag-OFT ``oft_blocks`` (N, b, b) → our OFT ``oft_R`` (N, b(b−1)/2)."""
    return upper_from_skew(oft_blocks.float() - oft_blocks.float().transpose(-1, -2))


def diag_oft_to_boft(oft_blocks: torch.Tensor) -> torch.Tensor:
    """LyCORIS diag-OFT blocks → our one-factor BOFT ``boft_R`` (1, N, b, b) of the same rotation (used
    when the file has a ``rescale``, which our OFT lacks): our BOFT block cayley(S) = rᵀ for S = Q."""
    return (oft_blocks.float() - oft_blocks.float().transpose(-1, -2)).unsqueeze(0)


def apply_constraint(oft_blocks: torch.Tensor, alpha: float, width: int) -> torch.Tensor:
    """LyCORIS's norm bound: when ‖Q‖_F (all blocks) exceeds alpha·width, Q is scaled down to it; done
    once here (Q is linear in the blocks), so the loaded adapter computes what LyCORIS computes."""
    if alpha <= 0:
        return oft_blocks
    bound = alpha * width
    norm = torch.linalg.vector_norm(oft_blocks.float() - oft_blocks.float().transpose(-1, -2)) + 1e-8
    return oft_blocks.float() * (bound / norm) if norm > bound else oft_blocks.float()


# --- out ---------------------------------------------------------------------------------------------

def lycoris_state(model: nn.Module, prefix: str, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter ``name`` of ``model`` as LyCORIS tensors (fp32, CPU) under kohya names.

    LoRA as lora_down/up/alpha; VB-LoRA as the LoRA its bank assembles (alpha = r, scale 1); OFT/BOFT
    only with ``orientation="output"`` (LyCORIS's side; OFT also with the exact Cayley transform)."""
    if prefix not in PREFIXES:
        raise ValueError(f"prefix {prefix!r}: LyCORIS files use {PREFIXES} (lora_unet for a UNet, lora_te for a "
                         "text encoder)")
    if name not in adapter_configs(model):
        raise ValueError(f"no adapter named {name!r}; this model has {sorted(adapter_configs(model))}")
    config = adapter_configs(model)[name]
    if config.method in ("oft", "boft") and config.orientation != "output":
        raise ValueError(f"{config.method.upper()} here rotates the input side (orientation='input', PEFT's), but "
                         "LyCORIS files rotate the output side: train with orientation='output' (--orientation "
                         "output) to export it this way, or export a merged single-file checkpoint "
                         "(--save_single_file), which every tool loads")
    if config.method == "oft" and config.use_cayley_neumann:
        raise ValueError("this OFT uses the Neumann series (use_cayley_neumann=True); LyCORIS computes the exact "
                         "Cayley transform, so only an OFT trained with use_cayley_neumann=False exports exactly")
    state = {}
    for layer_name, layer in adapted_layers(model):
        if name not in layer.adapters:
            continue
        adapter, key = layer.adapters[name], module_key(prefix, layer_name)
        with torch.no_grad():
            state.update({f"{key}.{k}": v.detach().float().cpu().contiguous()
                          for k, v in module_tensors(adapter).items()})
    return state


def module_tensors(adapter) -> dict[str, torch.Tensor]:
    """One adapted layer's LyCORIS tensors (names without the module key)."""
    method, shape = adapter.config.method, adapter.shape
    kernel = (1,) * len(shape.kernel_size)  # lora_up / rescale: (n, r, 1, 1) / (n, 1, 1, 1) for convs
    if method == "lora":
        return {"lora_down.weight": adapter.lora_A.weight, "lora_up.weight": adapter.lora_B.weight,
                "alpha": torch.tensor(float(adapter.config.alpha))}
    if method == "vblora":
        a, b = adapter.factors()
        r = a.shape[0]
        down = a.reshape(r, shape.in_features, *shape.kernel_size) if shape.is_conv else a
        return {"lora_down.weight": down, "lora_up.weight": b.reshape(shape.n, r, *kernel),
                "alpha": torch.tensor(float(r))}
    if method == "oft":
        return {"oft_blocks": oft_to_lycoris(adapter.oft_R, adapter.block_size), "alpha": torch.tensor(0.0)}
    blocks = boft_to_lycoris(adapter.boft_R)
    m, n = blocks.shape[:2]
    full = n.bit_length() if n & (n - 1) == 0 else m  # lycoris-lora reads the full butterfly only
    if full > m:
        blocks = torch.cat([blocks, blocks.new_zeros(full - m, *blocks.shape[1:])])
    return {"oft_blocks": blocks, "rescale": adapter.boft_s.reshape(shape.n, 1, *kernel),
            "alpha": torch.tensor(0.0)}


def save_lycoris(parts: dict[str, nn.Module], path: str | os.PathLike, name: str = "default",
                 allow_nonfinite: bool = False) -> Path:
    """Write one LyCORIS ``.safetensors`` holding the adapters of several models by prefix
    (``{"lora_unet": unet, "lora_te": text_encoder}``), whole or not at all."""
    state = {}
    for prefix, model in parts.items():
        state.update(lycoris_state(model, prefix, name))
    if not allow_nonfinite:
        refuse_nonfinite(state, name)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a LyCORIS file is one .safetensors file; got {str(path)!r}")
    with atomic_file(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "ss_network_module": "lycoris.kohya"})
    return path


# --- in ----------------------------------------------------------------------------------------------

def read_lycoris(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err


def file_prefixes(state: dict[str, torch.Tensor]) -> set[str]:
    """The kohya prefixes the tensors' names start with (``lora_te_`` and ``lora_te1_`` differ)."""
    return {p for key in state for p in PREFIXES if key.startswith(p + "_")}


def is_lycoris_state(state: dict[str, torch.Tensor]) -> bool:
    """Whether every tensor is named as kohya/LyCORIS name modules."""
    return bool(state) and all(any(key.startswith(p + "_") for p in PREFIXES) for key in state)


def split_modules(state: dict[str, torch.Tensor], prefix: str) -> dict[str, dict[str, torch.Tensor]]:
    """{module key: {tensor name: tensor}} for the modules under ``prefix``."""
    modules = defaultdict(dict)
    for key, tensor in state.items():
        module, _, tensor_name = key.partition(".")
        if module.startswith(prefix + "_"):
            modules[module][tensor_name] = tensor
    return dict(modules)


def algorithm(module: str, tensors: dict[str, torch.Tensor], source) -> str:
    """lora | diag-oft | boft for one module's tensors; anything else is refused by name."""
    for key in tensors:
        if key in OTHER_ALGORITHMS or key.split(".")[0] in OTHER_ALGORITHMS:
            kind = OTHER_ALGORITHMS.get(key, OTHER_ALGORITHMS.get(key.split(".")[0]))
            raise ValueError(f"{source}: {module} is {kind} ({key}); boftvision reads LoRA/LoCon, diag-OFT and "
                             "BOFT from LyCORIS files — merge the others with LyCORIS or ComfyUI")
    keys = set(tensors)
    if "lora_down.weight" in keys or "lora_up.weight" in keys:
        algo, allowed, needed = "lora", LORA_KEYS, {"lora_down.weight", "lora_up.weight"}
    elif "oft_blocks" in keys:
        algo = "boft" if tensors["oft_blocks"].dim() == 4 else "diag-oft"
        allowed, needed = OFT_KEYS, {"oft_blocks"}
    else:
        raise ValueError(f"{source}: {module} has tensors {sorted(keys)}, none of a LoRA (lora_down/lora_up) or an "
                         "OFT/BOFT (oft_blocks)")
    if keys - allowed or needed - keys:
        raise ValueError(f"{source}: {module} ({algo}) has unknown tensors {sorted(keys - allowed)} and lacks "
                         f"{sorted(needed - keys)}; expected {sorted(allowed)}")
    return algo


def lycoris_adapter(model: nn.Module, modules: dict[str, dict[str, torch.Tensor]], prefix: str, source):
    """The config and PEFT-keyed tensors of the adapter these LyCORIS modules describe on ``model``."""
    from ..adapters.base import LayerShape

    names = {module_key(prefix, n): n for n, _ in model.named_modules() if n}
    matched = {names[k]: t for k, t in modules.items() if k in names}
    if len(matched) < len(modules):
        lost = sorted(set(modules) - set(names))
        raise ValueError(f"{source}: {len(matched)} of {len(modules)} {prefix} modules match this model's modules "
                         f"(file: {lost[0]!r}; model: {module_key(prefix, next(iter(names)))!r} …); was it made "
                         "for another model, or does it need another prefix (lora_unet / lora_te)?")
    algos = {algorithm(n, t, source) for n, t in modules.items()}
    if len(algos) > 1:
        raise ValueError(f"{source}: {prefix} mixes {sorted(algos)} modules; boftvision's adapter is one method — "
                         "load each kind separately")
    algo = algos.pop()
    shapes = {n: LayerShape(model.get_submodule(n), n) for n in matched}
    targets = sorted(matched)
    state = {}
    if algo == "lora":
        ranks = {n: t["lora_down.weight"].shape[0] for n, t in matched.items()}
        if len(set(ranks.values())) > 1:
            raise ValueError(f"{source}: {prefix} LoRA ranks differ between modules ({sorted(set(ranks.values()))}, "
                             "e.g. LoCon's conv_dim); boftvision's LoRAConfig has one rank per adapter — load "
                             "it in ComfyUI/AUTOMATIC1111, or merge it there first")
        r = next(iter(ranks.values()))
        for n, t in matched.items():
            alpha = float(t["alpha"]) if "alpha" in t else float(r)
            state[f"{PREFIX}{n}.lora_A.weight"] = t["lora_down.weight"]
            state[f"{PREFIX}{n}.lora_B.weight"] = t["lora_up.weight"].float() * (alpha / r)
        return LoRAConfig(r=r, alpha=float(r), target_modules=targets), state
    sizes = {t["oft_blocks"].shape[-1] for t in matched.values()}
    if len(sizes) > 1:
        raise ValueError(f"{source}: {prefix} block sizes differ between modules ({sorted(sizes)}); boftvision's "
                         "OFT/BOFT has one block size per adapter")
    b = sizes.pop()
    for n, t in matched.items():
        blocks, width = t["oft_blocks"], shapes[n].n
        if blocks.shape[-3] * b != width:
            raise ValueError(f"{source}: {n} has {blocks.shape[-3]} blocks of {b} in the file, but this layer has "
                             f"{width} output channels (made for another model?)")
        t["oft_blocks"] = apply_constraint(blocks, float(t.get("alpha", torch.tensor(0.0))), width)
    rescaled = any("rescale" in t for t in matched.values())
    if algo == "diag-oft" and not rescaled:
        for n, t in matched.items():
            state[f"{PREFIX}{n}.oft_R.weight"] = lycoris_to_oft(t["oft_blocks"])
        return OFTConfig(block_size=b, use_cayley_neumann=False, orientation="output", target_modules=targets), state
    factors = set()
    for n, t in matched.items():
        boft_R = diag_oft_to_boft(t["oft_blocks"]) if algo == "diag-oft" else lycoris_to_boft(t["oft_blocks"])
        factors.add(boft_R.shape[0])
        state[f"{PREFIX}{n}.boft_R"] = boft_R
        scale = t.get("rescale", torch.ones(shapes[n].n)).float().reshape(-1)
        state[f"{PREFIX}{n}.boft_s"] = scale.reshape(1, -1) if shapes[n].is_conv else scale.reshape(-1, 1)
    full = all(state[f"{PREFIX}{n}.boft_R"].shape[0] == (shapes[n].n // b).bit_length() for n in matched)
    if len(factors) > 1 and not full:
        raise ValueError(f"{source}: {prefix} BOFT stages differ between modules ({sorted(factors)}) and are not each "
                         "layer's full butterfly; boftvision's BOFT has one m per adapter")
    m = 0 if len(factors) > 1 else factors.pop()
    return BOFTConfig(block_size=b, n_butterfly_factor=m, orientation="output", target_modules=targets), state


def load_lycoris(model: nn.Module, path_or_state, prefix: str | None = None, name: str = "default",
                 is_trainable: bool = True, source=None) -> nn.Module:
    """Add adapter ``name`` to ``model`` from a LyCORIS/kohya file (or its tensors): LoRA/LoCon as LoRA,
    diag-OFT as output-oriented OFT (or one-factor BOFT when it has ``rescale``), BOFT as output-oriented
    BOFT. ``prefix`` picks the model's modules in the file (``lora_unet``, ``lora_te``, …; may be left out
    when the file has one). Checked whole before the model changes; a nonzero ``alpha`` (LyCORIS's norm
    bound) is applied to the loaded blocks once — further training is not bounded by it."""
    if isinstance(path_or_state, dict):
        state, source = path_or_state, source or "the given LyCORIS state"
    else:
        state, source = read_lycoris(path_or_state), source or path_or_state
    present = file_prefixes(state)
    if prefix is None:
        if len(present) != 1:
            raise ValueError(f"{source} holds modules for {sorted(present) or 'no known prefix'}; pass prefix= "
                             f"(one of {PREFIXES}) to say which belong to this model")
        prefix = present.pop()
    modules = split_modules(state, prefix)
    if not modules:
        raise ValueError(f"{source} has no {prefix} modules (it has {sorted(present) or 'no kohya-named keys'})")
    check_tensors({f"{k}.{t}": v for k, d in modules.items() for t, v in d.items()},
                  {f"{k}.{t}": v for k, d in modules.items() for t, v in d.items()}, source)
    config, tensors = lycoris_adapter(model, {k: dict(v) for k, v in modules.items()}, prefix, source)
    return load_adapter_state(model, config, tensors, name, is_trainable, source=source)
