"""Each image of one call with its own LoRA mix (Punica / S-LoRA's idea for diffusion): the per-sample weights a
layer's forward hook reads, and, where it is cheaper, each image's product through its OWN ranks only.

A layer's low-rank term concatenates every contributing adapter's factors (rank ``R``, the union of the batch's
mixes). With per-sample weights each image weighs the union's rank blocks, zero for adapters outside its mix: exact,
but every image pays the union's rank. When the largest rank any one image needs (``r``) is well below ``R``, the
layer instead gathers each image's own factors once (padded with zeros to ``r``) and runs two batched GEMMs of rank
``r`` (:meth:`SampleWeights.add_own_rank`). The choice is made per layer by a cost model on its shapes, once per set
of mixes (not per step: a schedule rewrites the weights, which are applied in rank space, so the gathered factors
stay valid; an adapter that turns from 0 to non-zero on an image widens that image's set once).

>>> sw = SampleWeights({"a": 0, "b": 1}, torch.tensor([[1.0, 0.0], [0.0, 0.5]]))
>>> sw.support()
((0,), (1,))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# A rank-r product as a batch of per-image GEMMs (bmm) costs about this many times a GEMM of the same rank over the
# whole batch (measured on CPU, 64–1280 channels, 16–1024 tokens, ranks 16–52: 1.0–1.2×): the own-rank path is taken
# only where its rank times this factor is below the union's rank.
OWN_RANK_OVERHEAD = 1.15
# ... and only where it saves at least this many multiply-adds per token: a narrower layer (the tiny test models' 32–64
# channels) is bound by the number of small ops, not by its rank, and measured slower end to end on its own ranks
MIN_SAVED_PER_TOKEN = 16384


@dataclass(eq=False)
class OwnFactors:
    """One layer's factors gathered per image for one set of mixes: ``down`` (B, r, in) or None (a k×k conv keeps
    the union's down conv and gathers its output instead), ``up_t`` (B, r, out), ``index`` (B, r) each slot's
    position in the union's rank, ``columns`` (B, r) each slot's column of the padded weight matrix (a pad slot:
    position 0, the zero column)."""

    down: torch.Tensor | None
    up_t: torch.Tensor
    index: torch.Tensor
    columns: torch.Tensor
    weights: dict = field(default_factory=dict)  # k -> (svec, generation, (k·B, r) weights) of the last call
    _tiles: dict = field(default_factory=dict)  # k -> (down, up, index) repeated k times (CFG's doubled batch)

    def tiled(self, k: int) -> tuple:
        """``(down, up_t, index)`` for a forward that sees the batch ``k`` times, made once."""
        hit = self._tiles.get(k)
        if hit is None:
            def tile(t: torch.Tensor | None) -> torch.Tensor | None:
                return t if t is None or k == 1 else t.repeat(k, *([1] * (t.dim() - 1)))

            hit = self._tiles[k] = (tile(self.down), tile(self.up_t), tile(self.index))
        return hit


@dataclass(eq=False)
class SampleWeights:
    """Each sample's own adapter weights for one call (a batch of different mixes, Punica / S-LoRA style):
    ``matrix[b, columns[name]]`` multiplies adapter ``name``'s set weight for sample ``b``. A layer's hook takes
    its (rows, R) weight vector from here: each contributor's column repeated over its rank, times ``svec``, and
    tiled when the layer sees the batch twice (classifier-free guidance runs [uncond; cond]). Contributors not
    in ``columns`` get 0 for every sample. ``matrix`` may be rewritten between steps (a schedule) if
    ``generation`` is bumped. ``own_rank=False`` keeps every layer on the union's rank (for comparisons);
    ``min_saved`` is the cost model's threshold (0: own ranks wherever they are fewer multiply-adds).

    >>> sw = SampleWeights({"a": 0}, torch.tensor([[1.0], [0.5]])); sw.matrix.shape
    torch.Size([2, 1])
    """

    columns: dict[str, int]
    matrix: torch.Tensor  # (batch, adapters) float32
    generation: int = 0
    own_rank: bool = True
    min_saved: int = MIN_SAVED_PER_TOKEN  # the cost model's threshold (multiply-adds per token)
    _cache: dict = field(default_factory=dict)

    def vector(self, layer: Any, rows: int) -> torch.Tensor:
        """The (rows, R) weight vector of ``layer`` (a ``layer_state.LayerState``) for this call."""
        hit = self._cache.get(id(layer))
        if hit is not None and hit[0] is layer.svec and hit[1] == self.generation and hit[2].shape[0] == rows:
            return hit[2]
        batch = self._check_rows(layer, rows)
        padded = self._padded(layer.svec.device)
        order = tuple(self.columns.items())
        # few small ops per layer and call: on a busy machine each one can wait for a core (the index of each rank's
        # column is kept on the layer across calls; the padded matrix is made once per step for every layer)
        if layer.sample_index is None or layer.sample_index[0] is not layer.svec or layer.sample_index[1] != order:
            cols = [self.columns.get(name, len(self.columns)) for name, _ in layer.contributors]
            index = torch.tensor([c for c, r in zip(cols, layer.ranks) for _ in range(r)], device=layer.svec.device)
            layer.sample_index = (layer.svec, order, index)
        vec = (padded.index_select(1, layer.sample_index[2]) * layer.svec).to(layer.svec.dtype)
        vec = vec.repeat(rows // batch, 1) if rows != batch else vec
        self._cache[id(layer)] = (layer.svec, self.generation, vec)
        return vec

    def support(self) -> tuple[tuple[int, ...], ...]:
        """Each sample's columns that have been non-zero in this call so far (they only grow: an adapter weighted 0
        for a step stays in, so that a schedule does not regather factors every step)."""
        hit = self._cache.get("support")
        if hit is not None and hit[0] == self.generation:
            return hit[1]
        seen = hit[1] if hit is not None else ((),) * self.matrix.shape[0]
        now = [set(torch.nonzero(row).flatten().tolist()) | set(old) for row, old in zip(self.matrix, seen)]
        support = tuple(tuple(sorted(s)) for s in now)
        self._cache["support"] = (self.generation, support)
        return support

    def add_own_rank(self, layer: Any, x: torch.Tensor, out: torch.Tensor, scale: float) -> torch.Tensor | None:
        """``out`` plus each image's term through its own ranks only, or None where the union's rank is as cheap
        (the caller then runs the union's product). Inference only (``out`` is written in place)."""
        if not self.own_rank or not out.is_contiguous():
            return None
        own = self._own_factors(layer)
        if own is None:
            return None
        if own.up_t.shape[1] == 0:  # no image of the batch has an adapter on this layer
            return out
        batch = self._check_rows(layer, out.shape[0])
        k = out.shape[0] // batch  # the batch seen k times (classifier-free guidance: 2)
        down, up_t, index = own.tiled(k)
        weights = self._own_weights(layer, own, k)
        n = out.shape[0]
        if layer.is_conv:
            hw = out.shape[2] * out.shape[3]
            if down is None:  # k×k conv: the union's down conv, then each image's own rows of it (a pad row reads
                h = torch.nn.functional.conv2d(x, layer.down, None, layer.module.stride,  # row 0, weighted 0)
                                               layer.module.padding, layer.module.dilation).reshape(n, -1, hw)
                h = h.gather(1, index[..., None].expand(-1, -1, hw))
            else:
                h = torch.bmm(down, x.reshape(n, x.shape[1], hw))
            h.mul_(weights[..., None])
            out.view(n, -1, hw).baddbmm_(up_t.transpose(1, 2), h, alpha=scale)
            return out
        h = torch.bmm(x.reshape(n, -1, x.shape[-1]), down.transpose(1, 2))
        h.mul_(weights[:, None, :])
        out.view(n, -1, out.shape[-1]).baddbmm_(h, up_t, alpha=scale)
        return out

    # ------------------------------------------------------------------------------- helpers
    def _check_rows(self, layer: Any, rows: int) -> int:
        batch = self.matrix.shape[0]
        if rows % batch:
            raise ValueError(f"{layer.key}: a forward of {rows} rows does not tile the {batch} samples given "
                             "per-sample weights; pass one weight row per image of the call")
        return batch

    def _padded(self, device: torch.device) -> torch.Tensor:
        """``matrix`` with one more column of zeros (the column of adapters outside the mix), once per step."""
        padded = self._cache.get("padded")
        if padded is None or padded[0] != self.generation:
            batch = self.matrix.shape[0]
            padded = (self.generation, torch.cat([self.matrix, self.matrix.new_zeros(batch, 1)], dim=1).to(
                device=device, dtype=torch.float32))
            self._cache["padded"] = padded
        return padded[1]

    def _own_factors(self, layer: Any) -> OwnFactors | None:
        """The layer's per-image factors for this call's mixes, or None where the cost model keeps the union's
        rank; decided and gathered once per (layer, factors, support)."""
        support = self.support()
        hit = self._cache.get(("own", id(layer)))  # (``columns`` is fixed for the call)
        if hit is not None and hit[1] is layer.up and hit[0] == support:
            return hit[2]
        own = self._gather(layer, support)
        self._cache[("own", id(layer))] = (support, layer.up, own)
        return own

    def _gather(self, layer: Any, support: tuple) -> OwnFactors | None:
        union = int(layer.up.shape[1])
        slots = self._slots(layer, support)
        if slots is None:  # no image adapts this layer: an empty term
            return OwnFactors(None, layer.up.new_zeros(len(support), 0, layer.up.shape[0]), *self._slots_empty(
                support, layer.up.device))
        index, columns = slots
        rank = int(index.shape[1])
        out_f, in_f = int(layer.up.shape[0]), int(layer.down[0].numel())
        kxk = layer.is_conv and layer.down.dim() > 2
        cost_union = union * (in_f + out_f)
        cost_own = (union * in_f if kxk else rank * in_f * OWN_RANK_OVERHEAD) + rank * out_f * OWN_RANK_OVERHEAD
        if cost_union - cost_own < max(1, self.min_saved):
            return None
        flat = index.flatten()  # one copy per factor; (B, r, out): the layout both batched GEMMs read
        up_t = layer.up.t().index_select(0, flat).view(len(support), rank, out_f)
        down = None if kxk else layer.down.reshape(union, in_f).index_select(0, flat).view(len(support), rank, in_f)
        return OwnFactors(down, up_t, index, columns)

    def _slots(self, layer: Any, support: tuple) -> tuple | None:
        """``(index, columns)`` (B, r): each image's rank positions in the layer's union (its adapters' blocks, in
        contributor order) and their weight columns, padded to the largest own rank with position 0 and the
        zero column (weight 0); None when no image has an adapter here. Shared by layers with the same
        contributors and ranks (made once per call, not per layer)."""
        none = len(self.columns)
        cols = tuple(self.columns.get(name, none) for name, _ in layer.contributors)
        key = ("slots", cols, layer.ranks, support)
        hit = self._cache.get(key)
        if hit is not None:
            return hit[0]
        starts = [sum(layer.ranks[:i]) for i in range(len(layer.ranks))]
        slots = [[(s + j, c) for c, s, r in zip(cols, starts, layer.ranks) if c in own for j in range(r)]
                 for own in support]
        rank = max(len(s) for s in slots)
        made = None
        if rank:
            slots = [s + [(0, none)] * (rank - len(s)) for s in slots]
            made = (torch.tensor([[p for p, _ in s] for s in slots], device=layer.up.device),
                    torch.tensor([[c for _, c in s] for s in slots], device=layer.up.device))
        self._cache[key] = (made,)
        return made

    @staticmethod
    def _slots_empty(support: tuple, device: torch.device) -> tuple:
        empty = torch.zeros(len(support), 0, dtype=torch.long, device=device)
        return empty, empty

    def _own_weights(self, layer: Any, own: OwnFactors, k: int) -> torch.Tensor:
        """(k·B, r): each image's weights on its own slots (``svec`` times its matrix entry; 0 on padding), tiled
        for a forward that sees the batch ``k`` times; once per step."""
        hit = own.weights.get(k)
        if hit is not None and hit[0] is layer.svec and hit[1] == self.generation:
            return hit[2]
        padded = self._padded(layer.svec.device)
        weights = (padded.gather(1, own.columns) * layer.svec.float()[own.index]).to(layer.svec.dtype)
        weights = weights.repeat(k, 1) if k > 1 else weights
        own.weights[k] = (layer.svec, self.generation, weights)
        return weights


__all__ = ["MIN_SAVED_PER_TOKEN", "OWN_RANK_OVERHEAD", "OwnFactors", "SampleWeights"]
