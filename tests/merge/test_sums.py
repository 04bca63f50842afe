"""merge/sums.py: what merge sums exactly whatever the method — tables, norms' vectors, bias differences — against
sums computed here by hand (tolerance: 1e-6 absolute on values of order 1, fp32 rounding of one multiply-add)."""

from __future__ import annotations

import pytest
import torch

from lorablend.errors import LoraCompatibilityError
from lorablend.kinds import FullDelta, LowRankDelta, TableDelta
from lorablend.merge.methods import LayerTerm
from lorablend.merge.sums import exact_bias, summed_layer

g = torch.Generator().manual_seed(11)
EXACT = dict(rtol=0, atol=1e-6)


def _t(*shape):
    return torch.randn(*shape, generator=g)


def test_tables_sum_in_their_own_kind():
    t1, t2 = _t(1, 6, 8), _t(1, 6, 8)
    summed, note = summed_layer("k", (LayerTerm("a", TableDelta(t1), 0.7), LayerTerm("b", TableDelta(t2), -0.4)))
    assert isinstance(summed, TableDelta) and summed.shape == (1, 6, 8) and "no LoRA form" in note
    torch.testing.assert_close(summed.diff_m, 0.7 * t1 - 0.4 * t2, **EXACT)


def test_a_norms_vector_and_its_bias_sum_as_a_full_diff():
    d1, b1, d2 = _t(8), _t(8), _t(8)
    terms = (LayerTerm("a", FullDelta(d1, diff_b=b1), 0.5), LayerTerm("b", FullDelta(d2), 2.0))
    summed, _ = summed_layer("k", terms)
    assert isinstance(summed, FullDelta)
    torch.testing.assert_close(summed.diff, 0.5 * d1 + 2.0 * d2, **EXACT)
    torch.testing.assert_close(summed.diff_b, 0.5 * b1, **EXACT)


def test_bias_differences_alone_stay_bias_differences():
    b1, b2 = _t(8), _t(8)
    summed, note = summed_layer("k", (LayerTerm("a", FullDelta(None, b1), 1.0), LayerTerm("b", FullDelta(None, b2), 3.0)))
    assert summed.diff is None and "bias" in note
    torch.testing.assert_close(summed.diff_b, b1 + 3.0 * b2, **EXACT)


def test_a_layer_with_a_lora_form_is_left_to_the_method_and_its_bias_summed():
    lora = LowRankDelta(_t(2, 6), _t(8, 2), alpha=4.0, diff_b=_t(8))
    bias_only = FullDelta(None, _t(8))
    terms = (LayerTerm("a", lora, 0.5), LayerTerm("b", bias_only, -1.0))
    assert summed_layer("k", terms) is None
    torch.testing.assert_close(exact_bias("k", terms), 0.5 * lora.diff_b - bias_only.diff_b, **EXACT)
    assert exact_bias("k", (LayerTerm("a", LowRankDelta(_t(2, 6), _t(8, 2)), 1.0),)) is None


def test_tables_of_other_models_are_refused_by_key_and_adapter():
    with pytest.raises(LoraCompatibilityError, match=r"blocks.0.*'b'.*another model"):
        summed_layer("transformer.blocks.0.scale_shift_table",
                     (LayerTerm("a", TableDelta(_t(1, 6, 8)), 1.0), LayerTerm("b", TableDelta(_t(1, 6, 4)), 1.0)))
    with pytest.raises(LoraCompatibilityError, match=r"bias differences of different shapes.*a: \(8,\), b: \(4,\)"):
        exact_bias("k", (LayerTerm("a", FullDelta(None, _t(8)), 1.0), LayerTerm("b", FullDelta(None, _t(4)), 1.0)))


def test_a_factorwise_method_sums_whole_weight_differences_and_leaves_factors_to_itself():
    d1, d2 = _t(8, 6), _t(8, 6)
    terms = (LayerTerm("a", FullDelta(d1), 0.5), LayerTerm("b", FullDelta(d2), 2.0))
    assert summed_layer("k", terms) is None  # cat / svd make a LoRA of it
    summed, note = summed_layer("k", terms, factorwise=True)
    assert summed.kind == "full" and "factor-wise" in note
    torch.testing.assert_close(summed.diff, 0.5 * d1 + 2.0 * d2, **EXACT)
    mixed = (terms[0], LayerTerm("b", LowRankDelta(_t(2, 6), _t(8, 2)), 1.0))
    assert summed_layer("k", mixed, factorwise=True) is None  # the method refuses the mix by name
