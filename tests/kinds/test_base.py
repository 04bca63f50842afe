"""kinds/base.py: what every kind answers, and the helpers the kinds share (scale, shapes, row spans)."""

from __future__ import annotations

import pytest
import torch

from lorablend.kinds import KINDS, DeltaKind, LowRankDelta
from lorablend.kinds.base import check_spans, fit_to_shape, scale_of, take, written_alpha


def test_scale_is_alpha_over_rank_and_one_without_alpha():
    assert scale_of(8.0, 16) == 0.5 and scale_of(None, 16) == 1.0 and scale_of(4.0, None) == 1.0
    assert scale_of(0.0, 16) == 1.0


def test_fit_to_shape_reshapes_only_what_has_the_same_size():
    assert fit_to_shape(torch.zeros(4, 18), (4, 2, 3, 3), "LoKr").shape == (4, 2, 3, 3)
    with pytest.raises(ValueError):
        fit_to_shape(torch.zeros(4, 18), (4, 5), "LoKr")


def test_row_spans_are_checked_and_taken_in_their_order():
    assert check_spans(((0, 2), (4, 6)), 6, "LoRA") == [(0, 2), (4, 6)]
    assert take(torch.arange(6), ((4, 6), (0, 2))).tolist() == [4, 5, 0, 1]
    for bad in (((0, 7),), ((3, 2),), ((-1, 2),)):
        with pytest.raises(ValueError):
            check_spans(bad, 6, "LoRA")


def test_a_zero_alpha_is_written_as_the_rank_so_every_loader_reads_scale_one():
    # lorablend and kohya read alpha 0 as scale 1, ComfyUI as scale 0: the rank means 1 to all of them
    zero = LowRankDelta(torch.ones(4, 3), torch.ones(2, 4), alpha=0.0)
    assert scale_of(zero.alpha, zero.rank) == 1.0 and written_alpha(zero) == 4.0
    assert written_alpha(LowRankDelta(torch.ones(4, 3), torch.ones(2, 4))) is None
    assert written_alpha(LowRankDelta(torch.ones(4, 3), torch.ones(2, 4), alpha=2.5)) == 2.5


def test_every_registered_kind_is_a_deltakind_with_its_roles():
    assert all(issubclass(k, DeltaKind) and k.roles for k in KINDS)


def test_by_default_a_delta_has_a_lora_form_and_is_not_summed_in_its_own_kind():
    from lorablend.kinds import DeltaProblem, LowRankDelta

    d = LowRankDelta(torch.ones(2, 3), torch.ones(4, 2))
    assert d.has_lora_form and d.changes_weight
    with pytest.raises(DeltaProblem, match="merged as a LoRA"):
        d.with_sum(torch.zeros(4, 3), None)
