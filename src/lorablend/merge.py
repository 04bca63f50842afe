"""Merge several Adapters into one LoRA: pure math on Adapters, never a model.

Notation, per target layer: ``ΔW_i`` is adapter *i*'s exact delta with its own alpha/rank scale
``s_i`` already applied (``Delta.delta_weight()``), ``w_i`` the user weight, ``b_i`` the block
multiplier from ``block_weights`` (1 when absent) and ``c_i = w_i · b_i``. The *exact weighted sum*
is ``M = Σ_i c_i ΔW_i``; every result is reported against it.

Methods (``METHODS``):

* ``cat`` — exact. The factors are stacked: ``up = [c_1·s_1·U_1, c_2·s_2·U_2, …]``,
  ``down = [D_1; D_2; …]``, ``alpha = rank = Σ r_i`` so the result's own scale is 1. Non-LoRA kinds
  join through exact factors too (LoHa by its Khatri-Rao product, rank r₁·r₂; LoKr / full diff /
  DoRA as ``(ΔW, I)``, rank ``min(out, in)``), so ``cat`` stays exact for every kind.
* ``svd`` — the optimal rank-k approximation of ``M`` (Eckart–Young). When every input is low-rank,
  it is computed from the factors: QR of the stacked ``up`` (out×R) and ``downᵀ`` (in×R), SVD of the
  R×R core; no dense ``ΔW`` is formed. Otherwise (mixed kinds, or R ≥ min(out, in)) it is the SVD of
  the dense ``M``. ``rank=`` fixes k (default: per layer, the largest input rank at that layer;
  PEFT uses the largest adapter rank overall), ``energy=`` picks per layer the smallest k that keeps
  that fraction of ``Σσ²`` (capped by ``rank=`` only when both are given), ``clamp=`` clamps both factors at
  that quantile of their combined signed values, as kohya's ``svd_merge_lora.py`` does. Each ``s_i``
  is applied exactly once (tested against the exact math with alpha ≠ rank; peft 0.21.2 agrees, though
  older peft code was reported to apply it twice).
  ``up = U·diag(σ)``, ``down = Vᵀ`` (kohya's layout, so ``clamp`` means what it means there), and each
  singular pair's sign is fixed so that the largest-magnitude entry of its ``up`` column is positive:
  results do not depend on the SVD backend's sign choice.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` — PEFT's
  ``add_weighted_adapter`` definitions, applied to the *factors* separately: ``down' = Σ
  sign(c_i s_i)·√|c_i s_i|·D_i`` and ``up' = Σ √|c_i s_i|·U_i`` (with pruning / sign election per
  method). These are approximations of ``M`` (the product has cross terms ``U_i D_j``); they need equal
  ranks at each layer and LoRA/LoCon inputs. Kept for parity with PEFT and the diffusers guide.
* ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd`` — the same pruning
  and sign election on the dense per-adapter ``ΔW_i``, then the truncated SVD (any kinds, any ranks).

``density`` is the kept fraction (PEFT's meaning). DARE masks come from a ``torch.Generator``
seeded per layer from ``seed`` and the target key (``_layer_seed``), so results do not depend on
layer order and are the same on every run for a given ``seed`` (default 0).

Layers present in only some adapters are merged with the missing ones as zero. DoRA layers depend
on the base weight: they merge only when ``base_weights`` gives it (then through their dense ΔW).
A full diff's bias difference cannot be carried by a LoRA: it is dropped and listed in the result's
``report`` as ``unsupported``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

import torch

from .adapter import Adapter, Delta, DoRADelta, FullDelta, LoHaDelta, LoKrDelta, LowRankDelta
from .errors import LoraCompatibilityError
from .report import LoadReport

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = (
    "cat",
    "svd",
    "linear",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "ties_svd",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune_svd",
)
_FACTORWISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_DENSE_TASK = ("ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
_TRUNCATING = ("svd", *_DENSE_TASK)
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune", *_DENSE_TASK)
_NEEDS_SIGN = ("ties", "dare_ties", "ties_svd", "dare_ties_svd")

BlockWeights = Union[Mapping[str, float], Sequence[Union[Mapping[str, float], None]], None]
BaseWeights = Union[Mapping[str, torch.Tensor], Callable[[str], torch.Tensor], None]

# torch.quantile refuses inputs above 2**24 elements; larger ones take the sort-based path.
_TORCH_QUANTILE_LIMIT = 1 << 24


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerMerge:
    """One merged layer: the rank written, the relative Frobenius error ``‖M - result‖ / ‖M‖`` against
    the exact weighted sum ``M`` (0 when ``M`` is 0), which adapters contributed and how it was computed
    (``"factors"``: from the low-rank factors only; ``"dense"``: through the dense ΔW)."""

    key: str
    rank: int
    rel_error: float
    sources: tuple[str, ...]
    path: str
    note: str = ""


@dataclass
class MergeReport:
    """What a merge did, layer by layer.

    >>> r = MergeReport(method="svd", adapters=["a", "b"], weights=[0.7, 0.8])
    >>> r.layers.append(LayerMerge("unet.x", 4, 1e-3, ("a", "b"), "factors"))
    >>> r.max_rel_error
    0.001
    """

    method: str
    adapters: list[str]
    weights: list[float]
    layers: list[LayerMerge] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    @property
    def max_rel_error(self) -> float:
        return max((layer.rel_error for layer in self.layers), default=0.0)

    @property
    def ranks(self) -> dict[str, int]:
        return {layer.key: layer.rank for layer in self.layers}

    def summary(self) -> str:
        ranks = sorted({layer.rank for layer in self.layers})
        rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]}" if ranks else "-"
        errors = [layer.rel_error for layer in self.layers]
        mean = sum(errors) / len(errors) if errors else 0.0
        lines = [
            f"{self.method} merge of {', '.join(self.adapters)} (weights {self.weights}): {len(self.layers)} layers, "
            f"rank {rank_text}, relative error mean {mean:.2e} max {self.max_rel_error:.2e}"
        ]
        lines += [f"  dropped: {d}" for d in self.dropped]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "adapters": list(self.adapters),
            "weights": list(self.weights),
            "max_rel_error": self.max_rel_error,
            "dropped": list(self.dropped),
            "layers": [
                {
                    "key": layer.key,
                    "rank": layer.rank,
                    "rel_error": layer.rel_error,
                    "sources": list(layer.sources),
                    "path": layer.path,
                    "note": layer.note,
                }
                for layer in self.layers
            ],
        }

    def __str__(self) -> str:
        return self.summary()


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def merge(
    adapters: Sequence[Adapter],
    weights: Sequence[float] | None,
    method: str = "svd",
    *,
    rank: int | None = None,
    energy: float | None = None,
    clamp: float | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    seed: int | None = None,
    block_weights: BlockWeights = None,
    name: str | None = None,
    device: str | torch.device | None = None,
    base_weights: BaseWeights = None,
    progress: bool = False,
) -> Adapter:
    """Merge adapters into one LoRA Adapter (see the module docstring for every method's math).

    ``weights`` has one float per adapter (``None``: all 1). The result holds ``LowRankDelta`` layers
    in float32 with ``alpha == rank`` (scale 1), provenance in ``metadata`` (``modelspec.merged_from``,
    ``lorablend.merge.*``) and one ``report`` record per layer whose reason reads
    ``"rank 32, rel_err 1.2e-03"``. Use :func:`merge_with_report` for the structured per-layer report.

    ``block_weights`` multiplies each layer by its block's factor: a dict ``{"IN04": 0.5, "OUT03": 0.0}``
    for every adapter, or a list with one such dict (or ``None``) per adapter; labels are those of
    ``lorablend.naming`` (``BASE``, ``IN00``…, ``M00``, ``OUT00``…); unlisted blocks weigh 1.
    ``base_weights`` (a dict or a callable, target key -> base weight) lets DoRA layers merge.
    ``device`` is where the math runs (e.g. ``"cuda"``); results come back to the inputs' device.

    >>> a = Adapter("a", "sd1", {"unet.x": LowRankDelta(down=torch.randn(4, 8), up=torch.randn(6, 4), alpha=2.0)})
    >>> b = Adapter("b", "sd1", {"unet.x": LowRankDelta(down=torch.randn(8, 8), up=torch.randn(6, 8))})
    >>> merged = merge([a, b], [0.7, 0.8], method="svd", rank=4)
    >>> merged.deltas["unet.x"].rank, merged.metadata["modelspec.merged_from"]
    (4, 'a, b')
    """
    adapters = list(adapters)
    weights = _check_args(adapters, weights, method, rank, energy, clamp, density, majority_sign, seed)
    per_adapter_blocks = _normalize_block_weights(block_weights, adapters)
    seed = 0 if seed is None else int(seed)
    names = [a.name for a in adapters]
    report = MergeReport(method=method, adapters=names, weights=list(weights))
    load_report = LoadReport(source=f"merge of {', '.join(names)}", format="merge")

    family = adapters[0].family
    keys = _ordered_keys(adapters)
    if not keys:
        raise ValueError("nothing to merge: the adapters have no layers; pass adapters read from LoRA files")
    default_rank = _fallback_rank(adapters)
    compute_device = torch.device(device) if device is not None else None

    deltas: dict[str, LowRankDelta] = {}
    iterator = keys
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(keys, desc=f"merge ({method})", unit="layer")
    for key in iterator:
        present = [(i, a.deltas[key]) for i, a in enumerate(adapters) if key in a.deltas]
        coeffs = [weights[i] * _block_multiplier(per_adapter_blocks, i, key, adapters[i].family) for i, _ in present]
        sources = tuple(names[i] for i, _ in present)
        out_device = _first_tensor(present[0][1]).device
        dev = compute_device or out_device
        for i, delta in present:
            if isinstance(delta, FullDelta) and delta.diff_b is not None:
                what = f"{key}.diff_b ({names[i]})"
                report.dropped.append(what)
                load_report.add(f"{key}.diff_b", "unsupported", reason=f"bias difference of {names[i]} dropped: a LoRA carries no bias")
                logger.warning("merge: dropped the bias difference of %s at %s (a LoRA carries no bias)", names[i], key)

        if method in _FACTORWISE:
            up, down, shape, err, path = _merge_factorwise(key, present, coeffs, names, family, method, density, majority_sign, seed, dev)
            note = ""
        elif method in _DENSE_TASK:
            up, down, shape, err, path, note = _merge_dense_task(
                key, present, coeffs, names, family, method, density, majority_sign, seed, dev, base_weights, rank, energy, clamp, default_rank
            )
        else:
            up, down, shape, err, path, note = _merge_exact_or_svd(
                key, present, coeffs, names, family, method, dev, base_weights, rank, energy, clamp, default_rank
            )
        k = int(down.shape[0])
        deltas[key] = _as_lowrank(up.to(out_device), down.to(out_device), shape)
        report.layers.append(LayerMerge(key, k, err, sources, path, note))
        load_report.add(key, "mapped", target=key, reason=f"rank {k}, rel_err {err:.1e}" + (f", {note}" if note else ""))

    merged_name = name or "+".join(names)
    result = Adapter(
        merged_name,
        adapters[0].family,
        deltas,
        metadata=_provenance(adapters, weights, method, report, rank, energy, clamp, density, majority_sign, seed, block_weights),
        report=load_report,
    )
    result.merge_report = report
    return result


def merge_with_report(
    adapters: Sequence[Adapter], weights: Sequence[float] | None, method: str = "svd", **options: Any
) -> tuple[Adapter, MergeReport]:
    """:func:`merge`, also returning the :class:`MergeReport` (per layer: rank, relative error, sources).

    >>> a = Adapter("a", "sd1", {"unet.x": LowRankDelta(down=torch.randn(4, 8), up=torch.randn(6, 4))})
    >>> merged, report = merge_with_report([a, a], [1.0, -1.0], method="cat")
    >>> report.layers[0].rank, report.layers[0].rel_error
    (8, 0.0)
    """
    result = merge(adapters, weights, method, **options)
    return result, result.merge_report


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_args(adapters, weights, method, rank, energy, clamp, density, majority_sign, seed) -> list[float]:
    if not adapters:
        raise ValueError("adapters is empty: pass at least one Adapter (e.g. from lorablend.load_adapter)")
    for i, a in enumerate(adapters):
        if not isinstance(a, Adapter):
            raise TypeError(f"adapters[{i}] is a {type(a).__name__}, not an Adapter: read files with lorablend.load_adapter first")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a merge method: use one of {', '.join(METHODS)}")
    if weights is None:
        weights = [1.0] * len(adapters)
    weights = list(weights)
    if len(weights) != len(adapters):
        raise ValueError(
            f"weights has {len(weights)} entries for {len(adapters)} adapters: pass one weight per adapter"
        )
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"weights[{i}] = {w!r} is not a finite number: pass floats such as 0.7")
    weights = [float(w) for w in weights]

    families = {}
    for a in adapters:
        families.setdefault(a.family, a)
    if len(families) > 1:
        (fa, a), (fb, b) = list(families.items())[:2]
        raise LoraCompatibilityError(
            f"cannot merge {a.name!r} ({fa}) with {b.name!r} ({fb}): they were made for different model families; "
            f"merge adapters of one family only"
        )

    if rank is not None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"rank={rank!r} must be a positive integer (e.g. rank=64), or None for the default")
    if energy is not None and not (isinstance(energy, (int, float)) and 0.0 < energy <= 1.0):
        raise ValueError(f"energy={energy!r} must lie in (0, 1]: the fraction of squared singular values kept, e.g. 0.99")
    if clamp is not None and not (isinstance(clamp, (int, float)) and 0.0 < clamp <= 1.0):
        raise ValueError(f"clamp={clamp!r} must lie in (0, 1]: a quantile such as kohya's 0.99")
    if method not in _TRUNCATING:
        for arg, value in (("rank", rank), ("energy", energy), ("clamp", clamp)):
            if value is not None:
                what = "the rank is the sum of the input ranks" if method == "cat" else "it keeps the input rank"
                raise ValueError(
                    f"{arg}= does not apply to method={method!r} ({what}): use method='svd' or a *_svd method"
                )
    if method in _NEEDS_DENSITY:
        if density is None:
            raise ValueError(f"method={method!r} needs density= (the fraction of values kept, in (0, 1], e.g. 0.5)")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
            raise ValueError(f"density={density!r} must lie in (0, 1]: the fraction of values kept, e.g. 0.5")
    elif density is not None:
        raise ValueError(f"density= does not apply to method={method!r}: use one of {', '.join(_NEEDS_DENSITY)}")
    if majority_sign not in ("total", "frequency"):
        raise ValueError(f"majority_sign={majority_sign!r} must be 'total' (sign of the sum) or 'frequency' (sign count)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed={seed!r} must be an integer")
    return weights


def _normalize_block_weights(block_weights: BlockWeights, adapters: Sequence[Adapter]) -> list[dict[str, float] | None] | None:
    """Per adapter, ``{block label: multiplier}`` over the family's labels (or None: all 1).

    Accepts one spec for every adapter (a dict ``{"IN04": 0.5}`` or an LBW-ordered list of floats), or a
    list with one spec (or None) per adapter. Labels are checked by lorablend.naming.
    """
    if block_weights is None:
        return None
    n = len(adapters)
    is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if isinstance(block_weights, Mapping) or (
        isinstance(block_weights, (list, tuple)) and block_weights and all(is_number(v) for v in block_weights)
    ):
        specs = [block_weights] * n
    elif isinstance(block_weights, (list, tuple)):
        if len(block_weights) != n:
            raise ValueError(
                f"block_weights has {len(block_weights)} entries for {n} adapters: pass one spec (dict, LBW list or "
                f"None) per adapter, or a single dict such as {{'IN04': 0.5}} for all"
            )
        specs = list(block_weights)
    else:
        raise ValueError(
            "block_weights must be a dict {block label: weight}, an LBW-ordered list of floats, or a list of such "
            "specs with one per adapter"
        )
    tables: list[dict[str, float] | None] = []
    for spec, adapter in zip(specs, adapters):
        if spec is None:
            tables.append(None)
            continue
        values = spec.values() if isinstance(spec, Mapping) else spec
        for value in values:
            if not is_number(value) or not math.isfinite(value):
                raise ValueError(f"block_weights for {adapter.name!r} holds {value!r}: every weight must be a finite number")
        from .naming import expand_block_weights

        index = _standard_index(adapter.family)
        tables.append(expand_block_weights(spec, adapter.family, index.block_labels()))
    return tables


# --------------------------------------------------------------------------------------------
# The model vocabulary: the single place that talks to lorablend.naming
# --------------------------------------------------------------------------------------------


def _standard_index(family: str):
    """lorablend.naming's index of the family's standard architecture (block labels, weight shapes)."""
    from .naming import standard_index

    return standard_index(family)


def _block_multiplier(tables: list[dict[str, float] | None] | None, i: int, key: str, family: str) -> float:
    if tables is None or tables[i] is None:
        return 1.0
    # Keys outside the standard architecture (label "OTHER") keep weight 1.
    return float(tables[i].get(_standard_index(family).block(key), 1.0))


def _module_shape(family: str, key: str) -> tuple[int, ...] | None:
    """The standard model's weight shape for a key, used only when the inputs leave a conv's shape ambiguous."""
    try:
        info = _standard_index(family).modules.get(key)
    except Exception:  # noqa: BLE001 - an index we cannot build only means "unknown"
        return None
    return tuple(info.weight_shape) if info is not None else None


# --------------------------------------------------------------------------------------------
# Per-layer pieces
# --------------------------------------------------------------------------------------------


def _layer_seed(seed: int, key: str) -> int:
    """A 63-bit seed from the merge seed and the target key: stable across runs and layer orders."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _ordered_keys(adapters: Sequence[Adapter]) -> list[str]:
    seen: dict[str, None] = {}
    for a in adapters:
        for key in a.deltas:
            seen.setdefault(key, None)
    return list(seen)


def _fallback_rank(adapters: Sequence[Adapter]) -> int | None:
    ranks = [d.rank for a in adapters for d in a.deltas.values() if isinstance(d.rank, int)]
    return max(ranks) if ranks else None


def _first_tensor(delta: Delta) -> torch.Tensor:
    return next(iter(delta.tensors()))


def _flat2d(shape: tuple[int, ...]) -> tuple[int, int]:
    return int(shape[0]), int(math.prod(shape[1:]))


def _natural_shape(delta: Delta, dense: torch.Tensor | None) -> tuple[int, ...]:
    if isinstance(delta, LowRankDelta):
        return tuple(delta.natural_shape())
    if isinstance(delta, FullDelta):
        return tuple(delta.diff.shape)
    assert dense is not None
    return tuple(dense.shape)


def _layer_shape(key: str, shapes: list[tuple[str, tuple[int, ...]]], family: str, maybe_flattened: bool = False) -> tuple[int, ...]:
    """One weight shape for a layer; every input must flatten to the same (out, in·kh·kw).

    A conv stored flattened (LoHa/LoKr may give 2-D ΔW for convs) agrees with a 4-D one; the 4-D shape
    wins so the result is a proper conv LoRA. When only flattened shapes are known (``maybe_flattened``),
    the standard model's shape for the key decides.
    """
    flat = {_flat2d(s) for _, s in shapes}
    if len(flat) > 1:
        listed = ", ".join(f"{n}: {tuple(s)}" for n, s in shapes)
        raise LoraCompatibilityError(
            f"layer {key!r} has different shapes across adapters ({listed}): these adapters were made for "
            f"different models; merge adapters of one model"
        )
    best = max((s for _, s in shapes), key=len)
    if len(best) == 2 and maybe_flattened:
        known = _module_shape(family, key)
        if known is not None and _flat2d(known) == _flat2d(best):
            return known
    return best


def _dense_delta(delta: Delta, key: str, adapter_name: str, base_weights: BaseWeights) -> torch.Tensor:
    if isinstance(delta, DoRADelta):
        base = None
        if callable(base_weights):
            base = base_weights(key)
        elif base_weights is not None:
            base = base_weights.get(key)
        if base is None:
            raise ValueError(
                f"{adapter_name!r} layer {key!r} is DoRA: its ΔW depends on the base weight, so it cannot be merged "
                f"offline; pass base_weights={{key: weight}} (or a callable), or fuse it on a model instead"
            )
        return delta.delta_weight(base_weight=base)
    return delta.delta_weight()


@dataclass
class _Term:
    """One adapter's share of a layer: exact 2-D factors (``up @ down == ΔW``) or, failing that, dense ΔW."""

    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    dense: torch.Tensor | None = None


def _exact_term(delta: Delta, key: str, adapter_name: str, base_weights: BaseWeights) -> tuple[_Term, tuple[int, ...]]:
    # The shape returned is the delta's own: 2-D for LoHa / LoKr convs stored flattened (see _layer_shape).
    """Exact 2-D fp32 factors of one delta (scale folded in), or its dense ΔW where factors would not be smaller."""
    if isinstance(delta, LowRankDelta):
        up, down = delta.factors()
        return _Term(up=up, down=down), tuple(delta.natural_shape())
    if isinstance(delta, LoHaDelta) and delta.t1 is None and delta.t2 is None:
        # (U1 D1) ⊙ (U2 D2) = (U1 ⊙row U2)(D1 ⊙col D2): the face-splitting product is exact at rank r1·r2.
        u1, d1 = delta.w1_a.float(), delta.w1_b.float().reshape(delta.w1_b.shape[0], -1)
        u2, d2 = delta.w2_a.float(), delta.w2_b.float().reshape(delta.w2_b.shape[0], -1)
        out, n = u1.shape[0], d1.shape[1]
        r = u1.shape[1] * u2.shape[1]
        if r < min(out, n):
            up = (u1[:, :, None] * u2[:, None, :]).reshape(out, r) * delta.scale
            down = (d1[:, None, :] * d2[None, :, :]).reshape(r, n)
            return _Term(up=up, down=down), (out, n)
    if isinstance(delta, LoKrDelta) and delta.t2 is None:
        # kron(P1 Q1, P2 Q2) = kron(P1, P2) · kron(Q1, Q2) (mixed product): exact at rank k1·k2.
        p1, q1 = _split_factor(delta.w1, delta.w1_a, delta.w1_b)
        p2, q2 = _split_factor(delta.w2, delta.w2_a, delta.w2_b)
        out, n = p1.shape[0] * p2.shape[0], q1.shape[1] * q2.shape[1]
        r = p1.shape[1] * p2.shape[1]
        if r < min(out, n):
            shape = (out, n) if delta.w2 is None or delta.w2.dim() == 2 else (out, q1.shape[1] * delta.w2.shape[1], *delta.w2.shape[2:])
            return _Term(up=torch.kron(p1, p2) * delta.scale, down=torch.kron(q1, q2)), shape
    dense = _dense_delta(delta, key, adapter_name, base_weights)
    return _Term(dense=dense), tuple(dense.shape)


def _split_factor(full, a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoKr factor as ``P @ Q`` (2-D fp32; convs flattened to (out, in·kh·kw)): its own low-rank pair, or
    the full matrix against an identity on its smaller side."""
    if full is None:
        return a.float(), b.float().reshape(b.shape[0], -1)
    f = full.float().reshape(full.shape[0], -1)
    m, n = f.shape
    return (torch.eye(m, device=f.device), f) if m <= n else (f, torch.eye(n, device=f.device))


def _merge_exact_or_svd(key, present, coeffs, names, family, method, dev, base_weights, rank, energy, clamp, default_rank):
    terms, shapes = [], []
    for (i, delta), c in zip(present, coeffs):
        term, shape = _exact_term(delta, key, names[i], base_weights)
        terms.append((term, c))
        shapes.append((names[i], shape))
    shape = _layer_shape(key, shapes, family, _maybe_flattened(present))
    out, n = _flat2d(shape)

    if method == "cat":
        ups, downs = [], []
        for term, c in terms:
            if term.dense is not None:
                # Exact factors of a dense ΔW: (ΔW, I) on its smaller side; x·1 + 0·y is exact in fp32.
                mat = term.dense.reshape(out, n).to(dev)
                if n <= out:
                    ups.append(c * mat)
                    downs.append(torch.eye(n, device=dev))
                else:
                    ups.append(c * torch.eye(out, device=dev))
                    downs.append(mat)
            else:
                ups.append(c * term.up.to(dev))
                downs.append(term.down.to(dev))
        return torch.cat(ups, dim=1), torch.cat(downs, dim=0), shape, 0.0, "factors", ""

    k_max = _default_rank(rank, present, default_rank, key, energy)
    total_rank = sum(t.up.shape[1] for t, _ in terms if t.dense is None)
    any_dense = any(t.dense is not None for t, _ in terms)
    if any_dense or total_rank >= min(out, n):
        m = torch.zeros(out, n, device=dev)
        for term, c in terms:
            if term.dense is not None:
                m += c * term.dense.reshape(out, n).to(dev)
            else:
                m += c * (term.up.to(dev) @ term.down.to(dev))
        up, down, err, note = _truncate_dense(m, k_max, energy, clamp, reference=m)
        return up, down, shape, err, "dense", note

    u_cat = torch.cat([c * t.up.to(dev) for t, c in terms], dim=1)
    d_cat = torch.cat([t.down.to(dev) for t, _ in terms], dim=0)
    left, s, right = _svd_from_factors(u_cat, d_cat)
    k = _choose_rank(s, k_max, energy)
    up, down = left[:, :k] * s[:k], right[:k]
    note = ""
    s64 = s.double()
    total = float((s64 * s64).sum())
    if clamp is not None:
        up, down = _clamp_pair(up, down, clamp)
        err = _rel_error_against_svd(left, s, right, up, down)
        note = f"clamp {clamp}"
    else:
        # The core's SVD is the exact SVD of M, so the error of the truncation is its singular tail.
        err = math.sqrt(float((s64[k:] ** 2).sum()) / total) if total > 0 else 0.0
    return up, down, shape, err, "factors", note


def _maybe_flattened(present) -> bool:
    return any(isinstance(d, (LoHaDelta, LoKrDelta)) for _, d in present)


def _default_rank(rank, present, default_rank, key, energy=None) -> int | None:
    """The rank cap: ``rank=``; else none when ``energy=`` decides alone; else the largest input rank here."""
    if rank is not None:
        return rank
    if energy is not None:
        return None
    ranks = [d.rank for _, d in present if isinstance(d.rank, int)]
    if ranks:
        return max(ranks)
    if default_rank is not None:
        return default_rank
    raise ValueError(f"layer {key!r}: no input has a rank to default to (full diffs only): pass rank=, e.g. rank=64")


def _svd_from_factors(u: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``u @ d`` (out×R times R×in) without forming it: ``u = Q1 R1``, ``dᵀ = Q2 R2``, SVD of ``R1 R2ᵀ``.

    Returns ``left (out×p)``, ``σ (p)``, ``right (p×in)`` with orthonormal columns / rows, p = min(R, out, in).
    """
    q1, r1 = torch.linalg.qr(u)
    q2, r2 = torch.linalg.qr(d.T)
    # The core is tiny (R×R): solving it in float64 keeps small singular values (and so `energy`) accurate.
    uc, s, vch = torch.linalg.svd((r1.double() @ r2.double().T), full_matrices=False)
    left = q1 @ uc.to(q1.dtype)
    right = vch.to(q2.dtype) @ q2.T
    left, right = _fix_signs(left, right)
    return left, s.to(u.dtype), right


def _fix_signs(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Singular pairs are defined up to a joint sign; pick the one whose up column has a positive
    # largest-magnitude entry, so factors (and clamp) do not depend on the SVD backend.
    idx = left.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(torch.gather(left, 0, idx)).squeeze(0)
    signs[signs == 0] = 1
    return left * signs, right * signs[:, None]


def _choose_rank(s: torch.Tensor, k_max: int | None, energy: float | None) -> int:
    p = int(s.numel())
    k = p if k_max is None else min(k_max, p)
    if energy is not None:
        sq = s.double() ** 2
        total = float(sq.sum())
        if total > 0:
            cum = torch.cumsum(sq, 0) / total
            # Tolerance of a few ulps so energy=1.0 is reached despite rounding in the cumulative sum.
            k_energy = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)).item()) + 1
            k = min(k, k_energy)
        else:
            k = 1
    return max(1, min(k, p))


def _truncate_dense(m: torch.Tensor, k_max: int | None, energy, clamp, reference: torch.Tensor):
    left, s, right = torch.linalg.svd(m, full_matrices=False)
    left, right = _fix_signs(left, right)
    k = _choose_rank(s, k_max, energy)
    up, down = left[:, :k] * s[:k], right[:k]
    note = ""
    if clamp is not None:
        up, down = _clamp_pair(up, down, clamp)
        note = f"clamp {clamp}"
    ref_norm = float(reference.double().norm())
    if reference is m and clamp is None:
        s64 = s.double()
        err = math.sqrt(float((s64[k:] ** 2).sum())) / ref_norm if ref_norm > 0 else 0.0
    else:
        err = float((reference - up @ down).double().norm()) / ref_norm if ref_norm > 0 else 0.0
    return up, down, err, note


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    if x.numel() <= _TORCH_QUANTILE_LIMIT:
        return torch.quantile(x, q)
    # torch.quantile's default "linear" interpolation, for inputs it refuses.
    s = x.sort().values
    pos = q * (s.numel() - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, s.numel() - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _clamp_pair(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's svd_merge clamp: ``hi`` = the q-quantile of the signed values of both factors; clamp to [-hi, hi]."""
    hi = _quantile(torch.cat([up.flatten(), down.flatten()]), q)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def _lowrank_sq_norm(u: torch.Tensor, d: torch.Tensor) -> float:
    # ‖u d‖²_F = trace(uᵀu · d dᵀ): two small Gram matrices, in float64 against cancellation.
    u64, d64 = u.double(), d.double()
    return float(((u64.T @ u64) * (d64 @ d64.T)).sum())


def _rel_error_against_svd(left, s, right, up, down) -> float:
    """‖M − up down‖ / ‖M‖ for ``M = left·diag(s)·right`` (orthonormal left / right), without forming M.

    ‖M − AB‖² = ‖M‖² − 2·Σ_j s_j [(leftᵀA)(B rightᵀ)]_jj + ‖AB‖², each term from p×k or k×k products, in float64.
    """
    s64 = s.double()
    ref = float((s64 * s64).sum())
    if ref <= 0:
        return 0.0
    la = left.double().T @ up.double()  # p×k
    br = down.double() @ right.double().T  # k×p
    cross = float((s64 * (la * br.T).sum(dim=1)).sum())
    diff = ref - 2.0 * cross + _lowrank_sq_norm(up, down)
    return math.sqrt(max(diff, 0.0) / ref)


def _rel_error_lowrank(u_ref: torch.Tensor, d_ref: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """‖u_ref d_ref − up down‖ / ‖u_ref d_ref‖ from the factors alone."""
    ref = _lowrank_sq_norm(u_ref, d_ref)
    if ref <= 0:
        return 0.0
    diff = _lowrank_sq_norm(torch.cat([u_ref, -up], dim=1), torch.cat([d_ref, down], dim=0))
    return math.sqrt(max(diff, 0.0) / ref)


# --------------------------------------------------------------------------------------------
# PEFT's task-arithmetic family (utils/merge_utils.py), with an explicit generator for DARE
# --------------------------------------------------------------------------------------------


def _prune(t: torch.Tensor, density: float, how: str, gen: torch.Generator | None) -> torch.Tensor:
    if density >= 1:
        return t  # PEFT skips pruning (and draws no random numbers) at density 1
    if how == "magnitude":
        mask = torch.zeros_like(t).reshape(-1)
        k = int(density * t.numel())
        top = torch.topk(t.abs().reshape(-1), k=k, largest=True)
        mask[top[1]] = 1
        return t * mask.reshape(t.shape)
    mask = torch.bernoulli(torch.full_like(t, density), generator=gen)
    return t * mask / density


def _task_combine(
    tensors: list[torch.Tensor], weights: list[float], base: str, density, majority_sign: str, gen
) -> torch.Tensor:
    """PEFT's ``task_arithmetic`` / ``magnitude_prune`` / ``ties`` / ``dare_linear`` / ``dare_ties``."""
    if base in ("ties", "magnitude_prune"):
        tensors = [_prune(t, density, "magnitude", None) for t in tensors]
    elif base in ("dare_linear", "dare_ties"):
        tensors = [_prune(t, density, "random", gen) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
    w = w.view(w.shape + (1,) * (stacked.dim() - 1))
    if base in ("ties", "dare_ties"):
        signs = stacked.sign()
        magnitude = stacked.sum(dim=0) if majority_sign == "total" else signs.sum(dim=0)
        majority = torch.where(magnitude >= 0, 1, -1)
        mask = signs == majority
        return (stacked * w * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)
    return (stacked * w).sum(dim=0)


def _raw_factors(delta: LowRankDelta) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D fp32 ``(up, down)`` without the scale (PEFT's lora_B / lora_A); Tucker contracted into down."""
    up, down = delta.factors()
    return delta.up.reshape(delta.up.shape[0], -1).float(), down


def _merge_factorwise(key, present, coeffs, names, family, method, density, majority_sign, seed, dev):
    for i, delta in present:
        if not isinstance(delta, LowRankDelta):
            raise ValueError(
                f"method={method!r} combines LoRA factors, but {names[i]!r} layer {key!r} is {delta.kind}: "
                f"use method='svd' or {method + '_svd'!r}, which work on the exact ΔW"
            )
    ranks = {names[i]: d.rank for i, d in present}
    if len(set(ranks.values())) > 1:
        listed = ", ".join(f"{n}: rank {r}" for n, r in ranks.items())
        raise ValueError(
            f"method={method!r} needs equal ranks (it sums factors), but layer {key!r} has {listed}: "
            f"use method='svd' or 'cat', or {method + '_svd'!r}"
        )
    shape = _layer_shape(key, [(names[i], tuple(d.natural_shape())) for i, d in present], family)
    ups, downs, w_up, w_down = [], [], [], []
    for (i, delta), c in zip(present, coeffs):
        up, down = _raw_factors(delta)
        ws = c * delta.scale
        # As PEFT: split |c·s| evenly between the factors and put the sign on down only.
        w_down.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
        w_up.append(math.sqrt(abs(ws)))
        ups.append(up.to(dev))
        downs.append(down.to(dev))
    gen = None
    if method.startswith("dare"):
        gen = torch.Generator(device=dev).manual_seed(_layer_seed(seed, key))
    # PEFT draws the down (lora_A) masks first, then the up (lora_B) masks; same order here.
    down_m = _task_combine(downs, w_down, method, density, majority_sign, gen)
    up_m = _task_combine(ups, w_up, method, density, majority_sign, gen)
    # Reference M from the exact factors, error from Gram matrices: no dense ΔW.
    u_ref = torch.cat([c * d.factors()[0].to(dev) for (_, d), c in zip(present, coeffs)], dim=1)
    d_ref = torch.cat([d.factors()[1].to(dev) for _, d in present], dim=0)
    err = _rel_error_lowrank(u_ref, d_ref, up_m, down_m)
    return up_m, down_m, shape, err, "factors"


def _merge_dense_task(key, present, coeffs, names, family, method, density, majority_sign, seed, dev, base_weights, rank, energy, clamp, default_rank):
    dense = [_dense_delta(delta, key, names[i], base_weights) for i, delta in present]
    shapes = [(names[i], tuple(d.shape)) for (i, _), d in zip(present, dense)]
    shape = _layer_shape(key, shapes, family, _maybe_flattened(present))
    out, n = _flat2d(shape)
    mats = [d.reshape(out, n).to(dev) for d in dense]
    gen = torch.Generator(device=dev).manual_seed(_layer_seed(seed, key)) if method.startswith("dare") else None
    base = method[: -len("_svd")]
    m = _task_combine(mats, list(coeffs), base, density, majority_sign, gen)
    reference = torch.zeros(out, n, device=dev)
    for mat, c in zip(mats, coeffs):
        reference += c * mat
    k_max = _default_rank(rank, present, default_rank, key, energy)
    up, down, err, note = _truncate_dense(m, k_max, energy, clamp, reference=reference)
    return up, down, shape, err, "dense", note


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _as_lowrank(up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...]) -> LowRankDelta:
    """A LoRA layer with alpha = rank (scale 1): conv layers get (r, in, kh, kw) / (out, r, 1, 1) factors."""
    k = int(down.shape[0])
    up, down = up.float().contiguous(), down.float().contiguous()
    if len(shape) == 4:
        down = down.reshape(k, *shape[1:])
        up = up.reshape(shape[0], k, 1, 1)
    return LowRankDelta(down=down, up=up, alpha=float(k))


# Metadata worth carrying from the first input: they describe the base model, not the training run.
_CARRIED_METADATA = ("modelspec.architecture", "modelspec.implementation", "ss_base_model_version", "ss_v2", "ss_sd_model_name")


def _provenance(adapters, weights, method, report, rank, energy, clamp, density, majority_sign, seed, block_weights) -> dict[str, str]:
    meta = {k: adapters[0].metadata[k] for k in _CARRIED_METADATA if k in adapters[0].metadata}
    ranks = sorted({layer.rank for layer in report.layers})
    meta.update(
        {
            "modelspec.merged_from": ", ".join(a.name for a in adapters),
            "lorablend.merge.method": method,
            "lorablend.merge.weights": json.dumps(list(weights)),
            "lorablend.merge.rank": str(ranks[0]) if len(ranks) == 1 else "dynamic",
            "lorablend.merge.max_rel_error": f"{report.max_rel_error:.3e}",
        }
    )
    options = {
        "rank": rank,
        "energy": energy,
        "clamp": clamp,
        "density": density,
        "majority_sign": majority_sign if method in _NEEDS_SIGN else None,
        "seed": seed if method.startswith("dare") else None,
        "block_weights": block_weights,
    }
    options = {k: v for k, v in options.items() if v is not None}
    if options:
        meta["lorablend.merge.options"] = json.dumps(options, sort_keys=True)
    return meta
