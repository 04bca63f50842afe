"""LyCORIS LoKr: the Kronecker product of two factors, each full or low-rank."""

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
    present,
    take,
    tucker,
    written_alpha,
)
from .full import FullDelta

_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


@dataclass(eq=False)
class LoKrDelta(DeltaKind):
    """LyCORIS LoKr: ``ΔW = scale · kron(w1, w2)``, each factor full or low-rank (``a @ b``).

    ``w2`` may also be Tucker (``t2`` with ``w2_a (r, out2)``, ``w2_b (r, in2)``). The scale is
    ``alpha / dim`` where ``dim`` is the rank of the decomposed factor, and 1 when neither factor
    is decomposed (LyCORIS ignores alpha for full-dim LoKr). Either factor may be the larger
    one. Convs may be stored flattened 2-D ``(out, in·kh·kw)``: pass ``shape`` to get 4-D.

    >>> d = LoKrDelta(w1=torch.eye(2), w2=torch.ones(2, 3))
    >>> d.delta_weight().shape, d.shape
    (torch.Size([4, 6]), (4, 6))
    """

    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None
    kind: str = field(default="lokr", init=False)
    roles: ClassVar[frozenset[str]] = frozenset(_NAMES)
    may_flatten_convs: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.w1 is None and (self.w1_a is None or self.w1_b is None):
            raise ValueError("LoKr needs lokr_w1 or both lokr_w1_a and lokr_w1_b")
        if self.w2 is None and (self.w2_a is None or self.w2_b is None):
            raise ValueError("LoKr needs lokr_w2 or both lokr_w2_a and lokr_w2_b")

    @property
    def rank(self) -> int | None:
        if self.w2_b is not None:
            return int(self.w2_b.shape[0])
        if self.w1_b is not None:
            return int(self.w1_b.shape[0])
        return None

    @property
    def shape(self) -> Shape:
        w1 = tuple(self.w1.shape) if self.w1 is not None else (int(self.w1_a.shape[0]), int(self.w1_b.shape[1]))
        if self.w2 is not None:
            w2 = tuple(self.w2.shape)
        elif self.t2 is not None:
            w2 = (int(self.w2_a.shape[1]), int(self.w2_b.shape[1]), *self.t2.shape[2:])
        else:
            w2 = (int(self.w2_a.shape[0]), int(self.w2_b.reshape(self.w2_b.shape[0], -1).shape[1]))
        if len(w2) == 4 and len(w1) == 2:
            w1 = (*w1, 1, 1)
        return tuple(int(a * b) for a, b in zip(w1, w2))

    def _w1(self) -> torch.Tensor:
        if self.w1 is not None:
            return self.w1.float()
        return self.w1_a.float() @ self.w1_b.float()

    def _w2(self) -> torch.Tensor:
        if self.w2 is not None:
            return self.w2.float()
        if self.t2 is not None:
            return tucker(self.t2, self.w2_a, self.w2_b)
        return self.w2_a.float() @ self.w2_b.float().reshape(self.w2_b.shape[0], -1)

    def delta_weight(self, shape: Shape | torch.Size | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
        w1, w2 = self._w1(), self._w2()
        if w2.dim() == 4 and w1.dim() == 2:
            w1 = w1[:, :, None, None]
        return fit_to_shape(torch.kron(w1, w2) * self.scale, shape, "LoKr")

    def exact_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``kron(P1 Q1, P2 Q2) = kron(P1, P2) · kron(Q1, Q2)`` (mixed product): exact at rank k1·k2, worth it
        while that rank is below the ΔW's smaller side (no Tucker w2)."""
        if self.t2 is not None:
            return None
        p1, q1 = _as_product(self.w1, self.w1_a, self.w1_b)
        p2, q2 = _as_product(self.w2, self.w2_a, self.w2_b)
        out, n = p1.shape[0] * p2.shape[0], q1.shape[1] * q2.shape[1]
        if p1.shape[1] * p2.shape[1] >= min(out, n):
            return None
        return torch.kron(p1, p2) * self.scale, torch.kron(q1, q2)

    def _w2_rows(self) -> int:
        if self.w2 is not None:
            return int(self.w2.shape[0])
        return int(self.w2_a.shape[1] if self.t2 is not None else self.w2_a.shape[0])

    def take_rows(self, spans: RowSpans) -> "LoKrDelta | FullDelta":
        """Row ``i`` of ``kron(w1, w2)`` is row ``i // p`` of ``w1`` against row ``i % p`` of ``w2`` (``p`` rows).
        Spans on whole multiples of ``p`` take rows of ``w1`` (or of ``w1_a``) and stay LoKr, exactly (Flux's q/k/v
        split of a 9216-row LoKr with ``p`` dividing 3072). Other spans cut through copies of ``w2``, which no
        Kronecker product of the same factors gives: the delta of those rows is then a dense full diff — still
        exact (the fp32 ΔW rows, scale applied), only larger."""
        spans = check_spans(spans, self.out_features, "LoKr")
        p = self._w2_rows()
        if any(a % p or b % p for a, b in spans):
            return FullDelta(diff=take(self.delta_weight(), spans))
        blocks = [(a // p, b // p) for a, b in spans]
        w1 = None if self.w1 is None else take(self.w1, blocks)
        w1_a = None if self.w1_a is None else take(self.w1_a, blocks)
        return LoKrDelta(w1=w1, w1_a=w1_a, w1_b=self.w1_b, w2=self.w2, w2_a=self.w2_a, w2_b=self.w2_b, t2=self.t2,
                         alpha=self.alpha)

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from (t for t in (self.w1, self.w1_a, self.w1_b, self.w2, self.w2_a, self.w2_b, self.t2) if t is not None)

    def kohya_tensors(self, weight_shape: Shape | None) -> Iterator[tuple[str, torch.Tensor]]:
        yield from present(zip(_NAMES, (self.w1, self.w1_a, self.w1_b, self.w2, self.w2_a, self.w2_b, self.t2)))
        alpha = written_alpha(self)
        if alpha is not None:
            yield "alpha", alpha_tensor(alpha)

    @classmethod
    def from_roles(cls, get: Mapping[str, torch.Tensor], alpha: float | None) -> "LoKrDelta":
        try:
            return cls(w1=get.get("lokr_w1"), w1_a=get.get("lokr_w1_a"), w1_b=get.get("lokr_w1_b"),
                       w2=get.get("lokr_w2"), w2_a=get.get("lokr_w2_a"), w2_b=get.get("lokr_w2_b"),
                       t2=get.get("lokr_t2"), alpha=alpha)
        except ValueError as e:
            raise DeltaProblem(f"incomplete LoKr module: {e}") from None


def _as_product(full: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoKr factor as ``P @ Q`` (2-D fp32; convs flattened to (out, in·kh·kw)): its own low-rank pair, or
    the full matrix against an identity on its smaller side."""
    if full is None:
        return a.float(), b.float().reshape(b.shape[0], -1)
    f = full.float().reshape(full.shape[0], -1)
    m, n = f.shape
    return (torch.eye(m, device=f.device), f) if m <= n else (f, torch.eye(n, device=f.device))
