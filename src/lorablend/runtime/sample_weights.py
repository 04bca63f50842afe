"""Each image of one call with its own LoRA mix (Punica / S-LoRA's idea for diffusion): the per-sample weights a
layer's forward hook multiplies in rank space.

A layer's low-rank term concatenates every contributing adapter's factors (rank ``R``, the union of the batch's
mixes); each image weighs the union's rank blocks, zero for adapters outside its mix: exact, and every image pays
the union's rank. Per-image own-rank products (each image's factors gathered once per set of mixes, two batched
GEMMs at the largest own rank, picked per layer by a cost model) were built, measured and taken out: 0.68–0.90× the
union's product per layer at 320–1280 channels, but 0.98–1.10× end to end on SD1.5 (the gather per call and the
batched GEMMs ate the gain) and slower on the tiny models (benchmarks/RESULTS.md, "Batch cost, the fair
comparison; own ranks per image tried and reverted").

>>> sw = SampleWeights({"a": 0, "b": 1}, torch.tensor([[1.0, 0.0], [0.0, 0.5]]))
>>> sw.matrix[1, sw.columns["b"]].item()
0.5
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(eq=False)
class SampleWeights:
    """Each sample's own adapter weights for one call (a batch of different mixes, Punica / S-LoRA style):
    ``matrix[b, columns[name]]`` multiplies adapter ``name``'s set weight for sample ``b``. A layer's hook takes
    its (rows, R) weight vector from here: each contributor's column repeated over its rank, times ``svec``, and
    tiled when the layer sees the batch twice (classifier-free guidance runs [uncond; cond]). Contributors not
    in ``columns`` get 0 for every sample. ``matrix`` may be rewritten between steps (a schedule) if
    ``generation`` is bumped.

    >>> sw = SampleWeights({"a": 0}, torch.tensor([[1.0], [0.5]])); sw.matrix.shape
    torch.Size([2, 1])
    """

    columns: dict[str, int]
    matrix: torch.Tensor  # (batch, adapters) float32
    generation: int = 0
    _cache: dict = field(default_factory=dict)

    def vector(self, layer: Any, rows: int) -> torch.Tensor:
        """The (rows, R) weight vector of ``layer`` (a ``layer_state.LayerState``) for this call."""
        hit = self._cache.get(id(layer))
        if hit is not None and hit[0] is layer.svec and hit[1] == self.generation and hit[2].shape[0] == rows:
            return hit[2]
        batch = self.matrix.shape[0]
        if rows % batch:
            raise ValueError(f"{layer.key}: a forward of {rows} rows does not tile the {batch} samples given "
                             "per-sample weights; pass one weight row per image of the call")
        # few small ops per layer and call: on a busy machine each one can wait for a core (the index of each rank's
        # column is kept on the layer across calls; the padded matrix is made once per step for every layer)
        padded = self._cache.get("padded")
        if padded is None or padded[0] != self.generation:
            padded = (self.generation, torch.cat([self.matrix, self.matrix.new_zeros(batch, 1)], dim=1).to(
                device=layer.svec.device, dtype=torch.float32))  # the last column: not in the mix
            self._cache["padded"] = padded
        order = tuple(self.columns.items())
        if layer.sample_index is None or layer.sample_index[0] is not layer.svec or layer.sample_index[1] != order:
            cols = [self.columns.get(name, len(self.columns)) for name, _ in layer.contributors]
            index = torch.tensor([c for c, r in zip(cols, layer.ranks) for _ in range(r)], device=layer.svec.device)
            layer.sample_index = (layer.svec, order, index)
        vec = (padded[1].index_select(1, layer.sample_index[2]) * layer.svec).to(layer.svec.dtype)
        vec = vec.repeat(rows // batch, 1) if rows != batch else vec
        self._cache[id(layer)] = (layer.svec, self.generation, vec)
        return vec


__all__ = ["SampleWeights"]
