"""What merge sums exactly, whatever the method: layers no LoRA can hold, and bias differences.

Wan distillation LoRAs (lightx2v, Lightning) carry ``blocks.N.diff_m`` (the difference of a block's modulation
table, ``(1, 6, width)``), ``.diff`` on norms' scale vectors and ``.diff_b`` bias differences beside their LoRA
pairs. A table or a vector is no matrix: written as a LoRA over its flattened rows it is a file no other tool reads
(ComfyUI, WanVideoWrapper and lightx2v exchange ``diffusion_model.blocks.N.diff_m``). So a layer whose delta has no
LoRA form (``Delta.has_lora_form``) is merged as ``Σ c_i ΔT_i`` in its own kind (``Delta.with_sum``): exact in fp32
and as small as its inputs, no SVD, no rank, for every method (their pruning, sign election and truncation are
defined on LoRA factors and weight matrices, not on a table). A bias difference (``diff_b``, a LoRA's
``lora_B.bias``: ``Delta.delta_bias()``, scale applied) is summed the same way and carried by the merged layer
(a LoRA's ``diff_b``), never dropped.

>>> import torch
>>> from lorablend.kinds import TableDelta
>>> from lorablend.merge.methods import LayerTerm
>>> terms = (LayerTerm("a", TableDelta(torch.ones(1, 6, 4)), 0.5), LayerTerm("b", TableDelta(torch.ones(1, 6, 4)), 2.0))
>>> summed, note = summed_layer("transformer.blocks.0.scale_shift_table", terms)
>>> summed.kind, summed.diff_m[0, 0, 0].item(), note
('table', 2.5, 'exact weighted sum: a table delta of shape (1, 6, 4) has no LoRA form')
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import LoraCompatibilityError
from ..kinds import Delta, DeltaProblem
from .methods import LayerTerm


def exact_bias(key: str, terms: Sequence[LayerTerm]) -> torch.Tensor | None:
    """``Σ c_i Δb_i`` in fp32 over the terms that change the bias (None when none does).

    >>> from lorablend.kinds import FullDelta
    >>> exact_bias("k", [LayerTerm("a", FullDelta(None, torch.ones(2)), 0.5)]).tolist()
    [0.5, 0.5]
    """
    parts = [(t, b) for t in terms if (b := t.delta.delta_bias()) is not None]
    if not parts:
        return None
    shapes = {tuple(b.shape) for _, b in parts}
    if len(shapes) > 1:
        listed = ", ".join(f"{t.name}: {tuple(b.shape)}" for t, b in parts)
        raise LoraCompatibilityError(f"layer {key!r} has bias differences of different shapes across adapters "
                                     f"({listed}): they were made for different models; merge adapters of one model")
    total = torch.zeros(shapes.pop(), dtype=torch.float32, device=parts[0][1].device)
    for t, b in parts:
        total += t.coeff * b.float().to(total.device)
    return total


def summed_layer(key: str, terms: Sequence[LayerTerm], factorwise: bool = False) -> tuple[Delta, str] | None:
    """The layer as an exact weighted sum in its own kind, and a note for the report, where no LoRA can hold it
    (a term without LoRA form, or only bias differences); None where the method merges it. ``factorwise`` (PEFT's
    ``linear``, ``ties`` …, which combine LoRA factors): a layer whose every term has no factors and whose kind holds
    a sum (a whole-weight ``diff``: lightx2v's ``head.head.diff``) is summed too, rather than refused."""
    weights = [t for t in terms if t.delta.changes_weight]
    if not weights:
        return terms[0].delta.with_sum(None, exact_bias(key, terms)), "exact weighted sum of bias differences"
    owner = next((t.delta for t in weights if not t.delta.has_lora_form), None)
    note = "" if owner is None else f"exact weighted sum: a {owner.kind} delta of shape {owner.shape} has no LoRA form"
    if owner is None:
        if not factorwise or any(t.delta.low_rank_factors() is not None or t.delta.needs_base for t in weights):
            return None
        owner = weights[0].delta
        note = (f"exact weighted sum: a factor-wise method combines LoRA factors, and a {owner.kind} delta of shape "
                f"{owner.shape} has none")
    bias = exact_bias(key, terms)
    total = torch.zeros(owner.shape, dtype=torch.float32, device=next(owner.tensors()).device)
    for t in weights:
        problem = t.delta.fit_problem(owner.shape)
        if problem is not None:
            raise LoraCompatibilityError(f"layer {key!r} of {t.name!r} does not fit the {owner.kind} delta of the "
                                         f"other adapters: {problem}; merge adapters of one model")
        total += t.coeff * t.delta.delta_weight(owner.shape).to(total.device)
    try:
        return owner.with_sum(total, bias), note
    except DeltaProblem:
        if owner.has_lora_form:  # a factor-wise method on a kind that holds no sum (LoKr …): it refuses it by name
            return None
        raise


__all__ = ["exact_bias", "summed_layer"]
