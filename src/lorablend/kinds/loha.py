"""LyCORIS LoHa: the Hadamard product of two low-rank products."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Mapping

import torch

from .base import (
    DeltaKind,
    DeltaProblem,
    RowSpans,
    Shape,
    alpha_tensor,
    check_spans,
    fit_to_shape,
    need,
    present,
    take,
    tucker,
    written_alpha,
)

_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


@dataclass(eq=False)
class LoHaDelta(DeltaKind):
    """LyCORIS LoHa: ``ΔW = alpha/rank · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``; optional Tucker ``t1``/``t2``.

    Plain: ``w?_a (out, r)``, ``w?_b (r, in·kh·kw)``. Tucker: ``t? (r, r, kh, kw)``, ``w?_a (r, out)``,
    ``w?_b (r, in)``, rebuilt as LyCORIS does (``einsum("i j k l, j r, i p -> p r k l")``).

    >>> d = LoHaDelta(w1_a=torch.ones(4, 2), w1_b=torch.ones(2, 3), w2_a=torch.ones(4, 2), w2_b=torch.ones(2, 3))
    >>> d.delta_weight()[0, 0].item(), d.shape
    (4.0, (4, 3))
    """

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    alpha: float | None = None
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    kind: str = field(default="loha", init=False)
    roles: ClassVar[frozenset[str]] = frozenset(_NAMES)
    may_flatten_convs: ClassVar[bool] = True

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    @property
    def shape(self) -> Shape:
        if self.t1 is not None:
            return (int(self.w1_a.shape[1]), int(self.w1_b.shape[1]), *self.t1.shape[2:])
        return (int(self.w1_a.shape[0]), int(self.w1_b.reshape(self.w1_b.shape[0], -1).shape[1]))

    def _factor(self, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        if t is not None:
            # With Tucker, LyCORIS stores both factors rank-first: a (r, out), b (r, in).
            return tucker(t, a, b)
        return a.float().reshape(a.shape[0], -1) @ b.float().reshape(b.shape[0], -1)

    def delta_weight(self, shape: Shape | torch.Size | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
        w = self._factor(self.w1_a, self.w1_b, self.t1) * self._factor(self.w2_a, self.w2_b, self.t2)
        return fit_to_shape(w * self.scale, shape, "LoHa")

    def exact_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(U1 D1) ⊙ (U2 D2) = (U1 ⊙row U2)(D1 ⊙col D2)``: the face-splitting product is exact at rank r1·r2,
        worth it while that rank is below the ΔW's smaller side (plain LoHa only)."""
        if self.t1 is not None or self.t2 is not None:
            return None
        u1, d1 = self.w1_a.float(), self.w1_b.float().reshape(self.w1_b.shape[0], -1)
        u2, d2 = self.w2_a.float(), self.w2_b.float().reshape(self.w2_b.shape[0], -1)
        out, n = u1.shape[0], d1.shape[1]
        r = u1.shape[1] * u2.shape[1]
        if r >= min(out, n):
            return None
        up = (u1[:, :, None] * u2[:, None, :]).reshape(out, r) * self.scale
        down = (d1[:, None, :] * d2[None, :, :]).reshape(r, n)
        return up, down

    def take_rows(self, spans: RowSpans) -> "LoHaDelta":
        """Row ``i`` of ``(w1_a w1_b) ⊙ (w2_a w2_b)`` is row ``i`` of ``w1_a`` and of ``w2_a`` against the shared
        ``b`` factors: take those rows of both ``a`` factors (their second axis with Tucker, where ``a`` is (r, out))."""
        spans = check_spans(spans, self.out_features, "LoHa")
        dim = 1 if self.t1 is not None else 0
        return LoHaDelta(w1_a=take(self.w1_a, spans, dim), w1_b=self.w1_b, w2_a=take(self.w2_a, spans, dim),
                         w2_b=self.w2_b, alpha=self.alpha, t1=self.t1, t2=self.t2)

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from (t for t in (self.w1_a, self.w1_b, self.w2_a, self.w2_b, self.t1, self.t2) if t is not None)

    def kohya_tensors(self, weight_shape: Shape | None) -> Iterator[tuple[str, torch.Tensor]]:
        yield from present(zip(_NAMES, (self.w1_a, self.w1_b, self.w2_a, self.w2_b, self.t1, self.t2)))
        alpha = written_alpha(self)
        if alpha is not None:
            yield "alpha", alpha_tensor(alpha)

    @classmethod
    def from_roles(cls, get: Mapping[str, torch.Tensor], alpha: float | None) -> "LoHaDelta":
        w1_a, w1_b, w2_a, w2_b = need(get, *_NAMES[:4])
        t1, t2 = get.get("hada_t1"), get.get("hada_t2")
        if (t1 is None) != (t2 is None):
            raise DeltaProblem("LoHa with only one of hada_t1 / hada_t2: Tucker LoHa needs both")
        return cls(w1_a=w1_a, w1_b=w1_b, w2_a=w2_a, w2_b=w2_b, alpha=alpha, t1=t1, t2=t2)
