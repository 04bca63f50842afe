"""kinds/dora.py: DoRA, W' = m · (W0 + ΔW) / ‖W0 + ΔW‖ (per output row, or per input column), as a delta W' − W0."""

from __future__ import annotations

import pytest
import torch

from lorablend.kinds import DoRADelta, LowRankDelta

from conftest import assert_same_computed

g = torch.Generator().manual_seed(4)
INNER = LowRankDelta(torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g), alpha=2.0)
W0 = torch.randn(4, 5, generator=g)


def test_out_axis_rescales_each_output_row_to_its_magnitude():
    m = torch.rand(4, generator=g) + 0.5
    merged = W0 + INNER.delta_weight()
    want = m[:, None] * merged / merged.norm(dim=1, keepdim=True) - W0
    assert_same_computed(DoRADelta(INNER, m, "out").delta_weight(base=W0), want)


def test_in_axis_rescales_each_input_column():
    m = torch.rand(1, 5, generator=g) + 0.5
    merged = W0 + INNER.delta_weight()
    want = m * merged / merged.norm(dim=0, keepdim=True) - W0
    assert_same_computed(DoRADelta(INNER, m, "in").delta_weight(base=W0), want)


def test_without_the_base_weight_the_delta_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match="pass base="):
        DoRADelta(INNER, torch.ones(4), "out").delta_weight()
    assert DoRADelta(INNER, torch.ones(4), "out").needs_base
