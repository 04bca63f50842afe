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


Combination = Callable[..., torch.Tensor]
COMBINATIONS: dict[str, Combination] = {
    "linear": linear,
    "magnitude_prune": magnitude_prune_sum,
    "ties": ties,
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
}
