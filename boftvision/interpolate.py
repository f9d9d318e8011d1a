"""Butterfly weight interpolation (BOFT paper, Fig. 10): set butterfly components to identity one at a
time, leftmost first (``boft_R[m−1]``, the last-applied factor of ``R = B_{m−1} ⋯ B_0``). 0 components
replaced = the fine-tuned model; all replaced (and the scale reset) = the base model. Reversible: it
changes what the forward uses, never the trained parameters."""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from .adapters import OrthogonalAdapter
from .inject import adapted_layers


def _orthogonal_layers(model: nn.Module) -> list[OrthogonalAdapter]:
    layers = []
    for name, layer in adapted_layers(model):
        if layer.active is None:
            continue
        if layer.merged is not None:
            raise RuntimeError(f"layer '{name}' is merged; unmerge_adapter(model) before interpolating")
        adapter = layer.adapters[layer.active]
        if isinstance(adapter, OrthogonalAdapter):
            layers.append(adapter)
    if not layers:
        raise ValueError("butterfly interpolation needs an active BOFT or OFT adapter; this model has none")
    return layers


def num_butterfly_components(model: nn.Module) -> int:
    """The largest m over the active orthogonal adapters (the length of the path is m + 1)."""
    return max(a.n_factors for a in _orthogonal_layers(model))


def butterfly_interpolation(model: nn.Module, n_identity: int, reset_scale: bool = False) -> int:
    """Set the first ``n_identity`` butterfly components (Fig. 10 order) to I on every active BOFT/OFT
    layer (layers with fewer components get all of theirs replaced). ``reset_scale`` also sets the
    output scale to 1, so ``n_identity = m`` gives exactly the base model. Returns m."""
    layers = _orthogonal_layers(model)
    m = max(a.n_factors for a in layers)
    if not 0 <= n_identity <= m:
        raise ValueError(f"n_identity must be in [0, {m}] for this adapter (m={m}), got {n_identity}")
    for adapter in layers:
        adapter.set_interpolation(n_identity, reset_scale)
    return m


@contextmanager
def interpolated(model: nn.Module, n_identity: int, reset_scale: bool = False):
    """``with interpolated(model, 1): ...`` — restores the full adapter on exit."""
    butterfly_interpolation(model, n_identity, reset_scale)
    try:
        yield model
    finally:
        butterfly_interpolation(model, 0)
