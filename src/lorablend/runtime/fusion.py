"""The one fused-weight formula: ``W = W0 + Σ c_i · ΔW_i``, computed in fp32 from the pristine ``W0``, cast once.

Every place that writes LoRA deltas into weights uses these functions — ``fuse_lora`` on a live pipeline and the
offline bake into a checkpoint file — so both give the same bits for the same inputs. Why this exact shape:

* **From the pristine weight, in fp32.** Summing into an fp16 weight term by term rounds after every term;
  starting again from ``W0`` means unfusing never needs a subtraction.
* **All low-rank terms in ONE ``addmm``** on the flattened ``(out, -1)`` view: their factors are concatenated
  (``U = [c1·U1 | c2·U2 …]``, ``D = [D1; D2; …]``, ``low_rank_factors``), so each weight is read and written
  once whatever the number of adapters, and no dense ``ΔW`` is materialised for LoRA/LoCon. Other kinds
  (LoHa, LoKr, full, DoRA) are added after it as dense ``ΔW``, in order.
* **DoRA is relative to ``W0``** (its delta depends on the base weight), never to a partly fused weight.
* **One cast** to the output dtype at the end.

The functions read their inputs and return new tensors (or write into the ``out`` they are given).

>>> import torch
>>> from lorablend.adapter import LowRankDelta
>>> w0 = torch.zeros(4, 3, dtype=torch.float16)
>>> d = LowRankDelta(down=torch.ones(1, 3), up=torch.ones(4, 1))
>>> fused_weight(w0, [(0.5, d)]).tolist()[0]
[0.5, 0.5, 0.5]
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from ..adapter import Delta
from .transfer import map_tensors

WeightedDeltas = Sequence[tuple[float, Delta]]  # (coef, delta) pairs, applied in order


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block's CPU tensor ops on the calling thread alone (``torch.set_num_threads(1)``, put back after).

    For the small factor work of a fuse: casting, scaling and concatenating ``(out, r)`` / ``(r, in)`` factors
    (a few hundred kB each, ~0.1 ms on one core even at Wan 14B's width). Spread over threads it gains nothing,
    and each parallel op waits at a barrier for every thread of the team: on a machine whose cores are busy
    that wait is a scheduler time slice, 3–7 ms per op measured on a loaded 2-core box — about 1 s of the
    ~280 small ops of a 20-layer fuse, where the layers' own ``addmm`` took 2 s (benchmarks/RESULTS.md,
    issue 19's Wan 14B fuse). With OpenMP (torch's CPU backend) the count set here is the calling thread's
    own; other threads already running torch ops keep theirs (one whose very first torch op falls inside the
    block would start with one thread). GPU ops are not affected.

    >>> before = torch.get_num_threads()
    >>> with one_thread():
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def delta_weight_fp32(
    delta: Delta, shape: tuple[int, ...], pristine: torch.Tensor, device: torch.device | str | None = None
) -> torch.Tensor:
    """The fp32 ``ΔW`` of ``delta`` for a weight of ``shape`` on ``device``; DoRA is taken relative to ``pristine``.

    >>> from lorablend.adapter import FullDelta
    >>> delta_weight_fp32(FullDelta(torch.ones(2, 2)), (2, 2), torch.zeros(2, 2)).dtype
    torch.float32
    """
    device = torch.device(device) if device is not None else pristine.device
    if delta.needs_base:  # (DoRA) computed where the base weight is, from the pristine weight
        on_device = map_tensors(delta, lambda t: t.to(device))
        return on_device.delta_weight(shape, base=pristine.to(device))
    pair = delta.low_rank_factors()
    if pair is not None:
        up, down = pair
        return (up.to(device) @ down.to(device)).reshape(shape)
    return delta.delta_weight(shape).to(device)


def low_rank_factors(
    terms: WeightedDeltas, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """fp32 ``(U, D)`` with ``U @ D = Σ coef · ΔW`` over the plain low-rank terms of ``terms``, or ``None``.

    The factors are concatenated, ``U = [c1·s1·U1 | c2·s2·U2 …]`` and ``D = [D1; D2; …]`` (``s`` the alpha/rank
    scale), so the whole low-rank sum is ONE matrix product with no cross terms. Deltas that are not one cheap
    low-rank pair (their ``low_rank_factors()`` is None: LoHa, LoKr, full, DoRA), or have coef 0, are left out.
    ``device`` defaults to the first factor's.

    >>> from lorablend.adapter import LowRankDelta
    >>> a, b = LowRankDelta(torch.ones(1, 3), torch.ones(2, 1)), LowRankDelta(torch.ones(2, 3), torch.ones(2, 2))
    >>> [t.shape for t in low_rank_factors([(1.0, a), (0.5, b)])]
    [torch.Size([2, 3]), torch.Size([3, 3])]
    """
    with one_thread():  # small tensors: see one_thread
        pairs = [(float(c), pair) for c, d in terms if c != 0.0 and (pair := d.low_rank_factors()) is not None]
        return concat_factors(pairs, device)


def concat_factors(
    pairs: Sequence[tuple[float, tuple[torch.Tensor, torch.Tensor]]], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """fp32 ``(U, D)`` from ``(coef, (up, down))`` pairs (each a kind's ``low_rank_factors()``): ``U = [c1·U1 | …]``,
    ``D = [D1; …]``, or None when there is no pair. ``device`` defaults to the first factor's.

    >>> concat_factors([(2.0, (torch.ones(2, 1), torch.ones(1, 3)))])[0].tolist()
    [[2.0], [2.0]]
    """
    if not pairs:
        return None
    device = torch.device(device) if device is not None else pairs[0][1][0].device
    out_f, in_flat = int(pairs[0][1][0].shape[0]), int(pairs[0][1][1].shape[1])
    rank = sum(int(up.shape[1]) for _, (up, _) in pairs)
    U = torch.empty(out_f, rank, dtype=torch.float32, device=device)
    D = torch.empty(rank, in_flat, dtype=torch.float32, device=device)
    at = 0
    # (no one_thread here: the callers that fuse put the kinds' casts and this in ONE serial stretch; a serial
    # stretch between parallel ops costs a wake-up of the other threads, measured worse in LayerState.build)
    for coef, (up, down) in pairs:
        r = int(up.shape[1])
        U[:, at:at + r].copy_(up)
        if coef != 1.0:
            U[:, at:at + r].mul_(coef)
        D[at:at + r].copy_(down)
        at += r
    return U, D


def fused_weight(
    pristine: torch.Tensor,
    terms: WeightedDeltas,
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
    rows = shape[0] if shape else 1
    direct = out is not None and out.dtype == torch.float32 and out.is_contiguous() and not safe
    with torch.no_grad():
        with one_thread():  # the factors' casts, scales and copies are small: parallel ops would only wait
            pairs = [d.low_rank_factors() if c != 0.0 else None for c, d in terms]  # (asked once per delta)
            factors = concat_factors([(float(c), p) for (c, _), p in zip(terms, pairs) if p is not None], device)
        src = pristine if pristine.device == device else pristine.to(device)
        if factors is not None and src.dtype == torch.float32 and src.is_contiguous():
            # one pass: read W0, write W0 + U @ D (addmm copies W0 into the result, then one gemm with beta=1:
            # the same bits as copy-then-addmm_, without a separate copy pass)
            target = out.view(rows, -1) if direct else None
            base = torch.addmm(src.view(rows, -1), *factors, out=target).view(shape)
        else:
            if direct:
                base = out
                base.copy_(src)
            else:
                base = src.to(dtype=torch.float32, copy=True)
            if factors is not None:
                base.view(rows, -1).addmm_(*factors)
        for (coef, delta), pair in zip(terms, pairs):  # the deltas with no low-rank pair, as dense ΔW, in order
            if coef != 0.0 and pair is None:
                base.add_(delta_weight_fp32(delta, shape, pristine, device), alpha=coef)
        if direct:
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


def has_bias_terms(terms: WeightedDeltas) -> bool:
    """True when some term changes the bias (a full diff with ``diff_b``).

    >>> has_bias_terms([])
    False
    """
    return any(d.changes_bias and c != 0.0 for c, d in terms)


def fused_bias(
    pristine_bias: torch.Tensor,
    terms: WeightedDeltas,
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
            if coef != 0.0 and delta.changes_bias:
                bias.add_(delta.delta_bias().to(device), alpha=coef)
        return bias.to(out_dtype)


__all__ = ["concat_factors", "delta_weight_fp32", "fused_bias", "fused_weight", "has_bias_terms", "low_rank_factors",
           "one_thread"]
