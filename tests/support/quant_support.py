"""Helpers of the quantized-base tests (tests/quant/): comparing stored states bit for bit, and what bitsandbytes'
own 4-bit quantizer makes of a weight."""

from __future__ import annotations

import torch


def same_state(a: dict, b: dict) -> bool:
    """Bytes and quant state equal: tensors with torch.equal (dtype included), other values with ==."""
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
                    and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def bnb4_bytes(weight: torch.Tensor, snap) -> torch.Tensor:
    """What bitsandbytes' quantize_4bit makes of ``weight`` with the settings of the layer ``snap`` was taken
    from. (A bound on the error is no test for 4-bit: double-quantized statistics of a layer of a few blocks, as on
    the tiny models, can be off by tens of percent of the layer's largest weight — bitsandbytes' 8-bit absmax code,
    not the fuse.)"""
    from bitsandbytes.functional import quantize_4bit

    state = snap.extra["quant_state"]
    nested = getattr(state, "original_nested", state.nested)
    dtype = getattr(state, "original_dtype", state.dtype)
    data, _ = quantize_4bit(weight.to(dtype), blocksize=state.blocksize, compress_statistics=nested,
                            quant_type=state.quant_type, quant_storage=snap.weight.quant_storage)
    return data
