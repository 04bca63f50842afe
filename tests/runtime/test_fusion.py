"""The one fused-weight formula (lorablend.runtime.fusion): ``W0 + Σ c_i ΔW_i`` in fp32 from the pristine weight, one cast;
the same bits whether written into a new tensor or into a given one."""

from __future__ import annotations

import pytest
import torch

from lorablend.runtime.fusion import fused_bias, fused_weight, has_bias_terms, low_rank_factors, one_thread
from lorablend.kinds import DoRADelta, FullDelta, LoHaDelta, LoKrDelta, LowRankDelta

from conftest import assert_same_computed


def _terms(g):
    return [
        (0.7, LowRankDelta(torch.randn(2, 8, 3, 3, generator=g), torch.randn(16, 2, 1, 1, generator=g), alpha=1.0)),
        (0.3, LoHaDelta(torch.randn(16, 2, generator=g), torch.randn(2, 72, generator=g), torch.randn(16, 2, generator=g),
                        torch.randn(2, 72, generator=g))),
    ]


def test_fused_weight_out_and_in_place_give_the_same_bits():
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(16, 8, 3, 3, generator=g)
    terms = _terms(g)
    new = fused_weight(w0, terms)
    into = torch.empty_like(w0)
    assert fused_weight(w0, terms, out=into) is into and torch.equal(into, new)
    half = torch.empty(w0.shape, dtype=torch.float16)
    assert torch.equal(fused_weight(w0, terms, out=half, safe=True), fused_weight(w0, terms, out_dtype=torch.float16))


def test_fused_weight_is_the_exact_sum_of_every_kind_from_the_pristine_weight():
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(12, 10, generator=g)
    lora = LowRankDelta(torch.randn(3, 10, generator=g), torch.randn(12, 3, generator=g), alpha=6.0)
    lokr = LoKrDelta(w1=torch.randn(3, 2, generator=g), w2=torch.randn(4, 5, generator=g))
    full = FullDelta(torch.randn(12, 10, generator=g))
    dora = DoRADelta(LowRankDelta(torch.randn(2, 10, generator=g), torch.randn(12, 2, generator=g)),
                     torch.rand(12, generator=g) + 0.5)
    terms = [(0.5, lora), (-0.25, lokr), (1.5, full), (0.8, dora)]
    expected = w0 + 0.5 * lora.delta_weight() - 0.25 * lokr.delta_weight() + 1.5 * full.delta_weight() \
        + 0.8 * dora.delta_weight(base=w0)  # DoRA relative to W0, never to a partly fused weight
    assert_same_computed(fused_weight(w0, terms), expected)


def test_one_cast_and_zero_weights_leave_the_pristine_bits():
    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(8, 6, generator=g).half()
    d = LowRankDelta(torch.randn(2, 6, generator=g), torch.randn(8, 2, generator=g))
    assert torch.equal(fused_weight(w0, [(0.0, d)]), w0)  # a term with weight 0 is skipped, not added as +0
    fused = fused_weight(w0, [(0.5, d)])
    assert fused.dtype == torch.float16
    assert torch.equal(fused, fused_weight(w0.float(), [(0.5, d)]).half())  # the fp32 sum, cast once


def test_safe_refuses_an_overflow_and_leaves_out_untouched():
    w0 = torch.full((4, 4), 60000.0, dtype=torch.float16)
    d = FullDelta(torch.full((4, 4), 60000.0))
    out = w0.clone()
    with pytest.raises(ValueError, match="layer.x.*NaN or Inf.*float16"):
        fused_weight(w0, [(1.0, d)], safe=True, key="layer.x", out=out)
    assert torch.equal(out, w0)


def test_bias_terms():
    full = FullDelta(torch.ones(3, 2), diff_b=torch.tensor([1.0, 2.0, 3.0]))
    plain = LowRankDelta(torch.ones(1, 2), torch.ones(3, 1))
    assert has_bias_terms([(0.5, full)]) and not has_bias_terms([(0.5, plain), (0.0, full)])
    b = fused_bias(torch.zeros(3, dtype=torch.bfloat16), [(0.5, full), (1.0, plain)])
    assert b.dtype == torch.bfloat16 and b.tolist() == [0.5, 1.0, 1.5]


def test_factor_work_runs_on_one_thread_and_the_count_comes_back():
    # the small factor casts / scales / copies of a fuse run single-threaded (parallel ops on them only wait for
    # busy cores: issue 19's Wan 14B fuse); the caller's thread count is put back, also when the block raises
    seen = []

    class Recording(LowRankDelta):
        def low_rank_factors(self):
            seen.append(torch.get_num_threads())
            return super().low_rank_factors()

    g = torch.Generator().manual_seed(6)
    d = Recording(torch.randn(2, 6, generator=g), torch.randn(8, 2, generator=g))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w0 = torch.randn(8, 6, generator=g)
        fused = fused_weight(w0, [(0.5, d)])
        assert seen == [1] and torch.get_num_threads() == 2
        assert torch.equal(fused, torch.addmm(w0, 0.5 * d.up, d.down))  # the same bits as the plain formula
        assert low_rank_factors([(0.5, d)]) is not None and seen == [1, 1] and torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="boom"), one_thread():
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
