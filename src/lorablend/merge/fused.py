"""``svd`` merges over a fused original layer: one rank over all its rows.

A transformer layer that its original names write fused (Flux.1 ``img_attn.qkv`` and ``single_blocks.N.linear1``,
SD3 ``attn.qkv``, Flux.2 ``img_attn.qkv``, Z-Image ``attention.qkv``) is several diffusers modules. Merged one by
one at rank k, each module gets its own k-dim down, and a writer that puts them back into the fused layer has to
stack them: rank 3k or 4k in a kohya Flux file. Here the modules of one fused layer are merged together: each
one's exact weighted sum (``merge_cat``'s exact factors), stacked by rows, truncated once — the optimal rank-k
approximation of the fused layer's ΔW — and handed back as each module's rows of ``U·Σ`` with ONE shared down, which
the writer puts back as one LoRA of rank k (``io/write_original.py``: a shared down is written as is).

>>> from lorablend.naming import module_index
>>> fused_groups(["transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_k",
...               "transformer.proj_out"], module_index(family="flux"))
[['transformer.transformer_blocks.0.attn.to_q', 'transformer.transformer_blocks.0.attn.to_k']]
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from ..naming import ModuleIndex
from .linalg import choose_rank, svd_from_factors, truncate_dense
from .methods import Layer, LayerResult, merge_cat, rank_cap
from .options import MergeSettings


def fused_groups(keys: Iterable[str], index: ModuleIndex) -> list[list[str]]:
    """The keys that are rows of one original layer, grouped (groups of two or more, in the keys' order)."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        original = index.original_name(key)
        if original is not None and original[1] is not None:
            groups.setdefault(original[0], []).append(key)
    return [g for g in groups.values() if len(g) > 1]


def merge_fused_svd(layers: list[Layer], options: MergeSettings) -> dict[str, LayerResult] | None:
    """The layers of one fused layer merged as one (``rank`` / ``energy`` over their stacked rows), each with its
    rows and the shared down; None where that cannot be done (a conv, inputs of other widths, ``clamp``), and the
    caller keeps the per-module results."""
    exact = [merge_cat(layer, options) for layer in layers]
    if options.clamp is not None or any(len(r.shape) != 2 for r in exact) or len({r.down.shape[1] for r in exact}) > 1:
        return None
    rows = [int(r.up.shape[0]) for r in exact]
    up_big = torch.block_diag(*[r.up.float() for r in exact])
    down_big = torch.cat([r.down.float() for r in exact])
    k_max = rank_cap(layers[0], options)
    if down_big.shape[0] >= min(sum(rows), down_big.shape[1]):  # no smaller than dense: truncate the dense ΔW
        m = up_big @ down_big
        up, down, err, _ = truncate_dense(m, k_max, options.energy, None, reference=m)
        path = "dense"
    else:
        left, s, right = svd_from_factors(up_big, down_big)
        k = choose_rank(s, k_max, options.energy)
        up, down = left[:, :k] * s[:k], right[:k].contiguous()
        s64 = s.double()
        total = float((s64 * s64).sum())
        err = math.sqrt(float((s64[k:] ** 2).sum()) / total) if total > 0 else 0.0
        path = "factors"
    note = f"one rank over the fused layer of {len(layers)} modules (error: the fused layer's)"
    out, start = {}, 0
    for layer, r, n in zip(layers, exact, rows):
        out[layer.key] = LayerResult(up[start:start + n], down, r.shape, err, path, note)
        start += n
    return out


__all__ = ["fused_groups", "merge_fused_svd"]
