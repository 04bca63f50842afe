"""One check of the QuantFormat contract on one quantized Linear (used by tests/quant/test_quant_<format>.py): the
logical shape, a dequantized weight close to the float original, a requantized fused weight within the format's
stated rounding, and a restore that gives back every stored tensor bit for bit."""

from __future__ import annotations

import torch

from lorablend.quant.convert import quantize_model
from lorablend.quant.formats import format_of


def check_format_contract(method: str, label_prefix: str, *, rel_tol: float) -> None:
    """Quantize a seeded 64 → 32 Linear with ``method`` and check the contract (assertions name what failed)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    original = model[0].weight.detach().clone()
    assert quantize_model(model, method) == ["0"], f"{method}: the layer was not quantized"
    layer = model[0]
    fmt = format_of(layer)
    assert fmt is not None and fmt.label(layer).startswith(label_prefix), fmt and fmt.label(layer)
    assert tuple(fmt.shape(layer)) == (32, 64)
    snap = fmt.snapshot(layer)
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in fmt.stored_state(layer).items()}
    w0 = fmt.dequantize(layer, snap)
    assert w0.dtype == torch.float32 and (w0 - original).norm() / original.norm() < rel_tol
    delta = 0.05 * torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    fmt.requantize(layer, snap, w0 + delta, seed=0)
    fused = fmt.dequantize(layer, fmt.snapshot(layer))
    bound = fmt.fused_rounding(layer) * float((w0 + delta).abs().max())
    assert float((fused - (w0 + delta)).abs().max()) <= bound + 1e-6, "requantized beyond the stated rounding"
    fmt.restore(layer, snap)
    after = fmt.stored_state(layer)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v) if isinstance(v, torch.Tensor) else after[k] == v, k
