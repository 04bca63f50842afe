"""quant/fuse.py: fusing into a quantized layer (dequantize the ORIGINAL bytes, the one fused-weight formula,
requantize) and putting its stored objects back bit for bit; re-fusing never drifts from the original."""

from __future__ import annotations

import contextvars

import pytest
import torch

from lorablend.kinds import LowRankDelta
from lorablend.quant.convert import quantize_model
from lorablend.quant.formats import layer_seed
from lorablend.quant.fuse import dequantized_weight, write_fused
from lorablend.runtime.layer_state import LayerTable

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


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


def _pair(method, rows=96, width=96):
    """Two identical quantized layers (the same float weights, the same bytes) in tables of their own."""
    layers = []
    for _ in range(2):
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Linear(width, rows))
        quantize_model(model, method)
        layers.append(LayerTable(contextvars.ContextVar("scale", default=1.0)).add("transformer.x", "transformer",
                                                                                    model[0]))
    return layers


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8", "fp8", "scaled-fp8", "gguf-Q8_0", "gguf-Q4_0", "gguf-Q5_1",
                                    "torchao-int8"])
def test_a_fuse_by_blocks_of_rows_writes_the_bytes_of_the_whole_layer_fuse(method, monkeypatch):
    """A layer fused in blocks of rows (several blocks here: 20 rows of 96 inputs each, the last one short) stores
    exactly what dequantizing, fusing and requantizing the whole layer at once stores — bytes and quant state,
    double-quantized absmax and fp8's random draws included — and unfuses to its original objects."""
    from lorablend.quant import fuse
    from lorablend.runtime.fusion import fused_weight

    width = 128 if method in ("nf4", "fp4") else 96  # (4-bit: rows of whole 64-blocks, else the whole-layer path)
    monkeypatch.setattr(fuse, "BLOCK_BYTES", 4 * width * 20)
    chunked, whole = _pair(method, width=width)
    fmt = chunked.quant
    g = torch.Generator().manual_seed(5)
    big = LowRankDelta(torch.randn(4, width, generator=g), torch.randn(96, 4, generator=g))  # outgrows an fp8 scale
    entries = [(0.8, big), (-0.3, LowRankDelta(torch.randn(2, width, generator=g), torch.randn(96, 2, generator=g)))]
    assert fmt.row_fuse(chunked.module, fmt.snapshot(chunked.module), 0) is not None
    original = {k: v for k, v in fmt.stored_state(chunked.module).items()}
    write_fused(chunked, entries, safe=True)

    snap = fmt.snapshot(whole.module)
    seed = layer_seed(whole.table.rounding_seed, whole.key)
    fmt.requantize(whole.module, snap, fused_weight(fmt.dequantize(whole.module, snap), entries), seed)
    got, want = fmt.stored_state(chunked.module), fmt.stored_state(whole.module)
    assert got.keys() == want.keys()
    for k, v in want.items():
        same = torch.equal(got[k].view(torch.uint8) if got[k].dtype in FP8 else got[k],
                           v.view(torch.uint8) if v.dtype in FP8 else v) if isinstance(v, torch.Tensor) else got[k] == v
        assert same, f"{method}: {k} differs from the whole-layer fuse"
    write_fused(chunked, [], safe=False)
    for k, v in fmt.stored_state(chunked.module).items():
        assert v is original[k] or (torch.equal(v, original[k]) if isinstance(v, torch.Tensor) else v == original[k]), k


def test_a_fuse_by_rows_with_nan_raises_and_installs_nothing(monkeypatch):
    from lorablend.quant import fuse

    monkeypatch.setattr(fuse, "BLOCK_BYTES", 4 * 96 * 20)
    layer, _ = _pair("gguf-Q8_0")
    before = layer.module.weight
    up = torch.zeros(96, 1)
    up[70] = float("nan")  # in the last block: the blocks before it were already quantized
    with pytest.raises(ValueError, match="transformer.x"):
        write_fused(layer, [(1.0, LowRankDelta(torch.ones(1, 96), up))], safe=True)
    assert layer.module.weight is before and layer.quant_snapshot is None


@pytest.mark.parametrize("method", ["nf4", "int8", "scaled-fp8", "gguf-Q8_0", "torchao-int8"])
def test_a_fuse_into_a_float_copy_computes_with_the_exact_sum_and_leaves_the_quantized_objects(method, monkeypatch):
    """``quantized_fuse_dtype``: the fused layer computes with ``W0 + Σ c·ΔW`` in that float dtype (no requantizing
    rounding: fp32 here, so within fp32 matmul error of the float reference); its quantized objects are the very
    ones it had, so unfuse gives the original forward back bit for bit; a later fuse in the default mode
    requantizes again."""
    from lorablend.quant import fuse

    monkeypatch.setattr(fuse, "BLOCK_BYTES", 4 * 128 * 20)  # (several blocks of rows where the format allows)
    layer, _ = _pair(method, width=128)
    module, fmt = layer.module, layer.quant
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(7))
    before_out = module(x)
    objects = {k: v for k, v in fmt.stored_state(module).items() if isinstance(v, torch.Tensor)}
    w0 = dequantized_weight(layer)
    g = torch.Generator().manual_seed(5)
    delta = LowRankDelta(torch.randn(4, 128, generator=g) * 0.1, torch.randn(96, 4, generator=g) * 0.1)
    layer.table.quantized_fuse_dtype = torch.float32
    write_fused(layer, [(0.8, delta)], safe=True)
    want = torch.nn.functional.linear(x, w0 + 0.8 * delta.delta_weight(), module.bias.float())
    assert (module(x).float() - want).abs().max() <= 1e-4 * want.abs().max(), "not the float sum"
    assert "lorablend_fused_weight" not in module.state_dict()  # (a float copy, not a saved weight)
    for k, v in fmt.stored_state(module).items():
        if k in objects:
            assert v.data_ptr() == objects[k].data_ptr(), f"{method}: {k} was replaced while fused into a float copy"
    layer.table.quantized_fuse_dtype = torch.bfloat16
    write_fused(layer, [(0.8, delta)], safe=False)  # re-fused in bf16: within bf16's rounding of the sum
    assert (module(x).float() - want).abs().max() <= 2 ** -7 * (x.abs().sum(1).max() * want.abs().max())
    write_fused(layer, [], safe=False)
    assert "forward" not in vars(module) and "lorablend_fused_weight" not in module._buffers
    assert torch.equal(module(x), before_out)
    layer.table.quantized_fuse_dtype = None  # the default again: requantized into the format
    write_fused(layer, [(0.8, delta)], safe=False)
    first = next(iter(objects))  # (the weight's bytes: "weight", torchao's "qdata")
    assert "forward" not in vars(module) and fmt.stored_state(module)[first].data_ptr() != objects[first].data_ptr()
    write_fused(layer, [], safe=False)
    assert torch.equal(module(x), before_out)
