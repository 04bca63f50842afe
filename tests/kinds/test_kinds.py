"""Every Delta kind answers the same questions (lorablend.kinds): its shape and ΔW agree, its factors multiply to
its ΔW, it fits the weights it was made for and names the ones it does not, and what it writes in a kohya file
reads back as the same kind with the same tensors."""

from __future__ import annotations

import math

import pytest
import torch

from lorablend.io.deltas import ModuleGroup, build_delta
from lorablend.kinds import (KINDS, DeltaProblem, DoRADelta, FullDelta, LoHaDelta, LoKrDelta, LowRankDelta, SetDelta,
                             TableDelta)

from conftest import assert_same_computed


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)))


SAMPLES = {
    "lora linear": lambda: LowRankDelta(rnd(4, 12), rnd(10, 4), alpha=2.0),
    "lora conv": lambda: LowRankDelta(rnd(4, 6, 3, 3), rnd(8, 4, 1, 1), alpha=8.0),
    "lora tucker": lambda: LowRankDelta(rnd(4, 6, 1, 1), rnd(8, 4, 1, 1), mid=rnd(4, 4, 3, 3), alpha=4.0),
    "loha": lambda: LoHaDelta(rnd(10, 2), rnd(2, 12), rnd(10, 2, seed=1), rnd(2, 12, seed=1), alpha=1.0),
    "loha tucker": lambda: LoHaDelta(rnd(2, 8), rnd(2, 6), rnd(2, 8, seed=1), rnd(2, 6, seed=1), alpha=2.0,
                                     t1=rnd(2, 2, 3, 3), t2=rnd(2, 2, 3, 3, seed=1)),
    "lokr full w1": lambda: LoKrDelta(w1=rnd(2, 3), w2_a=rnd(5, 2), w2_b=rnd(2, 4), alpha=1.0),
    "lokr both low rank": lambda: LoKrDelta(w1_a=rnd(4, 2), w1_b=rnd(2, 6), w2_a=rnd(5, 2), w2_b=rnd(2, 7), alpha=1.0),
    "lokr conv": lambda: LoKrDelta(w1=rnd(3, 2), w2=rnd(6, 4, 3, 3)),
    "full": lambda: FullDelta(rnd(6, 5), diff_b=rnd(6)),
    "dora out": lambda: DoRADelta(LowRankDelta(rnd(4, 12), rnd(10, 4), alpha=2.0), rnd(10).abs() + 1, "out"),
    "dora in": lambda: DoRADelta(LowRankDelta(rnd(4, 12), rnd(10, 4), alpha=2.0), rnd(1, 12).abs() + 1, "in"),
    "lora bias": lambda: LowRankDelta(rnd(4, 12), rnd(10, 4), alpha=2.0, bias=rnd(10, seed=3)),
    "set": lambda: SetDelta(rnd(10, 12, seed=4)),
    "lora diff_b": lambda: LowRankDelta(rnd(4, 12), rnd(10, 4), alpha=2.0, diff_b=rnd(10, seed=5)),
    "table": lambda: TableDelta(rnd(1, 6, 8, seed=6)),
}
BIASED = ("full", "lora bias", "lora diff_b")
NEEDS_BASE = ("dora out", "dora in", "set")
NO_KOHYA = ("lora bias",)  # a LoRA bias has no kohya spelling: refused, not dropped


def weight_for(delta) -> torch.Tensor:
    return rnd(*delta.shape, seed=5)


@pytest.mark.parametrize("name", SAMPLES)
def test_shape_out_features_and_delta_weight_agree(name):
    d = SAMPLES[name]()
    base = weight_for(d) if d.needs_base else None
    dense = d.delta_weight(base=base)
    assert tuple(dense.shape) == d.shape and dense.dtype == torch.float32
    assert d.out_features == d.shape[0]
    assert d.fit_problem(d.shape) is None
    wrong = (d.shape[0] + 1, *d.shape[1:])
    assert str(d.shape) in d.fit_problem(wrong) and str(wrong) in d.fit_problem(wrong)


@pytest.mark.parametrize("name", SAMPLES)
def test_factors_multiply_to_the_delta(name):
    d = SAMPLES[name]()
    dense = d.delta_weight(base=weight_for(d) if d.needs_base else None).reshape(d.shape[0], -1)
    low = d.low_rank_factors()
    assert (low is not None) == (d.kind == "lora")  # only a LoRA is one cheap low-rank pair
    exact = d.exact_factors()
    if exact is not None:
        assert_same_computed(exact[0] @ exact[1], dense)
        assert exact[0].shape[1] < min(dense.shape)  # factors are offered only where they are smaller
    if low is not None:
        assert_same_computed(low[0] @ low[1], dense)


@pytest.mark.parametrize("name", SAMPLES)
def test_bias_base_and_offline_view(name):
    d = SAMPLES[name]()
    assert d.changes_bias == (name in BIASED)
    assert (d.delta_bias() is not None) == d.changes_bias
    assert d.needs_base == (name in NEEDS_BASE)
    free = d.base_free()
    assert not free.needs_base and (free is d) == (not d.needs_base)
    if d.needs_base:
        with pytest.raises(ValueError, match="base"):
            d.delta_weight()


# kohya suffix -> the role readers sort it into
_ROLE = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "dora_scale": "dora_scale"}


@pytest.mark.parametrize("name", [n for n in SAMPLES if n not in NO_KOHYA])
def test_kohya_names_read_back_as_the_same_kind_and_tensors(name):
    d = SAMPLES[name]()
    written = dict(d.kohya_tensors(d.shape))
    group = ModuleGroup("m", {_ROLE.get(suffix, suffix): f"m.{suffix}" for suffix in written})
    back = build_delta(group, {f"m.{suffix}": t for suffix, t in written.items()})
    assert type(back) is type(d) and back.kind == d.kind and back.scale == d.scale
    if isinstance(d, DoRADelta):
        assert back.axis == d.axis and type(back.inner) is type(d.inner)
    for x, y in zip(d.tensors(), back.tensors()):  # tensors we write: bit for bit (module-shaped views allowed)
        assert torch.equal(x.flatten(), y.flatten())


def test_which_kinds_a_peft_file_holds():
    problems = {name: SAMPLES[name]().peft_problem() for name in SAMPLES}
    assert problems["lora linear"] is None and problems["lora tucker"] is None and problems["dora out"] is None
    assert problems["loha"] == "loha" and problems["lokr conv"] == "lokr" and problems["full"] == "full"
    assert problems["dora in"] == "DoRA with per-input-column magnitudes"
    assert DoRADelta(SAMPLES["loha"](), rnd(10).abs()).peft_problem() == "DoRA on loha"
    tensors = SAMPLES["dora out"]().peft_tensors((10, 12))
    assert set(tensors) == {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}


def test_scale_is_alpha_over_rank_and_one_without_alpha():
    assert LowRankDelta(rnd(4, 3), rnd(2, 4), alpha=2.0).scale == 0.5
    assert LowRankDelta(rnd(4, 3), rnd(2, 4)).scale == 1.0
    assert LowRankDelta(rnd(4, 3), rnd(2, 4), alpha=0.0).scale == 1.0  # kohya's rule, not ComfyUI's zero
    assert FullDelta(rnd(2, 2)).scale == 1.0 and FullDelta(rnd(2, 2)).rank is None


def test_the_registry_tells_kinds_apart_by_their_roles():
    for i, a in enumerate(KINDS):
        for b in KINDS[i + 1:]:
            assert not (a.roles & b.roles), (a.kind, b.kind)
        assert not (a.roles & DoRADelta.roles)
    assert {k.kind for k in KINDS} == {"lora", "loha", "lokr", "full", "set", "table"}


def test_a_lora_bias_is_scaled_refused_by_kohya_and_written_by_peft():
    d = SAMPLES["lora bias"]()
    assert_same_computed(d.delta_bias(), d.bias * 0.5)  # alpha/rank, as PEFT's forward and merge add it
    with pytest.raises(ValueError, match="diffusers format"):
        dict(d.kohya_tensors(d.shape))
    assert torch.equal(d.peft_tensors(d.shape)["lora_B.bias"], d.bias)
    both = LowRankDelta(d.down, d.up, alpha=2.0, bias=d.bias, diff_b=rnd(10, seed=5))  # diff_b: added unscaled
    assert_same_computed(both.delta_bias(), d.bias * 0.5 + rnd(10, seed=5))
    # diff_b is PEFT's lora_B.bias / scale where that is exact (scale 0.5 here); else (scale 0.75) refused
    exact = SAMPLES["lora diff_b"]()
    assert exact.peft_problem() is None and torch.equal(exact.peft_tensors(exact.shape)["lora_B.bias"] * 0.5, exact.diff_b)
    # 1000 values: about one in eight does not come back from / 0.75 * 0.75
    inexact = LowRankDelta(exact.down, rnd(1000, 4), alpha=3.0, diff_b=rnd(1000, seed=5))
    assert inexact.peft_problem() == "LoRA with a bias difference (diff_b)"


def test_a_role_no_kind_applies_is_refused_not_dropped():
    group = ModuleGroup("m", {"hada_w1_a": "a", "hada_w1_b": "b", "hada_w2_a": "c", "hada_w2_b": "d", "diff_b": "e"})
    tensors = {"a": rnd(4, 2), "b": rnd(2, 3), "c": rnd(4, 2), "d": rnd(2, 3), "e": rnd(4)}
    with pytest.raises(DeltaProblem, match=r"a loha module with \['diff_b'\] beside it"):
        build_delta(group, tensors)


# Row splits: for every kind, the delta of some output rows equals those rows of the full ΔW (and bias).
SPANS = [((0, 4),), ((4, 10),), ((6, 10), (0, 6)), ((2, 4), (8, 10))]


def _dense(d, base):
    return d.delta_weight(base=base if d.needs_base else None)


@pytest.mark.parametrize("name", [n for n in SAMPLES if n not in ("dora in", "table")])  # (tests of their own)
@pytest.mark.parametrize("spans", SPANS)
def test_rows_of_a_delta_are_those_rows_of_its_weight(name, spans):
    d = SAMPLES[name]()
    if d.out_features < 10:
        spans = [(a * d.out_features // 10, b * d.out_features // 10) for a, b in spans]
        spans = [(a, b) for a, b in spans if b > a]
    rows = torch.cat([torch.arange(a, b) for a, b in spans])
    base = weight_for(d)
    part = d.take_rows(spans)
    assert part.out_features == len(rows) and part.shape[1:] == d.shape[1:]
    assert_same_computed(_dense(part, base[rows]), _dense(d, base)[rows])
    if d.changes_bias:
        assert_same_computed(part.delta_bias(), d.delta_bias()[rows])
    assert part.scale == d.scale or part.kind == "full"
    if len(spans) == 1:
        assert_same_computed(_dense(d.rows(*spans[0]), base[rows]), _dense(part, base[rows]))


def test_a_split_stays_the_same_kind_where_the_kind_allows():
    lora = SAMPLES["lora linear"]()
    q = lora.rows(0, 4)
    assert q.kind == "lora" and q.down is lora.down and q.rank == lora.rank  # the down factor is shared
    lokr = LoKrDelta(w1=rnd(3, 2), w2_a=rnd(4, 2), w2_b=rnd(2, 5), alpha=1.0)  # 12 rows: blocks of 4
    assert lokr.rows(4, 12).kind == "lokr" and lokr.rows(4, 12).w1.shape == (2, 2)
    dense = lokr.rows(2, 6)  # cuts through a copy of w2: exact, but dense
    assert dense.kind == "full"
    assert_same_computed(dense.delta_weight(), lokr.delta_weight()[2:6])
    assert SAMPLES["loha"]().rows(0, 5).kind == "loha"


def test_rows_that_cannot_be_split_exactly_are_refused_with_why():
    with pytest.raises(DeltaProblem, match="per-input-column"):
        SAMPLES["dora in"]().rows(0, 4)
    with pytest.raises(DeltaProblem, match="not inside the 10 output rows"):
        SAMPLES["lora linear"]().rows(8, 12)


def test_a_bias_difference_alone_changes_the_bias_only():
    d = FullDelta(None, diff_b=rnd(6))
    assert d.changes_bias and d.fit_problem((6, 5)) is None and "has 6 values" in d.fit_problem((7, 5))
    assert torch.equal(d.delta_weight((6, 5)), torch.zeros(6, 5)) and torch.equal(d.delta_bias(), d.diff_b)
    assert torch.equal(d.rows(2, 4).delta_bias(), d.diff_b[2:4])
    assert dict(d.kohya_tensors((6, 5))).keys() == {"diff_b"}


@pytest.mark.parametrize("name", SAMPLES)
def test_the_old_weight_shape_keyword_still_works_with_a_deprecation_warning(name):
    """delta_weight(weight_shape=...) became delta_weight(shape=...): the old keyword gives the same bits, warned."""
    d = SAMPLES[name]()
    base = weight_for(d) if d.needs_base else None
    flat = (d.shape[0], math.prod(d.shape[1:]))
    with pytest.warns(DeprecationWarning, match=r"weight_shape=.*removed in lorablend 0\.3.*shape="):
        old = d.delta_weight(weight_shape=flat, base=base)
    assert torch.equal(old, d.delta_weight(shape=flat, base=base))
    with pytest.raises(TypeError, match="pass shape= only"):
        d.delta_weight(flat, weight_shape=flat)


def test_natural_shape_is_the_shape_with_a_deprecation_warning():
    d = SAMPLES["lora conv"]()
    with pytest.warns(DeprecationWarning, match="natural_shape.*removed in lorablend 0.3"):
        assert d.natural_shape() == d.shape
