"""lorablend.merge against the exact math: cat, svd (rank / energy / clamp), mixed kinds, block weights, errors.

The reference everywhere is the exact weighted sum ``M = Σ w_i ΔW_i`` computed densely in float64 from each
Delta's own ``delta_weight()`` (which carries alpha/rank once); the PEFT parity tests live in test_merge_peft.py.
"""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

from lorablend.adapter import Adapter, DoRADelta, FullDelta, LoHaDelta, LoKrDelta, LowRankDelta
from lorablend.errors import LoraCompatibilityError
from lorablend.merge import MergeReport, merge, merge_with_report

from conftest import assert_same_computed

# The module itself (for monkeypatching): `lorablend.merge` the attribute is meant to be the function.
merge_mod = importlib.import_module("lorablend.merge")

KEY_Q = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
KEY_OUT = "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
KEY_TE = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
KEY_CONV = "unet.down_blocks.0.resnets.0.conv1"


def lora(out: int, inp: int, r: int, alpha: float | None = None, seed: int = 0, conv: tuple[int, int] | None = None) -> LowRankDelta:
    g = torch.Generator().manual_seed(seed)
    if conv is None:
        return LowRankDelta(down=torch.randn(r, inp, generator=g), up=torch.randn(out, r, generator=g), alpha=alpha)
    kh, kw = conv
    return LowRankDelta(
        down=torch.randn(r, inp, kh, kw, generator=g), up=torch.randn(out, r, 1, 1, generator=g), alpha=alpha
    )


def exact_sum(adapters, weights, key) -> torch.Tensor:
    """Σ w_i ΔW_i in float64, flattened to (out, -1); layers missing from an adapter count as zero."""
    total = None
    for a, w in zip(adapters, weights):
        if key not in a.deltas:
            continue
        d = a.deltas[key].delta_weight().double()
        d = d.reshape(d.shape[0], -1) * w
        total = d if total is None else total + d
    return total


def dense_truncation(m: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    approx = (u[:, :k] * s[:k]) @ vh[:k]
    return approx, float((m - approx).norm() / m.norm())


def flat(delta) -> torch.Tensor:
    d = delta.delta_weight().double()
    return d.reshape(d.shape[0], -1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture
def pair():
    # alpha ≠ rank on both (scales 0.25 and 2.0): the case where a double-applied scale shows.
    a = Adapter("a", "sd1", {KEY_Q: lora(40, 24, 4, alpha=1.0, seed=1), KEY_TE: lora(16, 16, 4, alpha=1.0, seed=2)})
    b = Adapter("b", "sd1", {KEY_Q: lora(40, 24, 8, alpha=16.0, seed=3), KEY_OUT: lora(40, 24, 8, seed=4)})
    return a, b


def test_lorablend_merge_is_the_package_and_callable_as_the_function(pair):
    """`import lorablend.merge` is the package; `lorablend.merge(adapters, weights)` merges; neither shadows."""
    import lorablend
    import lorablend.merge as package

    assert package is merge_mod is lorablend.merge and package.MergeReport is MergeReport and package.merge is merge
    called = lorablend.merge(list(pair), [0.7, -0.4], method="cat")
    direct = merge(list(pair), [0.7, -0.4], method="cat")
    assert called.deltas.keys() == direct.deltas.keys()
    assert all(torch.equal(called.deltas[k].up, direct.deltas[k].up) and
               torch.equal(called.deltas[k].down, direct.deltas[k].down) for k in direct.deltas)


# ------------------------------------------------------------------------------------------------ cat


def test_cat_is_the_stacked_factors_bit_for_bit(pair):
    a, b = pair
    weights = [0.7, -0.8]
    merged = merge([a, b], weights, method="cat")
    da, db = a.deltas[KEY_Q], b.deltas[KEY_Q]
    ups = torch.cat([0.7 * da.factors()[0], -0.8 * db.factors()[0]], dim=1)
    downs = torch.cat([da.factors()[1], db.factors()[1]], dim=0)
    result = merged.deltas[KEY_Q]
    # What "bit for bit" means here: the result's factors are exactly the stacked, weighted factors (alpha ==
    # rank, so its scale multiplies by exactly 1.0): bits are claimed for the tensors cat writes. Its ΔW is a
    # product computed on other buffers, so it is compared within a tolerance, like the exact sum below.
    up, down = result.factors()
    assert torch.equal(up, ups) and torch.equal(down, downs)
    assert_same_computed(result.delta_weight(), ups @ downs)
    assert result.rank == 12 and result.alpha == 12.0 and result.scale == 1.0
    assert torch.allclose(result.delta_weight().double(), exact_sum([a, b], weights, KEY_Q), rtol=0, atol=1e-6 * 40)
    assert rel(flat(result), exact_sum([a, b], weights, KEY_Q)) < 1e-6
    # Layers present in only one adapter keep their own rank and are exact too.
    assert merged.deltas[KEY_TE].rank == 4 and merged.deltas[KEY_OUT].rank == 8
    assert rel(flat(merged.deltas[KEY_OUT]), exact_sum([a, b], weights, KEY_OUT)) < 1e-6


def test_cat_conv_and_tucker_shapes():
    g = torch.Generator().manual_seed(0)
    tucker = LowRankDelta(
        down=torch.randn(3, 6, 1, 1, generator=g),
        up=torch.randn(5, 3, 1, 1, generator=g),
        mid=torch.randn(3, 3, 3, 3, generator=g),
        alpha=1.5,
    )
    a = Adapter("a", "sd1", {KEY_CONV: lora(5, 6, 2, alpha=1.0, conv=(3, 3))})
    b = Adapter("b", "sd1", {KEY_CONV: tucker})
    merged = merge([a, b], [1.0, 0.5], method="cat")
    d = merged.deltas[KEY_CONV]
    assert d.down.shape == (5, 6, 3, 3) and d.up.shape == (5, 5, 1, 1)
    assert d.delta_weight().shape == (5, 6, 3, 3)
    assert rel(flat(d), exact_sum([a, b], [1.0, 0.5], KEY_CONV)) < 1e-6


def test_cat_of_every_kind_is_exact():
    g = torch.Generator().manual_seed(7)
    loha = LoHaDelta(
        w1_a=torch.randn(30, 2, generator=g), w1_b=torch.randn(2, 20, generator=g),
        w2_a=torch.randn(30, 2, generator=g), w2_b=torch.randn(2, 20, generator=g), alpha=1.0,
    )
    lokr = LoKrDelta(w1=torch.randn(3, 4, generator=g), w2_a=torch.randn(10, 2, generator=g),
                     w2_b=torch.randn(2, 5, generator=g), alpha=1.0)
    full = FullDelta(diff=torch.randn(30, 20, generator=g))
    adapters = [
        Adapter("lora", "sdxl", {KEY_Q: lora(30, 20, 4, alpha=2.0)}),
        Adapter("loha", "sdxl", {KEY_Q: loha}),
        Adapter("lokr", "sdxl", {KEY_Q: lokr}),
        Adapter("full", "sdxl", {KEY_Q: full}),
    ]
    weights = [0.5, 1.0, -0.7, 0.2]
    merged, report = merge_with_report(adapters, weights, method="cat")
    # LoHa joins at rank 2·2 (Khatri-Rao), LoKr at rank(w1)·rank(w2) = 3·2 (Kronecker factors), the full
    # diff as (ΔW, I) at min(out, in) = 20.
    assert merged.deltas[KEY_Q].rank == 4 + 4 + 6 + 20
    assert rel(flat(merged.deltas[KEY_Q]), exact_sum(adapters, weights, KEY_Q)) < 1e-6
    assert report.layers[0].rel_error == 0.0


# ------------------------------------------------------------------------------------------------ svd


@pytest.mark.parametrize("k", [1, 4, 8])
def test_svd_fixed_rank_is_the_dense_optimum_with_alpha_not_rank(pair, k):
    a, b = pair
    weights = [0.7, 0.8]
    merged, report = merge_with_report([a, b], weights, method="svd", rank=k)
    m = exact_sum([a, b], weights, KEY_Q)
    best, best_err = dense_truncation(m, k)
    ours = flat(merged.deltas[KEY_Q])
    assert merged.deltas[KEY_Q].rank == k and merged.deltas[KEY_Q].scale == 1.0
    # Same matrix as the truncated dense SVD of the exact sum (unique: random spectra have gaps) ...
    assert rel(ours, best) < 1e-5
    # ... so the same error, and the reported error (from the singular tail, no dense ΔW) is that error.
    layer = next(l for l in report.layers if l.key == KEY_Q)
    assert layer.path == "factors"
    assert math.isclose(rel(ours, m), best_err, rel_tol=1e-5, abs_tol=1e-7)
    assert math.isclose(layer.rel_error, best_err, rel_tol=1e-5, abs_tol=1e-7)


def test_svd_applies_the_scale_once_not_twice():
    # PEFT's svd path was reported to multiply by alpha/rank twice; with rank large enough for an exact
    # truncation the merge must equal Σ w_i s_i B_i A_i exactly, not s_i times that.
    a = Adapter("a", "sd1", {KEY_Q: lora(12, 16, 4, alpha=1.0, seed=11)})
    b = Adapter("b", "sd1", {KEY_Q: lora(12, 16, 4, alpha=1.0, seed=12)})
    merged = merge([a, b], [0.7, 0.5], method="svd", rank=8)
    da, db = a.deltas[KEY_Q], b.deltas[KEY_Q]
    expected = 0.25 * (0.7 * da.up @ da.down + 0.5 * db.up @ db.down)
    assert rel(merged.deltas[KEY_Q].delta_weight(), expected) < 1e-5


def test_svd_default_rank_is_the_largest_input_rank_per_layer(pair):
    a, b = pair
    merged = merge([a, b], [1.0, 1.0])  # method="svd" is the default
    assert merged.deltas[KEY_Q].rank == 8
    assert merged.deltas[KEY_TE].rank == 4  # only a (rank 4) has it: exact copy at its own rank
    assert rel(flat(merged.deltas[KEY_TE]), flat(a.deltas[KEY_TE])) < 1e-5


def test_svd_energy_picks_the_smallest_rank_keeping_that_energy(pair):
    a, b = pair
    m = exact_sum([a, b], [0.7, 0.8], KEY_Q)
    s = torch.linalg.svdvals(m)
    cum = torch.cumsum(s**2, 0) / (s**2).sum()
    for energy in (0.5, 0.9, 0.99):
        k = int((cum < energy).sum()) + 1
        merged, report = merge_with_report([a, b], [0.7, 0.8], method="svd", energy=energy)
        assert merged.deltas[KEY_Q].rank == k
        best, best_err = dense_truncation(m, k)
        assert rel(flat(merged.deltas[KEY_Q]), best) < 1e-5
        assert best_err <= math.sqrt(1 - energy) + 1e-6
    # rank= caps what energy= asks for.
    capped = merge([a, b], [0.7, 0.8], method="svd", energy=0.999999, rank=3)
    assert capped.deltas[KEY_Q].rank == 3


def test_svd_conv_layer_shapes_and_optimum():
    a = Adapter("a", "sd1", {KEY_CONV: lora(12, 6, 4, alpha=2.0, conv=(3, 3), seed=1)})
    b = Adapter("b", "sd1", {KEY_CONV: lora(12, 6, 4, alpha=8.0, conv=(3, 3), seed=2)})
    merged = merge([a, b], [0.6, 0.9], method="svd", rank=5)
    d = merged.deltas[KEY_CONV]
    assert d.down.shape == (5, 6, 3, 3) and d.up.shape == (12, 5, 1, 1)
    best, _ = dense_truncation(exact_sum([a, b], [0.6, 0.9], KEY_CONV), 5)
    assert rel(flat(d), best) < 1e-5


def test_svd_clamp_is_kohyas_quantile_clamp(pair):
    a, b = pair
    plain = merge([a, b], [0.7, 0.8], method="svd", rank=6).deltas[KEY_Q]
    merged, report = merge_with_report([a, b], [0.7, 0.8], method="svd", rank=6, clamp=0.9)
    clamped = merged.deltas[KEY_Q]
    up, down = plain.up, plain.down
    hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]), 0.9)
    assert torch.equal(clamped.up, up.clamp(-hi, hi)) and torch.equal(clamped.down, down.clamp(-hi, hi))
    # The reported error is computed from the factors (Gram matrices); it matches the dense error.
    layer = next(l for l in report.layers if l.key == KEY_Q)
    m = exact_sum([a, b], [0.7, 0.8], KEY_Q)
    assert math.isclose(layer.rel_error, rel(flat(clamped), m), rel_tol=1e-4)


def test_svd_signs_are_fixed_and_factors_are_kohya_layout(pair):
    a, b = pair
    d = merge([a, b], [0.7, 0.8], method="svd", rank=4).deltas[KEY_Q]
    # down rows are orthonormal (Vᵀ), up = U·diag(σ) with non-increasing column norms.
    assert torch.allclose(d.down @ d.down.T, torch.eye(4), atol=1e-5)
    norms = d.up.norm(dim=0)
    assert torch.all(norms[:-1] >= norms[1:] - 1e-5)
    idx = d.up.abs().argmax(dim=0)
    assert torch.all(d.up[idx, torch.arange(4)] > 0)


def test_svd_mixed_kinds_go_through_the_exact_dense_delta():
    g = torch.Generator().manual_seed(3)
    loha = LoHaDelta(
        w1_a=torch.randn(24, 4, generator=g), w1_b=torch.randn(4, 18, generator=g),
        w2_a=torch.randn(24, 4, generator=g), w2_b=torch.randn(4, 18, generator=g), alpha=2.0,
    )
    lokr = LoKrDelta(w1=torch.randn(4, 3, generator=g), w2=torch.randn(6, 6, generator=g))
    adapters = [
        Adapter("lora", "sd1", {KEY_Q: lora(24, 18, 4, alpha=1.0)}),
        Adapter("loha", "sd1", {KEY_Q: loha}),
        Adapter("lokr", "sd1", {KEY_Q: lokr}),
        Adapter("full", "sd1", {KEY_Q: FullDelta(diff=torch.randn(24, 18, generator=g))}),
    ]
    weights = [1.0, 0.3, 0.5, -0.2]
    merged, report = merge_with_report(adapters, weights, method="svd", rank=6)
    m = exact_sum(adapters, weights, KEY_Q)
    best, best_err = dense_truncation(m, 6)
    assert rel(flat(merged.deltas[KEY_Q]), best) < 1e-5
    assert report.layers[0].path == "dense"
    assert math.isclose(report.layers[0].rel_error, best_err, rel_tol=1e-4)


def test_loha_conv_stored_flat_becomes_a_conv_lora_through_the_model_shape():
    # LoHa stores a conv's factors flattened; with only that input, the standard SD1 model's shape decides.
    g = torch.Generator().manual_seed(5)
    loha = LoHaDelta(
        w1_a=torch.randn(320, 2, generator=g), w1_b=torch.randn(2, 320 * 9, generator=g),
        w2_a=torch.randn(320, 2, generator=g), w2_b=torch.randn(2, 320 * 9, generator=g),
    )
    merged = merge([Adapter("loha", "sd1", {KEY_CONV: loha})], [1.0], method="svd", rank=4)
    d = merged.deltas[KEY_CONV]
    assert d.down.shape == (4, 320, 3, 3) and d.up.shape == (320, 4, 1, 1)
    assert rel(flat(d), flat(loha)) < 1e-5  # rank(LoHa) ≤ 2·2 = 4: exact


def test_layers_missing_from_some_adapters_count_as_zero(pair):
    a, b = pair
    merged = merge([a, b], [0.7, 0.8], method="svd", rank=8)
    assert set(merged.deltas) == {KEY_Q, KEY_TE, KEY_OUT}
    assert rel(flat(merged.deltas[KEY_OUT]), 0.8 * flat(b.deltas[KEY_OUT])) < 1e-5


# ------------------------------------------------------------------------------------------------ *_svd


def test_task_svd_methods_at_density_1_equal_svd(pair):
    a, b = pair
    plain = merge([a, b], [0.7, 0.8], method="svd", rank=6)
    for method in ("magnitude_prune_svd", "dare_linear_svd"):
        other = merge([a, b], [0.7, 0.8], method=method, rank=6, density=1.0)
        assert rel(flat(other.deltas[KEY_Q]), flat(plain.deltas[KEY_Q])) < 1e-5, method


def test_dare_is_deterministic_per_seed_and_independent_of_layer_order(pair):
    a, b = pair
    one = merge([a, b], [0.7, 0.8], method="dare_linear_svd", density=0.5, seed=3, rank=4)
    again = merge([a, b], [0.7, 0.8], method="dare_linear_svd", density=0.5, seed=3, rank=4)
    other = merge([a, b], [0.7, 0.8], method="dare_linear_svd", density=0.5, seed=4, rank=4)
    reordered_a = Adapter("a", "sd1", dict(reversed(list(a.deltas.items()))))
    reordered = merge([reordered_a, b], [0.7, 0.8], method="dare_linear_svd", density=0.5, seed=3, rank=4)
    # the same masks and the same SVD each time (computed on fresh buffers: equal within COMPUTED_TOL)
    assert_same_computed(one.deltas[KEY_Q].up, again.deltas[KEY_Q].up)
    assert_same_computed(one.deltas[KEY_Q].up, reordered.deltas[KEY_Q].up)
    assert not torch.allclose(one.deltas[KEY_Q].up, other.deltas[KEY_Q].up)


# ------------------------------------------------------------------------------------------------ PEFT's algebra (real_material.md §4 D5)


def test_negative_weight_subtraction_and_scaling_properties(pair):
    a, _ = pair
    twin = Adapter("twin", "sd1", dict(a.deltas))
    for method in ("cat", "svd", "linear"):
        neg = merge([a], [-1.0], method=method)
        assert rel(flat(neg.deltas[KEY_Q]), -flat(a.deltas[KEY_Q])) < 1e-5, method
        scaled = merge([a], [0.3], method=method)
        assert rel(flat(scaled.deltas[KEY_Q]), 0.3 * flat(a.deltas[KEY_Q])) < 1e-4, method
    for method in ("cat", "svd", "linear"):
        zero = merge([a, twin], [1.0, -1.0], method=method)
        assert float(zero.deltas[KEY_Q].delta_weight().abs().max()) < 1e-5, method
    # Ranks: svd → max(r_i), cat → Σ r_i, linear keeps the common rank; inputs are untouched.
    c8 = Adapter("c8", "sd1", {KEY_Q: lora(40, 24, 8, seed=21)})
    c20 = Adapter("c20", "sd1", {KEY_Q: lora(40, 24, 20, seed=22)})
    before = c8.deltas[KEY_Q].up.clone()
    assert merge([c8, c20], [0.5, -0.3], method="svd").deltas[KEY_Q].rank == 20
    assert merge([c8, c20], [0.5, -0.3], method="cat").deltas[KEY_Q].rank == 28
    assert merge([c8, c8], [0.5, -0.3], method="linear").deltas[KEY_Q].rank == 8
    assert torch.equal(c8.deltas[KEY_Q].up, before)
    for method in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"):
        density = None if method == "linear" else 0.5
        with pytest.raises(ValueError, match="equal ranks"):
            merge([c8, c20], [0.5, 0.5], method=method, density=density)


# ------------------------------------------------------------------------------------------------ block weights


def test_block_weights_with_lorablend_naming(pair):
    a, b = pair
    weights = [0.7, 0.8]
    merged = merge([a, b], weights, method="cat", block_weights={"IN04": 0.5, "BASE": 0.0})
    # KEY_Q is in IN04 (down_blocks.1.attentions.0), KEY_TE in BASE, KEY_OUT in OUT03 (unlisted: 1).
    assert rel(flat(merged.deltas[KEY_Q]), 0.5 * exact_sum([a, b], weights, KEY_Q)) < 1e-6
    assert float(merged.deltas[KEY_TE].delta_weight().abs().max()) == 0.0
    assert rel(flat(merged.deltas[KEY_OUT]), exact_sum([a, b], weights, KEY_OUT)) < 1e-6
    # Per adapter: only b's IN04 is muted.
    per = merge([a, b], weights, method="cat", block_weights=[None, {"IN04": 0.0}])
    assert rel(flat(per.deltas[KEY_Q]), 0.7 * flat(a.deltas[KEY_Q])) < 1e-6
    with pytest.raises(ValueError, match="IN99"):
        merge([a, b], weights, method="cat", block_weights={"IN99": 0.5})


class _StubIndex:
    """Stands in for lorablend.naming's index: labels by prefix, no shapes."""

    modules: dict = {}

    def block(self, key: str) -> str:
        return "BASE" if key.startswith("text_encoder") else "IN04" if "down_blocks" in key else "OUT03"

    def block_labels(self) -> list[str]:
        return ["BASE", "IN04", "OUT03"]


def test_block_weights_plug_into_one_call(pair, monkeypatch):
    monkeypatch.setattr(merge_mod, "_standard_index", lambda family: _StubIndex())
    a, b = pair
    merged = merge([a, b], [1.0, 1.0], method="cat", block_weights={"OUT03": 2.0})
    assert rel(flat(merged.deltas[KEY_OUT]), 2.0 * flat(b.deltas[KEY_OUT])) < 1e-6
    assert rel(flat(merged.deltas[KEY_Q]), exact_sum([a, b], [1, 1], KEY_Q)) < 1e-6


# ------------------------------------------------------------------------------------------------ report and metadata


def test_report_records_and_provenance(pair):
    a, b = pair
    merged, report = merge_with_report([a, b], [0.7, 0.8], method="svd", rank=4, name="mix")
    assert isinstance(report, MergeReport) and merged.name == "mix"
    assert [l.key for l in report.layers] == list(merged.deltas)
    rec = {r.key: r for r in merged.report.records}
    assert rec[KEY_Q].status == "mapped" and rec[KEY_Q].reason.startswith("rank 4, rel_err ")
    assert report.layers[0].sources == ("a", "b")
    md = merged.metadata
    assert md["modelspec.merged_from"] == "a, b"
    assert md["lorablend.merge.method"] == "svd"
    assert json.loads(md["lorablend.merge.weights"]) == [0.7, 0.8]
    assert md["lorablend.merge.rank"] == "4"
    assert all(isinstance(v, str) for v in md.values())
    assert json.loads(json.dumps(report.to_dict()))["layers"][0]["rank"] == 4
    assert "svd merge of a, b" in report.summary()


def test_full_diff_bias_is_carried_as_the_exact_weighted_sum():
    # a bias difference is summed exactly (merge/sums.py) and carried as the merged LoRA's diff_b, never dropped
    a = FullDelta(diff=torch.randn(8, 6), diff_b=torch.randn(8))
    b = FullDelta(diff=torch.randn(8, 6), diff_b=torch.randn(8))
    merged, report = merge_with_report([Adapter("f", "sd1", {KEY_Q: a}), Adapter("g", "sd1", {KEY_Q: b})],
                                       [0.5, -2.0], method="svd", rank=6)
    assert not report.dropped and merged.report.complete
    torch.testing.assert_close(merged.deltas[KEY_Q].delta_bias(), 0.5 * a.diff_b - 2.0 * b.diff_b, rtol=0, atol=1e-6)


def test_dora_needs_the_base_weight():
    inner = lora(8, 6, 2, seed=9)
    dora = DoRADelta(inner=inner, magnitude=torch.rand(8) + 0.5)
    a = Adapter("d", "sd1", {KEY_Q: dora})
    with pytest.raises(ValueError, match="DoRA.*base_weights"):
        merge([a], [1.0], method="svd")
    w0 = torch.randn(8, 6)
    merged = merge([a], [0.5], method="svd", rank=6, base_weights={KEY_Q: w0})
    assert rel(flat(merged.deltas[KEY_Q]), 0.5 * dora.delta_weight(base=w0).double()) < 1e-5


# ------------------------------------------------------------------------------------------------ errors


def test_different_families_are_refused_naming_both():
    a = Adapter("sd15_style", "sd1", {KEY_Q: lora(8, 6, 2)})
    b = Adapter("sd2_style", "sd2", {KEY_Q: lora(8, 6, 2)})
    with pytest.raises(LoraCompatibilityError, match=r"sd15_style.*sd1.*sd2_style.*sd2"):
        merge([a, b], [1.0, 1.0])


def test_shape_mismatch_is_refused():
    a = Adapter("a", "sd1", {KEY_Q: lora(8, 6, 2)})
    b = Adapter("b", "sd1", {KEY_Q: lora(8, 7, 2)})
    with pytest.raises(LoraCompatibilityError, match="different shapes"):
        merge([a, b], [1.0, 1.0], method="cat")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="average"), "method='average'"),
        (dict(rank=0), "rank=0"),
        (dict(rank=-3), "rank=-3"),
        (dict(weights=[1.0]), "weights has 1 entries for 2 adapters"),
        (dict(weights=[1.0, float("nan")]), r"weights\[1\]"),
        (dict(method="ties", density=0.0), "density=0.0"),
        (dict(method="ties", density=1.5), "density=1.5"),
        (dict(method="ties"), "needs density"),
        (dict(method="svd", density=0.5), "density= does not apply"),
        (dict(method="cat", rank=4), "rank= does not apply"),
        (dict(energy=1.5), "energy=1.5"),
        (dict(clamp=0.0), "clamp=0.0"),
        (dict(method="ties", density=0.5, majority_sign="max"), "majority_sign"),
    ],
)
def test_bad_arguments_name_the_argument(pair, kwargs, match):
    a, b = pair
    kwargs = dict(kwargs)
    weights = kwargs.pop("weights", [0.5, 0.5])
    with pytest.raises(ValueError, match=match):
        merge([a, b], weights, **kwargs)


def test_factorwise_methods_refuse_other_kinds():
    loha = LoHaDelta(w1_a=torch.ones(4, 2), w1_b=torch.ones(2, 3), w2_a=torch.ones(4, 2), w2_b=torch.ones(2, 3))
    a = Adapter("a", "sd1", {KEY_Q: loha})
    with pytest.raises(ValueError, match="ties_svd"):
        merge([a, a], [1.0, 1.0], method="ties", density=0.5)


@pytest.mark.parametrize(
    "shapes",
    [
        dict(w1=(4, 3), w2_a=(10, 2), w2_b=(2, 5)),  # full w1, low-rank w2
        dict(w1_a=(8, 2), w1_b=(2, 6), w2_a=(5, 2), w2_b=(2, 7)),  # both low-rank
        dict(w1=(3, 2), w2=(6, 4, 3, 3)),  # conv, full 4-D w2
        dict(w1_a=(40, 2), w1_b=(2, 12), w2_a=(8, 2), w2_b=(2, 30)),  # conv stored flattened
    ],
)
def test_lokr_joins_through_exact_kronecker_factors(shapes):
    g = torch.Generator().manual_seed(1)
    lokr = LoKrDelta(**{k: torch.randn(*v, generator=g) for k, v in shapes.items()}, alpha=1.0)
    factors = lokr.exact_factors()
    dense = lokr.delta_weight()
    assert factors is not None and tuple(lokr.shape) == tuple(dense.shape)
    assert torch.allclose(factors[0] @ factors[1], dense.reshape(dense.shape[0], -1), atol=1e-5)
    one = Adapter("k", "sd1", {KEY_Q: lokr})
    merged = merge([one], [0.5], method="cat")
    assert rel(flat(merged.deltas[KEY_Q]), 0.5 * flat(lokr)) < 1e-6


def test_energy_alone_may_exceed_the_input_ranks():
    # Two unrelated rank-4 LoRAs: M has rank 8 with a flat-ish spectrum; 0.999 of its energy needs > 4.
    a = Adapter("a", "sd1", {KEY_Q: lora(40, 24, 4, seed=31)})
    b = Adapter("b", "sd1", {KEY_Q: lora(40, 24, 4, seed=32)})
    merged = merge([a, b], [1.0, 1.0], method="svd", energy=0.999)
    assert merged.deltas[KEY_Q].rank > 4
    m = exact_sum([a, b], [1.0, 1.0], KEY_Q)
    assert rel(flat(merged.deltas[KEY_Q]), m) <= math.sqrt(1 - 0.999) + 1e-6
