"""merge/methods.py: one function per merge method over one layer's terms; cat exact, svd optimal."""

from __future__ import annotations

import torch

from lorablend.kinds import FullDelta, LowRankDelta
from lorablend.merge.methods import METHOD_TABLE, Layer, LayerTerm, flat2d, merge_cat, merge_svd
from lorablend.merge.options import MergeSettings

from conftest import assert_same_computed

g = torch.Generator().manual_seed(1)
A = LowRankDelta(torch.randn(2, 9, generator=g), torch.randn(7, 2, generator=g), alpha=1.0)
B = LowRankDelta(torch.randn(3, 9, generator=g), torch.randn(7, 3, generator=g), alpha=6.0)
F = FullDelta(torch.randn(7, 9, generator=g))


def _layer(*terms):
    return Layer("unet.x", tuple(LayerTerm(n, d, c) for n, d, c in terms), torch.device("cpu"))


def test_cat_stacks_the_weighted_factors_exactly():
    result = merge_cat(_layer(("a", A, 0.7), ("b", B, -0.4), ("f", F, 0.5)), MergeSettings(method="cat"))
    want = 0.7 * A.delta_weight() - 0.4 * B.delta_weight() + 0.5 * F.delta_weight()
    assert result.rel_error == 0.0 and result.up.shape[1] == 2 + 3 + 7
    assert_same_computed(result.up @ result.down, want)


def test_svd_is_the_best_rank_k_approximation_of_the_exact_sum():
    layer = _layer(("a", A, 0.7), ("b", B, -0.4))
    exact = 0.7 * A.delta_weight() - 0.4 * B.delta_weight()
    full = merge_svd(layer, MergeSettings(method="svd", rank=5))
    assert_same_computed(full.up @ full.down, exact)
    cut = merge_svd(layer, MergeSettings(method="svd", rank=2))
    s = torch.linalg.svdvals(exact.double())
    assert abs(float((exact - cut.up @ cut.down).norm()) - float(s[2:].norm())) < 1e-4
    assert abs(cut.rel_error - float(s[2:].norm() / s.norm())) < 1e-5


def test_every_method_has_its_function_and_shapes_flatten_to_2d():
    assert {"cat", "svd"} <= set(METHOD_TABLE)
    assert flat2d((4, 3, 3, 3)) == (4, 27) and flat2d((4, 5)) == (4, 5)
