"""K-LoRA (arXiv 2502.18461, HVision-NKU/K-LoRA): training-free fusion of a subject and a style LoRA by choosing,
at each layer and each denoising step, the one LoRA whose top-K weight elements dominate.

At a layer, ``S_c = Σ top-K |ΔW_content|`` and ``S_s = Σ top-K |ΔW_style|``; the content LoRA is used where
``S_c / γ > S_s · (α·p + β)`` and the style LoRA elsewhere. ``γ`` is the mean over layers of
``Σ|ΔW_c| / Σ|ΔW_s|`` (it evens out the two LoRAs' overall scales), ``p`` the fraction of the denoising done
(0 at the first step, 1 at the last): early steps lean to the subject, late ones to the style. The reference
uses ``K = 64``, ``α = 1.5``, ``β = 0.5`` on SDXL; K here defaults to the same 64, capped at a layer's size.

The selection depends on the step, so K-LoRA is a runtime mode: :meth:`KLoraPlan.adapter` gives the adapter of
one step (every layer the chosen LoRA's delta), and :func:`lorablend.evaluate.steps.StepAdapters` switches them
per step. ``klora_merge`` is the static merge at one ``progress`` (default 0.5: the generation's mean scale).

>>> plan = klora_plan(subject, style)                                      # doctest: +SKIP
>>> plan.adapter(progress=0.0).name                                        # doctest: +SKIP
'klora@0.00'
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapter import Adapter

TOP_K = 64
ALPHA = 1.5
BETA = 0.5


def top_k_sum(delta_weight: torch.Tensor, k: int = TOP_K) -> float:
    """``Σ top-k |ΔW|`` (k capped at the number of elements).

    >>> top_k_sum(torch.tensor([[1.0, -5.0], [2.0, 0.5]]), k=2)
    7.0
    """
    flat = delta_weight.abs().reshape(-1).double()
    return float(torch.topk(flat, min(k, flat.numel())).values.sum())


@dataclass(frozen=True)
class KLoraPlan:
    """The two LoRAs, their per-layer top-K sums and the ratio γ: everything a step's selection needs."""

    content: Adapter
    style: Adapter
    gamma: float
    scores: dict[str, tuple[float, float]]  # shared key -> (S_content, S_style)
    alpha: float = ALPHA
    beta: float = BETA

    def choose(self, progress: float) -> dict[str, str]:
        """``{key: "content" | "style"}`` for every layer both LoRAs have, at ``progress`` in [0, 1].

        >>> sorted(set(plan.choose(1.0).values()))                         # doctest: +SKIP
        ['style']
        """
        scale = self.alpha * progress + self.beta
        return {k: ("content" if s_c / self.gamma > s_s * scale else "style") for k, (s_c, s_s) in self.scores.items()}

    def adapter(self, progress: float, name: str | None = None) -> Adapter:
        """The adapter of one step: each shared layer the chosen LoRA's delta, each other layer its one LoRA's."""
        picks = self.choose(progress)
        deltas = {**self.style.deltas, **self.content.deltas}
        for key, pick in picks.items():
            deltas[key] = (self.content if pick == "content" else self.style).deltas[key]
        return Adapter(name or f"klora@{progress:.2f}", self.content.family, deltas)

    def content_share(self, progress: float) -> float:
        """The fraction of shared layers that use the content LoRA at ``progress``."""
        picks = self.choose(progress)
        return sum(p == "content" for p in picks.values()) / max(1, len(picks))


def klora_plan(content: Adapter, style: Adapter, *, top_k: int = TOP_K) -> KLoraPlan:
    """Score every layer both LoRAs adapt (subject first, style second) and compute γ.

    >>> plan = klora_plan(subject, style)                                  # doctest: +SKIP
    """
    shared = sorted(set(content.deltas) & set(style.deltas))
    if not shared:
        raise ValueError(f"K-LoRA picks per layer between two LoRAs, but {content.name!r} and {style.name!r} "
                         f"share no layer: merge them with method='cat' instead")
    scores, ratios = {}, []
    for key in shared:
        dw_c, dw_s = content.deltas[key].delta_weight(), style.deltas[key].delta_weight()
        scores[key] = (top_k_sum(dw_c, top_k), top_k_sum(dw_s, top_k))
        total_s = float(dw_s.abs().double().sum())
        if total_s > 0:
            ratios.append(float(dw_c.abs().double().sum()) / total_s)
    gamma = sum(ratios) / len(ratios) if ratios else 1.0
    return KLoraPlan(content, style, gamma, scores)


def klora_merge(content: Adapter, style: Adapter, *, progress: float = 0.5, top_k: int = TOP_K,
                name: str | None = None) -> Adapter:
    """K-LoRA frozen at one ``progress``: one adapter, each shared layer from the LoRA that wins there.

    >>> merged = klora_merge(subject, style)                               # doctest: +SKIP
    """
    return klora_plan(content, style, top_k=top_k).adapter(progress, name or f"{content.name}+{style.name}-klora")
