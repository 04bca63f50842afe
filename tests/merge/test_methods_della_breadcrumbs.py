"""DELLA and Model Breadcrumbs (mergekit's definitions) as lorablend merge methods: the masks' own rules, then
the merges on LoRA factors (``della``, ``breadcrumbs``) and on the dense ΔW (``*_svd``)."""

from __future__ import annotations

import pytest
import torch

from lorablend.adapter import Adapter, LowRankDelta
from lorablend.merge import merge
from lorablend.merge.task import COMBINATIONS, della_magprune, magnitude_outliers

KEY = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def _adapter(name: str, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return Adapter(name, "sd1", {KEY: LowRankDelta(down=torch.randn(4, 32, generator=g),
                                                     up=torch.randn(64, 4, generator=g), alpha=4.0)})


def test_breadcrumbs_mask_drops_outliers_and_smallest():
    t = torch.arange(1, 101, dtype=torch.float32) * torch.where(torch.arange(100) % 2 == 0, 1.0, -1.0)
    kept = magnitude_outliers(t, density=0.5, gamma=0.1)
    survivors = kept[kept != 0].abs()
    assert survivors.numel() == 50
    # the 10 largest (91..100) and the 40 smallest (1..40) are gone: 41..90 stay, unscaled
    assert survivors.min() == 41 and survivors.max() == 90
    assert torch.equal(kept[kept != 0], t[kept != 0])


def test_della_keeps_large_entries_more_often_and_the_l1_norm():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 256, generator=g)
    out = della_magprune(t, density=0.5, gen=torch.Generator().manual_seed(1), epsilon=0.15)
    kept = out != 0
    big = t.abs() > t.abs().median(dim=1, keepdim=True).values
    rate_big, rate_small = kept[big].float().mean(), kept[~big].float().mean()
    assert 0.55 < rate_big < 0.67 and 0.33 < rate_small < 0.45  # p runs 0.35 -> 0.65 by rank
    assert torch.allclose(out.abs().sum(), t.abs().sum(), rtol=1e-4)
    again = della_magprune(t, density=0.5, gen=torch.Generator().manual_seed(1), epsilon=0.15)
    assert torch.equal(out, again)


def test_della_refuses_a_density_epsilon_leaves_outside_0_1():
    with pytest.raises(ValueError, match="density"):
        della_magprune(torch.ones(4, 4), density=0.9, gen=None, epsilon=0.15)


def test_della_elects_signs_like_ties():
    a, b = torch.tensor([[2.0, -1.0, 3.0]]), torch.tensor([[-1.0, -2.0, 1.0]])
    # density 1: no pruning; elected signs (+, -, +); disjoint mean of the agreeing entries
    merged = COMBINATIONS["della"]([a, b], [1.0, 1.0], density=1.0, majority_sign="total", gen=None)
    assert torch.equal(merged, torch.tensor([[2.0, -1.5, 2.0]]))


@pytest.mark.parametrize("method", ["della", "breadcrumbs", "della_svd", "breadcrumbs_svd"])
def test_merge_runs_the_new_methods_and_seeds_della(method):
    a, b = _adapter("a", 1), _adapter("b", 2)
    merged = merge([a, b], [1.0, 0.5], method=method, density=0.5, seed=3)
    delta = merged.deltas[KEY]
    assert delta.delta_weight().shape == (64, 32) and torch.isfinite(delta.delta_weight()).all()
    again = merge([a, b], [1.0, 0.5], method=method, density=0.5, seed=3)
    assert torch.equal(again.deltas[KEY].delta_weight(), delta.delta_weight())
    if method.startswith("della"):
        other = merge([a, b], [1.0, 0.5], method=method, density=0.5, seed=4)
        assert not torch.equal(other.deltas[KEY].delta_weight(), delta.delta_weight())


def test_breadcrumbs_at_density_one_is_the_linear_merge():
    a, b = _adapter("a", 1), _adapter("b", 2)
    crumbs = merge([a, b], [1.0, 0.5], method="breadcrumbs", density=1.0)
    linear = merge([a, b], [1.0, 0.5], method="linear")
    assert torch.equal(crumbs.deltas[KEY].delta_weight(), linear.deltas[KEY].delta_weight())
