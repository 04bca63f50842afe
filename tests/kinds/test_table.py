"""kinds/table.py: a modulation table's difference (``diff_m``); its delta is the tensor itself, in its own shape."""

from __future__ import annotations

import pytest
import torch

from lorablend.io.deltas import ModuleGroup, build_delta
from lorablend.kinds import DeltaProblem, TableDelta

g = torch.Generator().manual_seed(7)


def test_the_delta_is_the_table_difference_itself():
    diff = torch.randn(1, 6, 8, generator=g, dtype=torch.float64)
    d = TableDelta(diff)
    assert d.shape == (1, 6, 8) and d.rank is None and d.alpha is None and d.scale == 1.0
    assert torch.equal(d.delta_weight(), diff.float()) and d.delta_weight().dtype == torch.float32
    assert d.low_rank_factors() is None and not d.changes_bias and not d.needs_base
    # a diffusers / PEFT file holds no table: ComfyUI names do (io/write_diffusers.py names that layout)
    assert d.peft_problem() == "modulation table (diff_m)"


def test_no_lora_form_so_merge_sums_it_in_its_own_kind():
    d = TableDelta(torch.randn(1, 6, 8, generator=g))
    assert not d.has_lora_form and d.changes_weight
    total = torch.randn(1, 6, 8, generator=g)
    summed = d.with_sum(total, None)
    assert isinstance(summed, TableDelta) and summed.diff_m is total
    for weight, bias in ((None, None), (torch.zeros(1, 2, 24), None), (total, torch.zeros(6))):
        with pytest.raises(DeltaProblem, match=r"one tensor of shape \(1, 6, 8\)"):
            d.with_sum(weight, bias)


def test_only_the_tables_own_shape_fits():
    d = TableDelta(torch.zeros(1, 6, 8))
    assert d.fit_problem((1, 6, 8)) is None
    # same element count, other layout (a head's (1, 2, 24)): a table's rows are shift / scale / gate, never reshaped
    assert "(1, 6, 8)" in d.fit_problem((1, 2, 24)) and "another model" in d.fit_problem((1, 2, 24))
    with pytest.raises(DeltaProblem, match="never split"):
        d.take_rows(((0, 1),))


def test_read_from_its_role_and_refused_when_it_is_no_table():
    t = torch.randn(1, 2, 8, generator=g)
    back = build_delta(ModuleGroup("blocks.0", {"diff_m": "k"}), {"k": t})
    assert isinstance(back, TableDelta) and back.diff_m is t
    assert dict(back.kohya_tensors(None)) == {"diff_m": t}
    with pytest.raises(DeltaProblem, match=r"diff_m\) of shape \(6, 8\): a table has three axes"):
        TableDelta.from_roles({"diff_m": torch.zeros(6, 8)}, None)
