"""PEFT's task-arithmetic merges (``utils/merge_utils.py``) as named steps: prune, elect a sign, sum.

Each combination takes the per-adapter tensors and their weights and returns one tensor. DARE draws its
masks from an explicit ``torch.Generator`` so results do not depend on global random state.

>>> ts = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])]
>>> COMBINATIONS["linear"](ts, [1.0, 1.0], density=None, majority_sign="total", gen=None)
tensor([ 4., -1.])
>>> COMBINATIONS["ties"](ts, [1.0, 1.0], density=1.0, majority_sign="total", gen=None)
tensor([ 2., -2.])
"""

from __future__ import annotations

from typing import Callable

import torch


def magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of entries largest in magnitude, zero the rest."""
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    top = torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)
    mask[top[1]] = 1
    return t * mask.reshape(t.shape)


def random_prune_and_rescale(t: torch.Tensor, density: float, gen: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, then rescale by ``1/density`` to keep the mean."""
    if density >= 1:
        return t  # PEFT skips pruning (and draws no random numbers) at density 1
    mask = torch.bernoulli(torch.full_like(t, density), generator=gen)
    return t * mask / density


def magnitude_outliers(t: torch.Tensor, density: float, gamma: float = 0.01) -> torch.Tensor:
    """Model Breadcrumbs (mergekit's ``magnitude_outliers``): drop the ``gamma`` fraction largest in magnitude
    (outliers) and then the smallest, so that ``density`` of the entries stay.

    >>> magnitude_outliers(torch.tensor([1.0, -4.0, 2.0, 3.0]), 0.5, gamma=0.25)
    tensor([0., -0., 2., 3.])
    """
    if density >= 1:
        return t
    n = t.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:  # as mergekit: remove fewer outliers to reach the density
        top, bottom = top + bottom, 0
    order = torch.sort(t.abs().reshape(-1), stable=True).indices
    mask = torch.zeros(n, dtype=t.dtype, device=t.device)
    mask[order[bottom:n - top]] = 1
    return t * mask.reshape(t.shape)


def della_magprune(t: torch.Tensor, density: float, gen: torch.Generator | None, epsilon: float = 0.15) -> torch.Tensor:
    """DELLA's MagPrune (mergekit's ``della_magprune``): per row, keep each entry with a probability from
    ``density - epsilon`` (smallest magnitude) to ``density + epsilon`` (largest) by rank, then rescale the kept
    entries so the row set keeps the tensor's L1 norm (mergekit's ``rescale``)."""
    if density >= 1:
        return t
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(f"della needs density ± {epsilon} inside (0, 1), got density={density}: use 0.2 <= density <= 0.8")
    rows = t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(rows.dtype)
    span = (ranks.max(dim=1, keepdim=True).values - ranks.min(dim=1, keepdim=True).values).clamp(min=1)
    probs = (density - epsilon) + (ranks / span) * 2 * epsilon
    kept = rows * torch.bernoulli(probs, generator=gen)
    before, after = rows.abs().sum(), kept.abs().sum()
    scale = before / after if after > 1e-7 and before > 1e-7 else 1.0
    return (kept * scale).reshape(t.shape)


def elect_sign(stacked: torch.Tensor, majority_sign: str) -> torch.Tensor:
    """TIES: a mask of the entries whose sign agrees with the majority (by total value, or by count)."""
    signs = stacked.sign()
    magnitude = stacked.sum(dim=0) if majority_sign == "total" else signs.sum(dim=0)
    majority = torch.where(magnitude >= 0, 1, -1)
    return signs == majority


def weighted_sum(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ w_i t_i``."""
    return (stacked * weights).sum(dim=0)


def disjoint_mean(stacked: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TIES' disjoint merge: the weighted sum over the agreeing entries, divided by how many agree."""
    return (stacked * weights * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def _stack(tensors: list[torch.Tensor], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    stacked = torch.stack(tensors, dim=0)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    return stacked, w.view(w.shape + (1,) * (stacked.dim() - 1))


def linear(tensors, weights, *, density, majority_sign, gen) -> torch.Tensor:
    """PEFT ``task_arithmetic``: the weighted sum."""
    return weighted_sum(*_stack(tensors, weights))


def magnitude_prune_sum(tensors, weights, *, density, majority_sign, gen) -> torch.Tensor:
    """PEFT ``magnitude_prune``: prune each by magnitude, then the weighted sum."""
    return weighted_sum(*_stack([magnitude_prune(t, density) for t in tensors], weights))


def ties(tensors, weights, *, density, majority_sign, gen) -> torch.Tensor:
    """PEFT ``ties``: prune by magnitude, elect the sign, disjoint mean."""
    stacked, w = _stack([magnitude_prune(t, density) for t in tensors], weights)
    return disjoint_mean(stacked, w, elect_sign(stacked, majority_sign))


def dare_linear(tensors, weights, *, density, majority_sign, gen) -> torch.Tensor:
    """PEFT ``dare_linear``: random prune and rescale, then the weighted sum."""
    return weighted_sum(*_stack([random_prune_and_rescale(t, density, gen) for t in tensors], weights))


def dare_ties(tensors, weights, *, density, majority_sign, gen) -> torch.Tensor:
    """PEFT ``dare_ties``: random prune and rescale, elect the sign, disjoint mean."""
    stacked, w = _stack([random_prune_and_rescale(t, density, gen) for t in tensors], weights)
    return disjoint_mean(stacked, w, elect_sign(stacked, majority_sign))


def della(tensors, weights, *, density, majority_sign, gen) -> torch.Tensor:
    """mergekit ``della``: MagPrune each, elect the sign, disjoint mean (as ``dare_ties`` with MagPrune's mask)."""
    stacked, w = _stack([della_magprune(t, density, gen) for t in tensors], weights)
    return disjoint_mean(stacked, w, elect_sign(stacked, majority_sign))


def breadcrumbs(tensors, weights, *, density, majority_sign, gen) -> torch.Tensor:
    """mergekit ``breadcrumbs``: drop each one's outliers and smallest entries, then the weighted sum."""
    return weighted_sum(*_stack([magnitude_outliers(t, density) for t in tensors], weights))


Combination = Callable[..., torch.Tensor]
COMBINATIONS: dict[str, Combination] = {
    "linear": linear,
    "magnitude_prune": magnitude_prune_sum,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
    "della": della,
    "breadcrumbs": breadcrumbs,
}
