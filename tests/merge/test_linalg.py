"""merge/linalg.py: the SVD of a product from its factors, rank choice, truncation and its exact error."""

from __future__ import annotations

import torch

from lorablend.merge.linalg import choose_rank, rel_error_lowrank, svd_from_factors, truncate_dense

from conftest import assert_same_computed

g = torch.Generator().manual_seed(0)
U, D = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(3, 9, generator=g, dtype=torch.float64)


def test_the_svd_from_factors_is_the_svd_of_the_product():
    left, s, right = svd_from_factors(U, D)
    assert_same_computed(left * s @ right, U @ D)
    assert_same_computed(s, torch.linalg.svdvals(U @ D)[:3])
    assert_same_computed(left.T @ left, torch.eye(3, dtype=torch.float64))


def test_rank_is_the_cap_or_the_energy_kept_whichever_asks_less():
    s = torch.tensor([3.0, 1.0, 0.1])
    assert choose_rank(s, None, 0.9) == 2  # 9 / 10.01 < 0.9 <= 10 / 10.01
    assert choose_rank(s, 1, None) == 1 and choose_rank(s, None, None) == 3 and choose_rank(s, 2, 1.0) == 2


def test_truncation_is_the_best_rank_k_approximation_and_reports_its_relative_error():
    m = U @ D
    up, down, err, _ = truncate_dense(m, 2, None, None, reference=m)
    s = torch.linalg.svdvals(m)
    assert up.shape == (12, 2) and down.shape == (2, 9)
    assert abs(err - float((s[2:] ** 2).sum().sqrt() / s.norm())) < 1e-9
    assert abs(float((m - up @ down).norm() / m.norm()) - err) < 1e-9
    assert abs(rel_error_lowrank(U, D, up, down) - err) < 1e-9
