"""quant/fp8.py: float8 weights — seeded, unbiased stochastic rounding onto the fp8 grid (saturating at its
largest finite value), and the scaled-fp8 linear layer."""

from __future__ import annotations

import torch

from lorablend.quant.fp8 import ScaledFp8Linear, stochastic_round

E4M3 = torch.float8_e4m3fn


def test_each_value_rounds_to_one_of_its_two_fp8_neighbours_and_exact_values_stay():
    x = torch.linspace(-3.0, 3.0, 1001)
    got = stochastic_round(x, E4M3, torch.Generator().manual_seed(0)).float()
    down = x.to(E4M3).float()
    assert torch.all((got - x).abs() <= (x.abs() * 0.25 + 2 ** -9))  # within one fp8 step of x
    exact = torch.tensor([0.0, 1.0, -2.0, 0.5])
    assert torch.equal(stochastic_round(exact, E4M3, torch.Generator().manual_seed(3)).float(), exact)
    assert torch.all(got * x >= 0)  # never the other sign (a value below the smallest subnormal may become 0)
    assert torch.all((got - down).abs() <= (x.abs() * 0.25 + 2 ** -9))  # the nearest value or its neighbour


def test_the_rounding_is_unbiased_seeded_and_saturates():
    x = torch.full((20000,), 1.0 + 1 / 32)  # between 1 and 1.125 (e4m3 step 1/8 there): up with p = 1/4
    a = stochastic_round(x, E4M3, torch.Generator().manual_seed(7)).float()
    b = stochastic_round(x, E4M3, torch.Generator().manual_seed(7)).float()
    assert torch.equal(a, b) and set(a.unique().tolist()) == {1.0, 1.125}
    assert abs(float(a.mean()) - (1.0 + 1 / 32)) < 2e-3
    big = stochastic_round(torch.tensor([1e6, -1e6]), E4M3, torch.Generator().manual_seed(0)).float()
    assert big.tolist() == [448.0, -448.0]


def test_a_scaled_fp8_linear_computes_close_to_its_float_original():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    layer = ScaledFp8Linear.from_linear(linear, compute_dtype=torch.float32)
    assert layer.weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    x = torch.randn(4, 16)
    rel = float((layer(x) - linear(x)).norm() / linear(x).norm())
    assert rel < 0.1
