"""kinds/replace.py: a replacement weight; its delta is the new weight minus the base."""

from __future__ import annotations

import pytest
import torch

from lorablend.kinds import SetDelta

g = torch.Generator().manual_seed(5)


def test_the_delta_is_the_new_weight_minus_the_base():
    new, base = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    d = SetDelta(new)
    assert d.needs_base and d.shape == (3, 4)
    assert torch.equal(d.delta_weight(base=base), new - base)
    with pytest.raises(ValueError, match="pass base="):
        d.delta_weight()


def test_offline_a_replacement_shows_no_change_and_rows_cut_the_new_weight():
    new = torch.randn(3, 4, generator=g)
    assert torch.equal(SetDelta(new).base_free().delta_weight(), torch.zeros(3, 4))
    assert torch.equal(SetDelta(new).take_rows(((1, 3),)).value, new[1:3])
