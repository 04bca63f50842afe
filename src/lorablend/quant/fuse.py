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

Fused into a float copy (``LayerTable.quantized_fuse_dtype``, e.g. ``torch.bfloat16``; default None: requantize):
the fused weight is kept in that dtype in the module's non-persistent buffer ``lorablend_fused_weight`` and the
module computes ``F.linear`` with it (an instance ``forward``) while its quantized weight objects stay untouched —
no requantization rounding, at the cost of that float copy of each touched layer; unfuse drops both. A layer that
is not a linear (an fp8 conv) is requantized as usual.

>>> write_fused(layer, [(1.0, delta)], safe=False)       # doctest: +SKIP
"""

from __future__ import annotations

import weakref
from typing import Any, Iterator, Sequence

import torch

import torch.nn.functional as F
from torch import nn

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
    dtype = layer.table.quantized_fuse_dtype
    as_float = dtype is not None and len(fmt.shape(module)) == 2
    with torch.no_grad():
        low_rank = all(c == 0.0 or (not d.needs_base and d.low_rank_factors() is not None) for c, d in entries)
        rows = fmt.row_fuse(module, snap, seed) if low_rank else None
        bias = getattr(module, "bias", None)
        if as_float:
            weight = _float_weight(fmt, module, snap, rows, entries, dtype, safe=safe, key=layer.key)
            _drop_float(module)
            fmt.restore(module, snap)  # (the original objects, whatever an earlier fuse installed)
            module.register_buffer("lorablend_fused_weight", weight, persistent=False)
            module.forward = _FloatForward(module, module.__dict__.get("forward"))
        elif rows is not None:
            fuse_by_rows(rows, entries, fmt.shape(module), safe=safe, key=layer.key)
            _drop_float(module)
        else:
            base = fmt.dequantize(module, snap)
            in_place = not safe and not any(d.needs_base for _, d in entries)
            fused = fused_weight(base, entries, safe=safe, key=layer.key, out=base if in_place else None)
            fmt.requantize(module, snap, fused, seed)
            del base, fused
            _drop_float(module)
        if bias is not None and layer.pristine_bias is None and has_bias_terms(entries):
            layer.pristine_bias = bias.detach().clone()
        if layer.pristine_bias is not None:
            bias.copy_(fused_bias(layer.pristine_bias, entries, out_dtype=bias.dtype, device=bias.device))
    layer.quant_snapshot, layer.pristine_weight = snap, snap.weight


def fuse_by_rows(rows: RowFuse, entries: Sequence[tuple[float, Delta]], shape: Sequence[int], *, safe: bool,
                 key: str = "") -> None:
    """Fuse low-rank ``entries`` into a quantized weight block by block (``rows``: the format's :class:`RowFuse`,
    ``shape`` the weight's logical ``(out, in)``) and install the new storage: each block of :func:`fused_blocks`
    quantized by ``rows.write`` (a format whose scale needs the whole fused weight is shown every block first).

    >>> fuse_by_rows(fmt.row_fuse(module, snap, 0), [(0.8, delta)], (12288, 3072), safe=False)  # doctest: +SKIP
    """
    if rows.needs_peak:
        for _, w in fused_blocks(rows, entries, shape, safe=safe, key=key):
            rows.observe(w)
    for start, w in fused_blocks(rows, entries, shape, safe=safe, key=key):
        rows.write(start, w)
    rows.finish()


def fused_blocks(rows: RowFuse, entries: Sequence[tuple[float, Delta]], shape: Sequence[int], *, safe: bool,
                 key: str = "") -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, W0[a:b] + U[a:b] @ D)`` over blocks of about ``BLOCK_BYTES`` of rows, in order, fp32: ``U, D``
    the concatenated low-rank factors ``fused_weight`` multiplies (:func:`lorablend.runtime.fusion.
    low_rank_factors`). ``safe``: a block with NaN / Inf raises ``ValueError`` (naming ``key``).

    >>> next(fused_blocks(fmt.row_fuse(module, snap, 0), [(0.8, delta)], (12288, 3072), safe=False))  # doctest: +SKIP
    """
    out_features, width = int(shape[0]), int(shape[1])
    block = rows.step * max(1, BLOCK_BYTES // (4 * width * rows.step))
    factors = None
    for start in range(0, out_features, block):
        stop = min(out_features, start + block)
        w = rows.read(start, stop)
        if factors is None:
            factors = low_rank_factors(entries, w.device) or ()
        if factors:
            w.addmm_(factors[0][start:stop], factors[1])
        if safe and not bool(torch.isfinite(w).all()):
            raise ValueError(f"the fused weight of {key or 'a layer'} has NaN or Inf values; nothing was written. "
                             "The adapter or the scale is broken for this dtype (try a smaller lora_scale)")
        yield start, w


def _float_weight(fmt: Any, module: nn.Module, snap: Any, rows: RowFuse | None, entries: Sequence[tuple[float, Delta]],
                  dtype: torch.dtype, *, safe: bool, key: str) -> torch.Tensor:
    """The fused weight in the float ``dtype``: by blocks of rows where the format allows (one block in fp32 at a
    time beside the ``dtype`` result), else from the whole layer dequantized."""
    if rows is None:
        return fused_weight(fmt.dequantize(module, snap), entries, out_dtype=dtype, safe=safe, key=key)
    shape = fmt.shape(module)
    out = None
    for start, w in fused_blocks(rows, entries, shape, safe=safe, key=key):
        if out is None:
            out = torch.empty(tuple(shape), dtype=dtype, device=w.device)
        part = out[start:start + w.shape[0]]
        part.copy_(w)
        if safe and not bool(torch.isfinite(part).all()):  # (a finite fp32 sum can overflow fp16)
            raise ValueError(f"the fused weight of {key} has NaN or Inf values in {dtype}; nothing was written. "
                             "Try a smaller lora_scale or a wider quantized_fuse_dtype")
    return out


class _FloatForward:
    """The forward of a quantized linear fused into a float copy: ``F.linear`` with its ``lorablend_fused_weight``
    buffer (in that buffer's dtype; the input's dtype out, as the quantized forwards return). ``previous``: the
    instance forward it stands in for (diffusers' hooks, e.g. layerwise casting, wrap the forward that way), put
    back on unfuse; those hooks do not run while the layer computes from its float copy."""

    def __init__(self, module: nn.Module, previous: Any) -> None:
        self.module_ref = weakref.ref(module)  # (weak: the module holds this as its forward)
        self.previous = previous.previous if isinstance(previous, _FloatForward) else previous

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        module = self.module_ref()
        weight, bias = module.lorablend_fused_weight, module.bias
        out = F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
        return out.to(x.dtype)


def _drop_float(module: nn.Module) -> None:
    """Forget a float-copy fuse of ``module``: its class's forward again, the copy freed."""
    if "lorablend_fused_weight" in module._buffers:
        del module._buffers["lorablend_fused_weight"]
        ours = module.__dict__.pop("forward", None)
        if getattr(ours, "previous", None) is not None:
            module.forward = ours.previous


def restore(layer: Any) -> None:
    """Put the layer's original stored weight (and bias) back: the snapshot's objects rebound, bit for bit."""
    _drop_float(layer.module)
    layer.quant.restore(layer.module, layer.quant_snapshot)
    if layer.pristine_bias is not None:
        with torch.no_grad():
            layer.module.bias.copy_(layer.pristine_bias)


def dequantized_weight(layer: Any) -> torch.Tensor:
    """The fp32 weight a quantized layer stands for: its original weight while fused, its live weight otherwise
    (what a DoRA delta on it is relative to)."""
    snap = layer.quant_snapshot if layer.quant_snapshot is not None else layer.quant.snapshot(layer.module)
    return layer.quant.dequantize(layer.module, snap)


__all__ = ["BLOCK_BYTES", "dequantized_weight", "fuse_by_rows", "fused_blocks", "restore", "write_fused"]
