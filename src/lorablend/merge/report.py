"""What a merge did, layer by layer: returned by :func:`lorablend.merge_with_report`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LayerMerge:
    """One merged layer: the rank written, the relative Frobenius error ``‖M - result‖ / ‖M‖`` against
    the exact weighted sum ``M`` (0 when ``M`` is 0), which adapters contributed and how it was computed
    (``"factors"``: from the low-rank factors only; ``"dense"``: through the dense ΔW; ``"exact"``: the weighted sum
    kept in its own kind, rank 0, where no LoRA can hold the layer: merge/sums.py)."""

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
        ranks = sorted({layer.rank for layer in self.layers if layer.path != "exact"})
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
                {"key": layer.key, "rank": layer.rank, "rel_error": layer.rel_error, "sources": list(layer.sources),
                 "path": layer.path, "note": layer.note}
                for layer in self.layers
            ],
        }

    def __str__(self) -> str:
        return self.summary()
