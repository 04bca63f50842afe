"""quant/convert.py: a model's linears quantized in place (and back to float), the layers it skips left alone."""

from __future__ import annotations

import torch

from lorablend.quant.convert import dequantize_model, quantize_model
from lorablend.quant.formats import format_of


def test_quantize_then_dequantize_gives_float_linears_close_to_the_original():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    reference = [m.weight.detach().clone() for m in model if isinstance(m, torch.nn.Linear)]
    assert quantize_model(model, "scaled-fp8", skip=lambda name: name == "2") == ["0"]
    assert format_of(model[0]) is not None and format_of(model[2]) is None
    assert torch.equal(model[2].weight, reference[1])  # the skipped layer is untouched
    assert dequantize_model(model) == ["0"]
    assert type(model[0]) is torch.nn.Linear
    rel = float((model[0].weight - reference[0]).norm() / reference[0].norm())
    assert 0 < rel < 0.1  # fp8's rounding, no more
