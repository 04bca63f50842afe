"""Fuse into a quantized layer, and put its bytes back.

``fuse``: dequantize the layer's ORIGINAL stored weight (the snapshot taken at its first fuse, never a fused weight:
no drift however many times it is re-fused) to fp32, add ``s · Σ wᵢ ΔWᵢ`` with the one fused-weight formula
(:func:`lorablend.runtime.fusion.fused_weight`: one ``addmm`` of the concatenated low-rank factors), requantize
into the layer's own format as new objects (fp8: stochastic rounding seeded by the layer's name and the table's
``rounding_seed``). ``restore``: rebind the snapshot's objects (no arithmetic), so unfuse gives back the original
bytes and quant state bit for bit.

Memory: where the format is row-local (``QuantFormat.row_fuse``: fp8, GGUF, bitsandbytes NF4 / FP4 / int8) and
every delta is low-rank (LoRA / LoCon), the layer goes through in blocks of rows of about ``BLOCK_BYTES`` in fp32
— decode rows, ``addmm`` their rows of ``U`` with ``D``, quantize them into the new storage — so a fuse holds the
new quantized bytes, one block and the LoRA's factors, never the layer in fp32. The bytes are those of the
whole-layer path (the same ops per row; tests compare them). Otherwise (torchao, a conv, LoHa / LoKr / full /
DoRA deltas) one fp32 copy of the layer plus the quantizer's temporaries, one layer at a time.

>>> write_fused(layer, [(1.0, delta)], safe=False)       # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..kinds import Delta
from ..runtime.fusion import fused_bias, fused_weight, has_bias_terms, low_rank_factors
from .base import RowFuse
from .formats import layer_seed

BLOCK_BYTES = 4 << 20  # fp32 bytes of one block of rows in a row-local fuse: a few MB whatever the layer's size


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
    seed = layer_seed(layer.table.rounding_seed, layer.key)
    with torch.no_grad():
        low_rank = all(c == 0.0 or (not d.needs_base and d.low_rank_factors() is not None) for c, d in entries)
        rows = fmt.row_fuse(module, snap, seed) if low_rank else None
        bias = getattr(module, "bias", None)
        if rows is not None:
            fuse_by_rows(rows, entries, fmt.shape(module), safe=safe, key=layer.key)
        else:
            base = fmt.dequantize(module, snap)
            in_place = not safe and not any(d.needs_base for _, d in entries)
            fused = fused_weight(base, entries, safe=safe, key=layer.key, out=base if in_place else None)
            fmt.requantize(module, snap, fused, seed)
            del base, fused
        if bias is not None and layer.pristine_bias is None and has_bias_terms(entries):
            layer.pristine_bias = bias.detach().clone()
        if layer.pristine_bias is not None:
            bias.copy_(fused_bias(layer.pristine_bias, entries, out_dtype=bias.dtype, device=bias.device))
    layer.quant_snapshot, layer.pristine_weight = snap, snap.weight


def fuse_by_rows(rows: RowFuse, entries: Sequence[tuple[float, Delta]], shape: Sequence[int], *, safe: bool,
                 key: str = "") -> None:
    """Fuse low-rank ``entries`` into a quantized weight block by block (``rows``: the format's :class:`RowFuse`,
    ``shape`` the weight's logical ``(out, in)``) and install the new storage: per block, ``W0[a:b] + U[a:b] @ D``
    (:func:`lorablend.runtime.fusion.low_rank_factors`, the factors ``fused_weight`` multiplies) quantized by
    ``rows.write``. ``safe``: a block with NaN / Inf raises ``ValueError`` before anything is installed.

    >>> fuse_by_rows(fmt.row_fuse(module, snap, 0), [(0.8, delta)], (12288, 3072), safe=False)  # doctest: +SKIP
    """
    out_features, width = int(shape[0]), int(shape[1])
    block = rows.step * max(1, BLOCK_BYTES // (4 * width * rows.step))
    factors = None
    for peek in (True, False) if rows.needs_peak else (False,):
        for start in range(0, out_features, block):
            stop = min(out_features, start + block)
            w = rows.read(start, stop)
            if factors is None and entries:
                factors = low_rank_factors(entries, w.device) or ()
            if factors:
                w.addmm_(factors[0][start:stop], factors[1])
            if safe and not bool(torch.isfinite(w).all()):
                raise ValueError(f"the fused weight of {key or 'a layer'} has NaN or Inf values; nothing was written. "
                                 "The adapter or the scale is broken for this dtype (try a smaller lora_scale)")
            rows.observe(w) if peek else rows.write(start, w)
    rows.finish()


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


__all__ = ["BLOCK_BYTES", "dequantized_weight", "fuse_by_rows", "restore", "write_fused"]
