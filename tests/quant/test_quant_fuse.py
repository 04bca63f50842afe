"""quant/fuse.py: fusing into a quantized layer (dequantize the ORIGINAL bytes, the one fused-weight formula,
requantize) and putting its stored objects back bit for bit; re-fusing never drifts from the original."""

from __future__ import annotations

import contextvars

import torch

from lorablend.kinds import LowRankDelta
from lorablend.quant.convert import quantize_model
from lorablend.quant.fuse import dequantized_weight, write_fused
from lorablend.runtime.layer_state import LayerTable


def _layer(method="scaled-fp8"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    quantize_model(model, method)
    table = LayerTable(contextvars.ContextVar("scale", default=1.0))
    layer = table.add("unet.x", "unet", model[0])
    assert layer.quant is not None
    return layer


def _delta(seed):
    g = torch.Generator().manual_seed(seed)
    return LowRankDelta(torch.randn(4, 64, generator=g) * 0.1, torch.randn(32, 4, generator=g) * 0.1)


def test_a_fuse_writes_the_requantized_sum_and_an_empty_fuse_restores_the_original_objects():
    layer = _layer()
    fmt, module = layer.quant, layer.module
    stored = {k: v.clone() for k, v in fmt.stored_state(module).items() if isinstance(v, torch.Tensor)}
    w0 = dequantized_weight(layer)
    write_fused(layer, [(0.8, _delta(1))], safe=False)
    assert layer.quant_snapshot is not None and layer.pristine_weight is not None  # marked fused
    live = fmt.dequantize(module, fmt.snapshot(module))
    want = w0 + 0.8 * _delta(1).delta_weight()
    assert float((live - want).abs().max()) <= fmt.fused_rounding(module) * float(want.abs().max()) + 1e-6
    assert torch.equal(dequantized_weight(layer), w0)  # while fused: the original is what a DoRA would see
    write_fused(layer, [], safe=False)
    assert all(torch.equal(fmt.stored_state(module)[k], v) for k, v in stored.items())


def test_fusing_again_starts_from_the_original_bytes_not_the_fused_ones():
    layer = _layer()
    write_fused(layer, [(1.0, _delta(2))], safe=False)
    first = layer.quant.dequantize(layer.module, layer.quant.snapshot(layer.module))
    write_fused(layer, [(1.0, _delta(2))], safe=False)  # the same fuse again: same seed, same original
    again = layer.quant.dequantize(layer.module, layer.quant.snapshot(layer.module))
    assert torch.equal(first, again)
