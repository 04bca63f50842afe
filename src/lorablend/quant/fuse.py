"""Fuse into a quantized layer, and put its bytes back.

``fuse``: dequantize the layer's ORIGINAL stored weight (the snapshot taken at its first fuse, never a fused weight:
no drift however many times it is re-fused) to fp32, add ``s · Σ wᵢ ΔWᵢ`` with the one fused-weight formula
(:func:`lorablend.runtime.fusion.fused_weight`, in place on that fp32 buffer when no delta needs the base weight),
requantize into the layer's own format as new objects (fp8: stochastic rounding seeded by the layer's name and
the table's ``rounding_seed``). Memory: one fp32 copy of this layer (plus the quantizer's temporaries), one layer
at a time. ``restore``: rebind the snapshot's objects (no arithmetic), so unfuse gives back the original bytes and
quant state bit for bit.

>>> write_fused(layer, [(1.0, delta)], safe=False)       # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..kinds import Delta
from ..runtime.fusion import fused_bias, fused_weight, has_bias_terms
from .formats import layer_seed


def write_fused(layer: Any, entries: Sequence[tuple[float, Delta]], *, safe: bool) -> None:
    """Make ``layer``'s quantized weight ``requantize(W0 + Σ coef·ΔW)`` (W0 dequantized from the original bytes),
    or put the original bytes back when ``entries`` is empty. ``layer`` is a ``runtime.layer_state.LayerState``
    whose ``quant`` is set; it records the snapshot in ``quant_snapshot`` and the original weight object in
    ``pristine_weight`` (what marks a layer fused)."""
    fmt, module = layer.quant, layer.module
    if not entries:
        if layer.quant_snapshot is not None:
            restore(layer)
        return
    check = getattr(fmt, "check", None)
    problem = check(module) if check is not None and layer.quant_snapshot is None else None
    if problem:
        raise ValueError(f"fuse_lora on {layer.key}: {problem}")
    snap = layer.quant_snapshot if layer.quant_snapshot is not None else fmt.snapshot(module)
    with torch.no_grad():
        base = fmt.dequantize(module, snap)
        in_place = not safe and not any(d.needs_base for _, d in entries)
        fused = fused_weight(base, entries, safe=safe, key=layer.key, out=base if in_place else None)
        bias = getattr(module, "bias", None)
        if bias is not None and layer.pristine_bias is None and has_bias_terms(entries):
            layer.pristine_bias = bias.detach().clone()
        fmt.requantize(module, snap, fused, layer_seed(layer.table.rounding_seed, layer.key))
        del base, fused
        if layer.pristine_bias is not None:
            bias.copy_(fused_bias(layer.pristine_bias, entries, out_dtype=bias.dtype, device=bias.device))
    layer.quant_snapshot, layer.pristine_weight = snap, snap.weight


def restore(layer: Any) -> None:
    """Put the layer's original stored weight (and bias) back: the snapshot's objects rebound, bit for bit."""
    layer.quant.restore(layer.module, layer.quant_snapshot)
    if layer.pristine_bias is not None:
        with torch.no_grad():
            layer.module.bias.copy_(layer.pristine_bias)


def dequantized_weight(layer: Any) -> torch.Tensor:
    """The fp32 weight a quantized layer stands for: its original weight while fused, its live weight otherwise
    (what a DoRA delta on it is relative to)."""
    snap = layer.quant_snapshot if layer.quant_snapshot is not None else layer.quant.snapshot(layer.module)
    return layer.quant.dequantize(layer.module, snap)


__all__ = ["dequantized_weight", "restore", "write_fused"]
