"""kinds/loha.py: LyCORIS LoHa, ΔW = scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)."""

from __future__ import annotations

import torch

from lorablend.kinds import LoHaDelta

from conftest import assert_same_computed

g = torch.Generator().manual_seed(1)
W1A, W1B, W2A, W2B = (torch.randn(8, 2, generator=g), torch.randn(2, 6, generator=g), torch.randn(8, 2, generator=g),
                      torch.randn(2, 6, generator=g))


def test_delta_is_the_hadamard_product_of_two_low_rank_products_times_alpha_over_rank():
    d = LoHaDelta(W1A, W1B, W2A, W2B, alpha=1.0)
    assert d.rank == 2 and d.shape == (8, 6)
    assert_same_computed(d.delta_weight(), 0.5 * (W1A @ W1B) * (W2A @ W2B))


def test_exact_factors_multiply_to_the_delta_at_rank_r1_times_r2():
    d = LoHaDelta(W1A, W1B, W2A, W2B, alpha=3.0)
    up, down = d.exact_factors()
    assert up.shape == (8, 4) and down.shape == (4, 6)
    assert_same_computed(up @ down, d.delta_weight())


def test_rows_of_a_loha_are_the_rows_of_its_delta():
    d = LoHaDelta(W1A, W1B, W2A, W2B, alpha=1.0)
    assert_same_computed(d.take_rows(((2, 5),)).delta_weight(), d.delta_weight()[2:5])
