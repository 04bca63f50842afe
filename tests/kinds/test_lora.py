"""kinds/lora.py: LoRA / LoCon, ΔW = alpha/rank · up @ down (through a Tucker mid core for convs)."""

from __future__ import annotations

import pytest
import torch

from lorablend.kinds import LowRankDelta

from conftest import assert_same_computed

g = torch.Generator().manual_seed(0)
DOWN, UP = torch.randn(4, 12, generator=g), torch.randn(10, 4, generator=g)


def test_linear_delta_is_alpha_over_rank_times_up_down():
    d = LowRankDelta(DOWN, UP, alpha=2.0)
    assert d.rank == 4 and d.shape == (10, 12) and d.scale == 0.5
    assert_same_computed(d.delta_weight(), 0.5 * UP @ DOWN)
    assert LowRankDelta(DOWN, UP).scale == 1.0  # no alpha: scale 1, as diffusers reads a file without one


def test_a_conv_lora_is_a_kxk_down_then_a_1x1_up():
    down, up = torch.randn(2, 3, 3, 3, generator=g), torch.randn(5, 2, 1, 1, generator=g)
    d = LowRankDelta(down, up, alpha=2.0)
    want = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    assert d.shape == (5, 3, 3, 3)
    assert_same_computed(d.delta_weight(), want)


def test_rows_are_the_dense_delta_cut_with_the_down_shared():
    d = LowRankDelta(DOWN, UP, alpha=8.0)
    dense = d.delta_weight()
    rows = d.take_rows(((6, 10), (0, 2)))
    assert isinstance(rows, LowRankDelta) and torch.equal(rows.down, d.down)  # one down shared by the split ups
    assert_same_computed(rows.delta_weight(), torch.cat([dense[6:10], dense[0:2]]))


def test_low_rank_factors_give_the_delta_and_a_wrong_shape_is_named():
    d = LowRankDelta(DOWN, UP, alpha=2.0)
    up, down = d.low_rank_factors()
    assert_same_computed(up @ down, d.delta_weight())
    problem = d.fit_problem((10, 13))
    assert "(10, 12)" in problem and "(10, 13)" in problem


def test_rows_out_of_range_are_refused():
    with pytest.raises(ValueError):
        LowRankDelta(DOWN, UP).take_rows(((8, 11),))
