"""The one fused-weight formula: ``W = W0 + Σ c_i · ΔW_i``, computed in fp32 from the pristine ``W0``, cast once.

Every place that writes LoRA deltas into weights uses these functions — ``fuse_lora`` on a live pipeline and the
offline bake into a checkpoint file — so both give the same bits for the same inputs. Why this exact shape:

* **From the pristine weight, in fp32.** Summing into an fp16 weight term by term rounds after every term;
  starting again from ``W0`` means unfusing never needs a subtraction.
* **Low-rank terms through ``addmm_``** on the flattened ``(out, -1)`` view, from ``LowRankDelta.factors()``:
  no dense ``ΔW`` is materialised for LoRA/LoCon, and the result is independent of where it runs.
* **DoRA is relative to ``W0``** (its delta depends on the base weight), never to a partly fused weight.
* **One cast** to the output dtype at the end.

The functions are pure: they read their inputs and return new tensors.

>>> import torch
>>> from lorablend.adapter import LowRankDelta
>>> w0 = torch.zeros(4, 3, dtype=torch.float16)
>>> d = LowRankDelta(down=torch.ones(1, 3), up=torch.ones(4, 1))
>>> fused_weight(w0, [(0.5, d)]).tolist()[0]
[0.5, 0.5, 0.5]
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace
from typing import Sequence

import torch

from .adapter import Delta, DoRADelta, FullDelta, LowRankDelta

Terms = Sequence[tuple[float, Delta]]


def _on_device(delta: Delta, device: torch.device) -> Delta:
    """``delta`` with its tensors on ``device`` (a copy only when something has to move)."""
    changes = {}
    for f in fields(delta):
        if not f.init:
            continue
        value = getattr(delta, f.name)
        if isinstance(value, torch.Tensor) and value.device != device:
            changes[f.name] = value.to(device)
        elif is_dataclass(value):
            moved = _on_device(value, device)
            if moved is not value:
                changes[f.name] = moved
    return replace(delta, **changes) if changes else delta


def delta_weight_fp32(
    delta: Delta, shape: tuple[int, ...], pristine: torch.Tensor, device: torch.device | str | None = None
) -> torch.Tensor:
    """The fp32 ``ΔW`` of ``delta`` for a weight of ``shape`` on ``device``; DoRA is taken relative to ``pristine``.

    >>> from lorablend.adapter import FullDelta
    >>> delta_weight_fp32(FullDelta(torch.ones(2, 2)), (2, 2), torch.zeros(2, 2)).dtype
    torch.float32
    """
    device = torch.device(device) if device is not None else pristine.device
    if isinstance(delta, DoRADelta):
        return _on_device(delta, device).delta_weight(shape, base_weight=pristine.to(device))
    if isinstance(delta, LowRankDelta):
        up, down = delta.factors()
        return (up.to(device) @ down.to(device)).reshape(shape)
    return delta.delta_weight(shape).to(device)


def fused_weight(
    pristine: torch.Tensor,
    terms: Terms,
    *,
    out_dtype: torch.dtype | None = None,
    safe: bool = False,
    key: str = "",
    device: torch.device | str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``pristine + Σ coef · ΔW`` over ``terms`` (``(coef, delta)`` pairs, applied in order), fp32 then one cast.

    ``out_dtype`` defaults to ``pristine.dtype``; ``device`` (default: the pristine weight's) is where the sum
    is computed and returned. ``out`` (a tensor of the weight's shape, e.g. a module's ``weight.data``) receives
    the result instead of a new tensor; a contiguous fp32 ``out`` is summed in directly (the same ops in the same
    order as the separate fp32 buffer, so the same bits, one pass and one buffer less). ``safe=True`` raises
    ``ValueError`` (naming ``key``) when the result, in the output dtype, holds NaN or Inf — a finite fp32 sum
    can still overflow fp16 — and then ``out`` is left untouched. Terms with coef 0 are skipped.

    >>> from lorablend.adapter import FullDelta
    >>> fused_weight(torch.ones(2, 2), [(2.0, FullDelta(torch.ones(2, 2)))]).sum().item()
    12.0
    """
    if out is not None:
        out_dtype, device = out.dtype, out.device
    out_dtype = out_dtype or pristine.dtype
    device = torch.device(device) if device is not None else pristine.device
    shape = tuple(pristine.shape)
    in_place = out is not None and out.dtype == torch.float32 and out.is_contiguous() and not safe
    with torch.no_grad():
        if in_place:
            base = out
            base.copy_(pristine)
        else:
            base = pristine.to(device=device, dtype=torch.float32, copy=True)
        flat = base.view(base.shape[0], -1)
        for coef, delta in terms:
            if coef == 0.0:
                continue
            if type(delta) is LowRankDelta:
                up, down = delta.factors()
                flat.addmm_(up.to(device), down.to(device), alpha=coef)
            else:
                base.add_(delta_weight_fp32(delta, shape, pristine, device), alpha=coef)
        if in_place:
            return out
        result = base.to(out_dtype)
        if safe and not bool(torch.isfinite(result).all()):
            raise ValueError(
                f"the fused weight of {key or 'a layer'} has NaN or Inf values in {out_dtype}; nothing was written. "
                "The adapter or the scale is broken for this dtype (try a smaller lora_scale or fp32)"
            )
        if out is not None:
            out.copy_(result)  # the one cast happened above; this is a same-dtype copy
            return out
        return result


def has_bias_terms(terms: Terms) -> bool:
    """True when some term changes the bias (a full diff with ``diff_b``).

    >>> has_bias_terms([])
    False
    """
    return any(isinstance(d, FullDelta) and d.diff_b is not None and c != 0.0 for c, d in terms)


def fused_bias(
    pristine_bias: torch.Tensor,
    terms: Terms,
    *,
    out_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``pristine_bias + Σ coef · Δb`` over the full-diff terms that carry a bias difference, fp32 then one cast.

    >>> from lorablend.adapter import FullDelta
    >>> fused_bias(torch.zeros(2), [(0.5, FullDelta(torch.ones(2, 2), diff_b=torch.ones(2)))]).tolist()
    [0.5, 0.5]
    """
    out_dtype = out_dtype or pristine_bias.dtype
    device = torch.device(device) if device is not None else pristine_bias.device
    with torch.no_grad():
        bias = pristine_bias.to(device=device, dtype=torch.float32, copy=True)
        for coef, delta in terms:
            if coef != 0.0 and isinstance(delta, FullDelta) and delta.diff_b is not None:
                bias.add_(delta.delta_bias().to(device), alpha=coef)
        return bias.to(out_dtype)


__all__ = ["delta_weight_fp32", "fused_bias", "fused_weight", "has_bias_terms"]
