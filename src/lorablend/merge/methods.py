"""One function per merge method, each a short composition of named steps, and the ``{method: function}`` table.

A method gets one :class:`Layer` (the deltas of every adapter at one target key, with their coefficients) and
the :class:`~.options.MergeSettings`, and returns a :class:`LayerResult`: the merged factors, the layer's
weight shape and the relative error against the exact weighted sum ``M = Σ c_i ΔW_i``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import LoraCompatibilityError
from ..kinds import Delta
from .linalg import (
    choose_rank,
    clamp_pair,
    rel_error_against_svd,
    rel_error_lowrank,
    svd_from_factors,
    truncate_dense,
)
from .options import DENSE_TASK, FACTORWISE, MergeSettings
from .task import COMBINATIONS

RANDOM_MASKS = ("dare", "della")  # methods whose masks are drawn: one seeded generator per layer

Shape = tuple[int, ...]


@dataclass(frozen=True)
class LayerTerm:
    """One adapter's share of a layer: its name (for messages), its delta and ``c = weight · block multiplier``."""

    name: str
    delta: Delta
    coeff: float


@dataclass(frozen=True)
class Layer:
    """The inputs of one target key: the terms of the adapters that have it, where to compute, and the
    standard model's shape for the key (None when unknown) for convs the inputs store flattened."""

    key: str
    terms: tuple[LayerTerm, ...]
    device: torch.device
    model_shape: Shape | None = None
    fallback_rank: int | None = None


@dataclass(frozen=True)
class LayerResult:
    """The merged layer: 2-D ``up`` (out×k) and ``down`` (k×in·kh·kw), the weight shape, the relative error
    against ``M``, how it was computed (``"factors"`` or ``"dense"``) and a note for the report."""

    up: torch.Tensor
    down: torch.Tensor
    shape: Shape
    rel_error: float
    path: str
    note: str = ""


# ------------------------------------------------------------------------------------------------ named steps


def flat2d(shape: Shape) -> tuple[int, int]:
    return int(shape[0]), int(math.prod(shape[1:]))


def layer_seed(seed: int, key: str) -> int:
    """A 63-bit seed from the merge seed and the target key: stable across runs and layer orders."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def agreed_shape(layer: Layer, shapes: list[tuple[str, Shape]]) -> Shape:
    """One weight shape for a layer; every input must flatten to the same (out, in·kh·kw).

    A conv stored flattened (LoHa/LoKr may give 2-D ΔW for convs) agrees with a 4-D one; the 4-D shape
    wins so the result is a proper conv LoRA. When only flattened shapes are known and an input kind may
    flatten convs, the standard model's shape for the key decides.
    """
    flat = {flat2d(s) for _, s in shapes}
    if len(flat) > 1:
        listed = ", ".join(f"{n}: {tuple(s)}" for n, s in shapes)
        raise LoraCompatibilityError(
            f"layer {layer.key!r} has different shapes across adapters ({listed}): these adapters were made for "
            f"different models; merge adapters of one model"
        )
    best = max((s for _, s in shapes), key=len)
    maybe_flattened = any(t.delta.may_flatten_convs for t in layer.terms)
    if len(best) == 2 and maybe_flattened and layer.model_shape is not None and flat2d(layer.model_shape) == flat2d(best):
        return layer.model_shape
    return best


def dense_delta(term: LayerTerm, key: str, options: MergeSettings) -> torch.Tensor:
    """A term's exact dense ΔW; kinds that need the base weight get it from ``base_weights``."""
    if not term.delta.needs_base:
        return term.delta.delta_weight()
    base = options.base_weight(key)
    if base is None:
        raise ValueError(
            f"{term.name!r} layer {key!r} is DoRA: its ΔW depends on the base weight, so it cannot be merged "
            f"offline; pass base_weights={{key: weight}} (or a callable), or fuse it on a model instead"
        )
    return term.delta.delta_weight(base=base)


@dataclass(frozen=True)
class _Exact:
    """A term as exact 2-D factors (``up @ down == c·ΔW`` without c) or, where factors would not be smaller, dense."""

    up: torch.Tensor | None
    down: torch.Tensor | None
    dense: torch.Tensor | None
    coeff: float


def exact_terms(layer: Layer, options: MergeSettings) -> tuple[list[_Exact], Shape]:
    """Every term as exact factors where its kind has them (scale folded in), else its dense ΔW; and the shape."""
    terms, shapes = [], []
    for term in layer.terms:
        factors = term.delta.exact_factors()
        if factors is not None:
            terms.append(_Exact(factors[0], factors[1], None, term.coeff))
            # the kind's own shape: 2-D for LoHa / LoKr convs stored flattened (see agreed_shape)
            shapes.append((term.name, tuple(term.delta.shape)))
        else:
            dense = dense_delta(term, layer.key, options)
            terms.append(_Exact(None, None, dense, term.coeff))
            shapes.append((term.name, tuple(dense.shape)))
    return terms, agreed_shape(layer, shapes)


def rank_cap(layer: Layer, options: MergeSettings) -> int | None:
    """The rank cap: ``rank=``; else none when ``energy=`` decides alone; else the largest input rank here."""
    if options.rank is not None:
        return options.rank
    if options.energy is not None:
        return None
    ranks = [t.delta.rank for t in layer.terms if isinstance(t.delta.rank, int)]
    if ranks:
        return max(ranks)
    if layer.fallback_rank is not None:
        return layer.fallback_rank
    raise ValueError(f"layer {layer.key!r}: no input has a rank to default to (full diffs only): pass rank=, e.g. rank=64")


def exact_sum(terms: list[_Exact], out: int, n: int, dev: torch.device) -> torch.Tensor:
    """The dense ``M = Σ c_i ΔW_i``."""
    m = torch.zeros(out, n, device=dev)
    for t in terms:
        m += t.coeff * (t.dense.reshape(out, n).to(dev) if t.dense is not None else t.up.to(dev) @ t.down.to(dev))
    return m


# ------------------------------------------------------------------------------------------------ the methods


def merge_cat(layer: Layer, options: MergeSettings) -> LayerResult:
    """Exact: the weighted factors stacked side by side (dense terms as exact ``(ΔW, I)`` factors)."""
    terms, shape = exact_terms(layer, options)
    out, n = flat2d(shape)
    dev = layer.device
    ups, downs = [], []
    for t in terms:
        if t.dense is not None:
            # Exact factors of a dense ΔW: (ΔW, I) on its smaller side; x·1 + 0·y is exact in fp32.
            mat = t.dense.reshape(out, n).to(dev)
            ups.append(t.coeff * mat if n <= out else t.coeff * torch.eye(out, device=dev))
            downs.append(torch.eye(n, device=dev) if n <= out else mat)
        else:
            ups.append(t.coeff * t.up.to(dev))
            downs.append(t.down.to(dev))
    return LayerResult(torch.cat(ups, dim=1), torch.cat(downs, dim=0), shape, 0.0, "factors")


def merge_svd(layer: Layer, options: MergeSettings) -> LayerResult:
    """The optimal rank-k approximation of ``M``: from the stacked factors (QR + a small SVD) when every term
    has factors and their total rank is below the layer's smaller side, else from the dense ``M``."""
    terms, shape = exact_terms(layer, options)
    out, n = flat2d(shape)
    dev = layer.device
    k_max = rank_cap(layer, options)
    total_rank = sum(t.up.shape[1] for t in terms if t.dense is None)
    if any(t.dense is not None for t in terms) or total_rank >= min(out, n):
        m = exact_sum(terms, out, n, dev)
        up, down, err, note = truncate_dense(m, k_max, options.energy, options.clamp, reference=m)
        return LayerResult(up, down, shape, err, "dense", note)
    u_cat = torch.cat([t.coeff * t.up.to(dev) for t in terms], dim=1)
    d_cat = torch.cat([t.down.to(dev) for t in terms], dim=0)
    left, s, right = svd_from_factors(u_cat, d_cat)
    k = choose_rank(s, k_max, options.energy)
    up, down = left[:, :k] * s[:k], right[:k]
    if options.clamp is not None:
        up, down = clamp_pair(up, down, options.clamp)
        return LayerResult(up, down, shape, rel_error_against_svd(left, s, right, up, down), "factors",
                           f"clamp {options.clamp}")
    # The core's SVD is the exact SVD of M, so the error of the truncation is its singular tail.
    s64 = s.double()
    total = float((s64 * s64).sum())
    err = math.sqrt(float((s64[k:] ** 2).sum()) / total) if total > 0 else 0.0
    return LayerResult(up, down, shape, err, "factors")


def merge_factorwise(layer: Layer, options: MergeSettings) -> LayerResult:
    """PEFT's ``add_weighted_adapter`` definitions on the factors separately: ``down' = Σ sign(c_i s_i)·√|c_i s_i|·D_i``
    and ``up' = Σ √|c_i s_i|·U_i`` (pruned and sign-elected per method). An approximation of ``M`` (cross terms
    ``U_i D_j``) that needs LoRA inputs of equal rank."""
    method = options.method
    # the same pruning on the dense ΔW_i, where the method has such a twin ('linear' has none: 'svd' is its twin)
    twin = f", or {method + '_svd'!r}" if method + "_svd" in DENSE_TASK else ""
    for t in layer.terms:
        if t.delta.low_rank_factors() is None:
            raise ValueError(
                f"method={method!r} combines LoRA factors, but {t.name!r} layer {layer.key!r} is {t.delta.kind}: "
                f"use method='svd' or 'cat'{twin}, which work on the exact ΔW"
            )
    ranks = {t.name: t.delta.rank for t in layer.terms}
    if len(set(ranks.values())) > 1:
        listed = ", ".join(f"{n}: rank {r}" for n, r in ranks.items())
        raise ValueError(
            f"method={method!r} needs equal ranks (it sums factors), but layer {layer.key!r} has {listed}: "
            f"use method='svd' or 'cat'{twin}"
        )
    shape = agreed_shape(layer, [(t.name, tuple(t.delta.shape)) for t in layer.terms])
    dev = layer.device
    ups, downs, w_up, w_down = [], [], [], []
    for t in layer.terms:
        up, down = t.delta.unscaled_factors()
        ws = t.coeff * t.delta.scale
        # As PEFT: split |c·s| evenly between the factors and put the sign on down only.
        w_down.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
        w_up.append(math.sqrt(abs(ws)))
        ups.append(up.to(dev))
        downs.append(down.to(dev))
    combine = COMBINATIONS[method]
    gen = torch.Generator(device=dev).manual_seed(layer_seed(options.layer_seed_base, layer.key)) if method.startswith(RANDOM_MASKS) else None
    # PEFT draws the down (lora_A) masks first, then the up (lora_B) masks; same order here.
    down_m = combine(downs, w_down, density=options.density, majority_sign=options.majority_sign, gen=gen)
    up_m = combine(ups, w_up, density=options.density, majority_sign=options.majority_sign, gen=gen)
    # Reference M from the exact factors, error from Gram matrices: no dense ΔW.
    u_ref = torch.cat([t.coeff * t.delta.low_rank_factors()[0].to(dev) for t in layer.terms], dim=1)
    d_ref = torch.cat([t.delta.low_rank_factors()[1].to(dev) for t in layer.terms], dim=0)
    return LayerResult(up_m, down_m, shape, rel_error_lowrank(u_ref, d_ref, up_m, down_m), "factors")


def merge_dense_task(layer: Layer, options: MergeSettings) -> LayerResult:
    """``ties_svd`` and friends: PEFT's pruning and sign election on the dense per-adapter ``ΔW_i`` (any kinds,
    any ranks), then the truncated SVD; the error is against the exact ``M``."""
    dense = [dense_delta(t, layer.key, options) for t in layer.terms]
    shape = agreed_shape(layer, [(t.name, tuple(d.shape)) for t, d in zip(layer.terms, dense)])
    out, n = flat2d(shape)
    dev = layer.device
    mats = [d.reshape(out, n).to(dev) for d in dense]
    coeffs = [t.coeff for t in layer.terms]
    method = options.method
    gen = torch.Generator(device=dev).manual_seed(layer_seed(options.layer_seed_base, layer.key)) if method.startswith(RANDOM_MASKS) else None
    m = COMBINATIONS[method[: -len("_svd")]](mats, coeffs, density=options.density, majority_sign=options.majority_sign, gen=gen)
    reference = torch.zeros(out, n, device=dev)
    for mat, c in zip(mats, coeffs):
        reference += c * mat
    up, down, err, note = truncate_dense(m, rank_cap(layer, options), options.energy, options.clamp, reference=reference)
    return LayerResult(up, down, shape, err, "dense", note)


MethodFn = Callable[[Layer, MergeSettings], LayerResult]
METHOD_TABLE: dict[str, MethodFn] = {
    "cat": merge_cat,
    "svd": merge_svd,
    **{m: merge_factorwise for m in FACTORWISE},
    **{m: merge_dense_task for m in DENSE_TASK},
}
