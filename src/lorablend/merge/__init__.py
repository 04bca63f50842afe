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
  ranks at each layer and LoRA/LoCon inputs. Kept for parity with PEFT and the diffusers guide. A layer whose
  every input is a whole-weight difference (a full ``diff``, lightx2v's ``head.head.diff``) has no factors: these
  methods (and ``della``, ``breadcrumbs``) give it the exact weighted sum, a full diff, said so in the report.
* ``della``, ``breadcrumbs`` — mergekit's DELLA (MagPrune: per row, keep-probability from ``density - 0.15``
  for the smallest magnitude to ``density + 0.15`` for the largest, L1 rescale; then TIES' sign election and
  disjoint mean) and Model Breadcrumbs (drop the 1 % largest and then the smallest entries down to
  ``density``; weighted sum), on the factors as the PEFT methods above.
* ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``, ``della_svd``,
  ``breadcrumbs_svd`` — the same pruning and sign election on the dense per-adapter ``ΔW_i``, then the
  truncated SVD (any kinds, any ranks).
* K-LoRA (per layer and step, the LoRA whose top-K ``|ΔW|`` dominates) is step-dependent and needs both
  whole adapters: :mod:`lorablend.merge.klora` (``klora_plan``, ``klora_merge``).

``density`` is the kept fraction (PEFT's meaning). DARE and DELLA masks come from a ``torch.Generator``
seeded per layer from ``seed`` and the target key (``layer_seed``), so results do not depend on
layer order and are the same on every run for a given ``seed`` (default 0).

Layers present in only some adapters are merged with the missing ones as zero. DoRA layers depend
on the base weight: they merge only when ``base_weights`` gives it (then through their dense ΔW).
What no LoRA holds is summed exactly whatever the method (:mod:`.sums`): a layer whose delta has no LoRA form
(a Wan modulation table's ``diff_m``, a norm's scale vector ``.diff``) stays that kind, ``Σ c_i ΔT_i``; bias
differences (``diff_b``, a LoRA's ``lora_B.bias``) are summed as ``Σ c_i Δb_i`` and carried as the merged LoRA's
``diff_b``.

The package: :mod:`.options` (the frozen :class:`MergeSettings`, checked once), :mod:`.methods` (one function per
method and the ``{method: function}`` table), :mod:`.task` (PEFT's prune / elect sign / disjoint mean steps),
:mod:`.linalg` (SVD from factors, truncation, exact errors), :mod:`.report` (:class:`MergeReport`).
"""

from __future__ import annotations

import json
import logging
import sys
import types
from typing import Any, Sequence

import torch

from ..adapter import Adapter
from ..errors import LoraCompatibilityError
from ..kinds import Delta, LowRankDelta
from ..report import KeyRecord, LoadReport
from .fused import fused_groups, merge_fused_svd
from .methods import METHOD_TABLE, Layer, LayerResult, LayerTerm, layer_seed
from .options import FACTORWISE, METHODS, BaseWeights, BlockWeights, MergeSettings, block_tables, check_weights
from .report import LayerMerge, MergeReport
from .sums import exact_bias, summed_layer

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "LayerMerge", "MergeSettings", "MergeReport", "layer_seed", "merge", "merge_with_report"]


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
    in float32 with ``alpha == rank`` (scale 1) — layers no LoRA can hold (modulation tables, norms' vectors,
    bias differences alone) as the exact weighted sum in their own kind —, provenance in ``metadata`` (``modelspec.merged_from``,
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
    options = dict(rank=rank, energy=energy, clamp=clamp, density=density, majority_sign=majority_sign, seed=seed,
                   block_weights=block_weights, base_weights=base_weights, name=name, device=device, progress=progress)
    return merge_with_report(adapters, weights, method, **options)[0]


def merge_with_report(
    adapters: Sequence[Adapter], weights: Sequence[float] | None, method: str = "svd", *,
    name: str | None = None, progress: bool = False, device: str | torch.device | None = None, **options: Any
) -> tuple[Adapter, MergeReport]:
    """:func:`merge`, also returning the :class:`MergeReport` (per layer: rank, relative error, sources).

    >>> a = Adapter("a", "sd1", {"unet.x": LowRankDelta(down=torch.randn(4, 8), up=torch.randn(6, 4))})
    >>> merged, report = merge_with_report([a, a], [1.0, -1.0], method="cat")
    >>> report.layers[0].rank, report.layers[0].rel_error
    (8, 0.0)
    """
    adapters = _checked_adapters(adapters)
    opts = MergeSettings(method=method, device=torch.device(device) if device is not None else None, **options)
    weights = check_weights(weights, len(adapters))
    _require_one_family(adapters)
    tables = block_tables(opts.block_weights, adapters, lambda family: _standard_index(family).block_labels())
    names = [a.name for a in adapters]
    report = MergeReport(method=method, adapters=names, weights=list(weights))
    load_report = LoadReport(source=f"merge of {', '.join(names)}", format="merge")
    keys = list(dict.fromkeys(key for a in adapters for key in a.deltas))
    if not keys:
        raise ValueError("nothing to merge: the adapters have no layers; pass adapters read from LoRA files")
    ranks = [d.rank for a in adapters for d in a.deltas.values() if isinstance(d.rank, int)]
    fallback_rank = max(ranks) if ranks else None
    if progress:
        from tqdm.auto import tqdm

        keys = tqdm(keys, desc=f"merge ({method})", unit="layer")
    deltas: dict[str, Delta] = {}
    layers: dict[str, tuple[Layer, torch.device, torch.Tensor | None]] = {}
    for key in keys:
        terms = tuple(
            LayerTerm(a.name, a.deltas[key], weights[i] * _block_multiplier(tables, i, key, a.family))
            for i, a in enumerate(adapters) if key in a.deltas
        )
        summed = summed_layer(key, terms, factorwise=method in FACTORWISE)
        if summed is not None:  # a table, a norm's vector, biases alone: the exact sum in its own kind (merge/sums.py)
            deltas[key], note = summed
            report.layers.append(LayerMerge(key, 0, 0.0, tuple(t.name for t in terms), "exact", note))
            load_report.add(key, "mapped", target=key, reason=note)
            continue
        bias = exact_bias(key, terms)  # carried exactly beside the merged LoRA (its diff_b)
        changing = tuple(t for t in terms if t.delta.changes_weight)
        out_device = next(iter(changing[0].delta.tensors())).device
        layer = Layer(key, changing, opts.device or out_device, _model_shape(adapters[0].family, key), fallback_rank)
        result = METHOD_TABLE[method](layer, opts)
        layers[key] = (layer, out_device, bias)
        k = int(result.down.shape[0])
        deltas[key] = _as_lowrank(result, out_device, bias)
        report.layers.append(LayerMerge(key, k, result.rel_error, tuple(t.name for t in terms), result.path, result.note))
        note = f", {result.note}" if result.note else ""
        load_report.add(key, "mapped", target=key, reason=f"rank {k}, rel_err {result.rel_error:.1e}{note}")
    if method == "svd":
        _one_rank_per_fused_layer(layers, deltas, report, load_report, opts, adapters[0].family)
    metadata = _provenance(adapters, weights, opts, report)
    merged = Adapter(name or "+".join(names), adapters[0].family, deltas, metadata=metadata, report=load_report)
    return merged, report


def _one_rank_per_fused_layer(layers: dict[str, tuple[Layer, torch.device, torch.Tensor | None]], deltas: dict[str, Delta],
                              report: MergeReport, load_report: LoadReport, opts: MergeSettings, family: str) -> None:
    """``svd``: the modules of one fused original layer (Flux qkv / linear1 …) merged again as one, so that a file
    in original names gets ``rank`` over the fused rows, not one rank per module stacked (merge/fused.py)."""
    try:
        index = _standard_index(family)
    except Exception:  # noqa: BLE001 - a family without shipped data has no fused layers to know of
        return
    for group in fused_groups(layers, index):
        results = merge_fused_svd([layers[key][0] for key in group], opts)
        for key, result in (results or {}).items():
            k = int(result.down.shape[0])
            deltas[key] = _as_lowrank(result, layers[key][1], layers[key][2])
            at = next(i for i, m in enumerate(report.layers) if m.key == key)
            report.layers[at] = LayerMerge(key, k, result.rel_error, report.layers[at].sources, result.path, result.note)
            at = next(i for i, r in enumerate(load_report.records) if r.key == key)
            load_report.records[at] = KeyRecord(key, "mapped", key, f"rank {k}, rel_err {result.rel_error:.1e}, "
                                                                     f"{result.note}")


def _checked_adapters(adapters: Sequence[Adapter]) -> list[Adapter]:
    adapters = list(adapters)
    if not adapters:
        raise ValueError("adapters is empty: pass at least one Adapter (e.g. from lorablend.load_adapter)")
    for i, a in enumerate(adapters):
        if not isinstance(a, Adapter):
            raise TypeError(f"adapters[{i}] is a {type(a).__name__}, not an Adapter: read files with lorablend.load_adapter first")
    return adapters


def _require_one_family(adapters: list[Adapter]) -> None:
    families: dict[str, Adapter] = {}
    for a in adapters:
        families.setdefault(a.family, a)
    if len(families) > 1:
        (fa, a), (fb, b) = list(families.items())[:2]
        raise LoraCompatibilityError(
            f"cannot merge {a.name!r} ({fa}) with {b.name!r} ({fb}): they were made for different model families; "
            f"merge adapters of one family only"
        )



# The model vocabulary: the single place that talks to lorablend.naming.
def _standard_index(family: str):
    from ..naming import standard_index

    return standard_index(family)


def _block_multiplier(tables: list[dict[str, float] | None] | None, i: int, key: str, family: str) -> float:
    if tables is None or tables[i] is None:
        return 1.0
    # Keys outside the standard architecture (label "OTHER") keep weight 1.
    return float(tables[i].get(_standard_index(family).block(key), 1.0))


def _model_shape(family: str, key: str) -> tuple[int, ...] | None:
    """The standard model's weight shape for a key, used only when the inputs leave a conv's shape ambiguous."""
    try:
        info = _standard_index(family).modules.get(key)
    except Exception:  # noqa: BLE001 - an index we cannot build only means "unknown"
        return None
    return tuple(info.weight_shape) if info is not None else None


def _as_lowrank(result: LayerResult, device: torch.device, bias: torch.Tensor | None = None) -> LowRankDelta:
    """A LoRA layer with alpha = rank (scale 1): conv layers get (r, in, kh, kw) / (out, r, 1, 1) factors; ``bias``
    (the exact weighted sum of the inputs' bias differences) as its ``diff_b``."""
    k = int(result.down.shape[0])
    up, down = result.up.to(device).float().contiguous(), result.down.to(device).float().contiguous()
    if len(result.shape) == 4:
        down = down.reshape(k, *result.shape[1:])
        up = up.reshape(result.shape[0], k, 1, 1)
    return LowRankDelta(down=down, up=up, alpha=float(k), diff_b=None if bias is None else bias.to(device))


# Metadata worth carrying from the first input: they describe the base model, not the training run.
_CARRIED_METADATA = ("modelspec.architecture", "modelspec.implementation", "ss_base_model_version", "ss_v2", "ss_sd_model_name")


def _provenance(adapters: list[Adapter], weights: list[float], options: MergeSettings, report: MergeReport) -> dict[str, str]:
    meta = {k: adapters[0].metadata[k] for k in _CARRIED_METADATA if k in adapters[0].metadata}
    ranks = sorted({layer.rank for layer in report.layers if layer.path != "exact"})
    meta.update(
        {
            "modelspec.merged_from": ", ".join(a.name for a in adapters),
            "lorablend.merge.method": options.method,
            "lorablend.merge.weights": json.dumps(list(weights)),
            "lorablend.merge.rank": str(ranks[0]) if len(ranks) == 1 else "dynamic" if ranks else "none",
            "lorablend.merge.max_rel_error": f"{report.max_rel_error:.3e}",
        }
    )
    recorded = options.recorded()
    if recorded:
        meta["lorablend.merge.options"] = json.dumps(recorded, sort_keys=True)
    return meta


# Old names (settings classes all end in ...Settings since 0.2), importable until 0.3 with a warning.
from ..errors import renamed_names  # noqa: E402  (only for the old names below)

__getattr__ = renamed_names(__name__, {'MergeOptions': 'MergeSettings'}, globals())


class _MergePackage(types.ModuleType):
    """``lorablend.merge`` is this package AND callable as :func:`merge`: ``import lorablend.merge`` gives the
    package (``lorablend.merge.MergeReport``, ``from lorablend.merge import merge``), and
    ``lorablend.merge(adapters, weights)`` merges — neither shadows the other."""

    def __call__(self, adapters: Sequence[Adapter], weights: Sequence[float] | None, *args: Any,
                 **kwargs: Any) -> Adapter:
        """``merge(adapters, weights, ...)``.

        >>> lorablend.merge([a, b], [0.7, 0.3], method="cat")                # doctest: +SKIP
        """
        return merge(adapters, weights, *args, **kwargs)


sys.modules[__name__].__class__ = _MergePackage
