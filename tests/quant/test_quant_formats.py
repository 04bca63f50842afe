"""Each quantized format on one layer: its logical size, its forward = its dequantized weight, a fused weight
requantized within the format's stated rounding, the original bytes and quant state put back bit for bit; fp8's
seeded stochastic rounding reproducible and unbiased."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("bitsandbytes")
pytest.importorskip("gguf")

from quant_support import bnb4_bytes, same_state  # noqa: E402

from lorablend.quant import format_of, weight_shape  # noqa: E402
from lorablend.quant.convert import dequantize_model, quantize_model  # noqa: E402
from lorablend.quant.fp8 import stochastic_round  # noqa: E402

METHODS = ["nf4", "fp4", "int8", "fp8", "scaled-fp8", "gguf-Q8_0", "gguf-Q4_0", "gguf-Q5_1", "torchao-int8"]


def quantized_layer(method: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96))
    assert quantize_model(model, method) == ["0"]
    return model[0]


@pytest.mark.parametrize("method", METHODS)
def test_size_forward_requantize_restore(method):
    layer = quantized_layer(method)
    fmt = format_of(layer)
    assert fmt is not None and weight_shape(layer) == (96, 64)
    x = torch.randn(5, 64)
    y = layer(x)  # (a first forward: bitsandbytes repacks a 4-bit weight for its CPU kernel here)
    before = copy.copy(fmt.stored_state(layer))
    snap = fmt.snapshot(layer)
    w0 = fmt.dequantize(layer, snap)
    bias = None if layer.bias is None else layer.bias.float()
    # the layer's own forward is its dequantized weight (GGUF's forward decodes in fp16: 1e-3)
    torch.testing.assert_close(y.float(), F.linear(x, w0, bias), atol=2e-3, rtol=1e-3)
    dw = torch.randn(96, 4) @ torch.randn(4, 64) * 0.05
    for seed in (1, 2):
        fmt.requantize(layer, snap, w0 + dw, seed)
        if fmt.name == "bnb-4bit":  # bitsandbytes' own quantizer of the exact fused weight (see quant_support)
            assert torch.equal(layer.weight.data, bnb4_bytes(w0 + dw, snap))
        else:
            got = fmt.dequantize(layer, fmt.snapshot(layer))
            bound = fmt.fused_rounding(layer) * float((w0 + dw).abs().max())
            assert float((got - (w0 + dw)).abs().max()) <= bound, (method, fmt.fused_rounding(layer))
        layer(x)
    fmt.restore(layer, snap)
    assert same_state(before, fmt.stored_state(layer))
    assert torch.equal(layer(x), y)


def test_dequantize_model_is_the_float_reference():
    layer = quantized_layer("gguf-Q8_0")
    model = torch.nn.Sequential(quantized_layer("gguf-Q8_0"))  # (diffusers' GGUFParameter cannot be deep-copied)
    assert dequantize_model(model) == ["0"] and type(model[0]) is torch.nn.Linear
    fmt = format_of(layer)
    assert torch.equal(model[0].weight, fmt.dequantize(layer, fmt.snapshot(layer)))


def test_fp8_stochastic_rounding_reproducible_and_unbiased():
    x = torch.randn(4096) * 3
    one = stochastic_round(x, torch.float8_e4m3fn, torch.Generator().manual_seed(5))
    again = stochastic_round(x, torch.float8_e4m3fn, torch.Generator().manual_seed(5))
    other = stochastic_round(x, torch.float8_e4m3fn, torch.Generator().manual_seed(6))
    assert torch.equal(one.view(torch.uint8), again.view(torch.uint8))
    assert not torch.equal(one.view(torch.uint8), other.view(torch.uint8))
    # each value lands on one of its two fp8 neighbours: within one step (2^-3 of its magnitude, or a subnormal step)
    assert bool(((one.float() - x).abs() <= x.abs() * 2 ** -3 + 2 ** -9).all())
    # unbiased: over many seeds the mean error of every value tends to 0 (round-to-nearest keeps its bias)
    v = torch.full((256,), 1.0 + 0.3 * 2 ** -3)  # 30% of the way from 1.0 to the next e4m3 value 1.125
    draws = torch.stack([stochastic_round(v, torch.float8_e4m3fn, torch.Generator().manual_seed(s)).float()
                         for s in range(200)])
    mean_error = float((draws.mean() - v[0]) / 2 ** -3)  # in steps; σ of the mean ≈ 0.46/√51200 = 0.002
    nearest_error = float((v.to(torch.float8_e4m3fn).float()[0] - v[0]) / 2 ** -3)
    assert abs(mean_error) < 0.01 and nearest_error == pytest.approx(-0.3)
    assert set(draws.unique().tolist()) == {1.0, 1.125}


def test_fp8_saturates_and_keeps_signs():
    x = torch.tensor([1000.0, -1000.0, -0.0, 0.0, -1e-6])
    got = stochastic_round(x, torch.float8_e4m3fn, torch.Generator().manual_seed(0)).float()
    assert got[:2].tolist() == [448.0, -448.0] and torch.signbit(got[2]) and not torch.signbit(got[3])
    assert bool(torch.signbit(got[4]))


def test_plain_float8_weight_is_a_quantized_layer():
    """diffusers' layerwise casting stores a Linear's weight in float8 (no scale): a quantized layer too."""
    layer = torch.nn.Linear(32, 16)
    layer.weight.data = layer.weight.data.to(torch.float8_e5m2)
    fmt = format_of(layer)
    assert fmt is not None and fmt.label(layer) == "fp8-e5m2" and weight_shape(layer) == (16, 32)


def test_float_layers_have_no_format():
    assert format_of(torch.nn.Linear(4, 4).to(torch.bfloat16)) is None
    assert format_of(torch.nn.Conv2d(2, 2, 3)) is None


def test_k_quant_layer_fuses_as_q8_0_and_restores_its_bytes():
    """gguf-py has no K-quant quantizer: a fused Q6_K layer is stored as Q8_0 (within Q8_0's rounding of the exact
    fused weight); unfuse gives the Q6_K bytes back."""
    import contextvars

    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter
    from gguf import GGMLQuantizationType as T

    from lorablend.kinds import LowRankDelta
    from lorablend.runtime.layer_state import LayerTable

    rng = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (8, 210), generator=rng, dtype=torch.uint8)  # 8 rows of one Q6_K block (256 values)
    raw[:, 208:] = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8)  # each block's fp16 scale d
    layer = GGUFLinear(256, 8, bias=False, compute_dtype=torch.float32, device="meta")
    layer.weight = GGUFParameter(raw.clone(), quant_type=T.Q6_K)
    fmt = format_of(layer)
    assert fmt.label(layer) == "gguf-Q6_K" and weight_shape(layer) == (8, 256)
    before = copy.copy(fmt.stored_state(layer))
    w0 = fmt.dequantize(layer, fmt.snapshot(layer))
    state = LayerTable(contextvars.ContextVar("s", default=1.0)).add("unet.x", "unet", layer)
    delta = LowRankDelta(down=torch.randn(2, 256, generator=rng), up=torch.randn(8, 2, generator=rng) * 0.01)
    state.write_fused([(1.0, delta)])
    assert fmt.label(layer) == "gguf-Q8_0"
    want = w0 + delta.up @ delta.down
    got = fmt.dequantize(layer, fmt.snapshot(layer))
    assert float((got - want).abs().max()) <= (0.5 / 127 + 2 ** -10) * float(want.abs().max())
    state.write_fused([])
    assert same_state(before, fmt.stored_state(layer))
