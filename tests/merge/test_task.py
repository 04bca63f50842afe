"""merge/task.py: PEFT's task-arithmetic merges as named steps (prune, elect a sign, sum)."""

from __future__ import annotations

import torch

from lorablend.merge.task import COMBINATIONS, elect_sign, magnitude_prune, random_prune_and_rescale

TS = [torch.tensor([1.0, -2.0, 0.5, 4.0]), torch.tensor([3.0, 1.0, -0.5, -1.0])]


def test_linear_is_the_weighted_sum():
    got = COMBINATIONS["linear"](TS, [0.5, 2.0], density=None, majority_sign="total", gen=None)
    assert torch.equal(got, 0.5 * TS[0] + 2.0 * TS[1])


def test_magnitude_prune_keeps_the_largest_fraction():
    assert magnitude_prune(torch.tensor([1.0, -4.0, 2.0, 3.0]), 0.5).tolist() == [0.0, -4.0, 0.0, 3.0]


def test_ties_sums_only_the_values_that_agree_with_the_elected_sign():
    stacked = torch.stack(TS)
    # the majority is the sign of each column's sum (a zero sum counts as +); the mask marks who agrees with it
    assert elect_sign(stacked, "total").tolist() == [[True, True, True, True], [True, False, False, False]]
    got = COMBINATIONS["ties"](TS, [1.0, 1.0], density=1.0, majority_sign="total", gen=None)
    # the mean of the agreeing values per column (PEFT's disjoint merge)
    assert torch.equal(got, torch.tensor([2.0, -2.0, 0.5, 4.0]))


def test_dare_drops_at_random_and_rescales_what_it_keeps_seeded():
    t = torch.ones(1000)
    a = random_prune_and_rescale(t, 0.25, torch.Generator().manual_seed(3))
    b = random_prune_and_rescale(t, 0.25, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and set(a.unique().tolist()) <= {0.0, 4.0}
    assert 150 < int((a != 0).sum()) < 350
