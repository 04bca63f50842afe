"""kinds/lokr.py: LyCORIS LoKr, ΔW = scale · kron(w1, w2), each factor full or low-rank."""

from __future__ import annotations

import torch

from lorablend.kinds import LoKrDelta

from conftest import assert_same_computed

g = torch.Generator().manual_seed(2)


def test_full_factors_give_the_kronecker_product_at_scale_one():
    w1, w2 = torch.randn(2, 3, generator=g), torch.randn(5, 4, generator=g)
    d = LoKrDelta(w1=w1, w2=w2, alpha=7.0)
    assert d.rank is None and d.scale == 1.0 and d.shape == (10, 12)
    assert_same_computed(d.delta_weight(), torch.kron(w1, w2))


def test_a_low_rank_w2_is_a_product_scaled_by_alpha_over_its_rank():
    w1, a, b = torch.randn(2, 3, generator=g), torch.randn(5, 2, generator=g), torch.randn(2, 4, generator=g)
    d = LoKrDelta(w1=w1, w2_a=a, w2_b=b, alpha=1.0)
    assert d.rank == 2
    assert_same_computed(d.delta_weight(), 0.5 * torch.kron(w1, a @ b))
    up, down = d.exact_factors()
    assert_same_computed(up @ down, d.delta_weight())


def test_rows_of_a_lokr_are_the_rows_of_its_delta():
    d = LoKrDelta(w1=torch.randn(2, 3, generator=g), w2=torch.randn(5, 4, generator=g))
    assert_same_computed(d.take_rows(((5, 10),)).delta_weight(), d.delta_weight()[5:10])
    assert_same_computed(d.take_rows(((1, 3), (7, 9))).delta_weight(), d.delta_weight()[[1, 2, 7, 8]])
