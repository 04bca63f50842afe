"""A full weight difference (LyCORIS ``diff``), with an optional bias difference."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Mapping

import torch

from .base import DeltaKind, DeltaProblem, RowSpans, Shape, check_spans, fit_to_shape, present, take


@dataclass(eq=False)
class FullDelta(DeltaKind):
    """A full weight difference (LyCORIS ``diff``) with an optional bias difference (``diff_b``). A bias
    difference alone (``diff`` None: kohya / ComfyUI Flux files that trained biases only) changes no weight: its
    ΔW is zeros of the module's shape and its own ``shape`` is ``(out,)``, which fits any weight with ``out`` rows.

    >>> d = FullDelta(diff=torch.ones(2, 2), diff_b=torch.ones(2))
    >>> d.delta_weight().sum().item(), d.changes_bias, d.rank
    (4.0, True, None)
    """

    diff: torch.Tensor | None
    diff_b: torch.Tensor | None = None
    kind: str = field(default="full", init=False)
    roles: ClassVar[frozenset[str]] = frozenset({"diff", "diff_b"})
    takes_dora: ClassVar[bool] = False
    alpha = None
    rank = None

    @property
    def shape(self) -> Shape:
        return tuple(int(s) for s in (self.diff if self.diff is not None else self.diff_b).shape)

    def delta_weight(self, shape: Shape | torch.Size | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
        if self.diff is None:  # a bias difference alone: the weight does not change
            return torch.zeros(tuple(shape) if shape is not None else self.shape)
        return fit_to_shape(self.diff.float(), shape, "full diff")

    @property
    def changes_bias(self) -> bool:
        return self.diff_b is not None

    def delta_bias(self) -> torch.Tensor | None:
        return None if self.diff_b is None else self.diff_b.float()

    @property
    def changes_weight(self) -> bool:
        return self.diff is not None

    @property
    def has_lora_form(self) -> bool:
        """A weight matrix has one; a norm's scale vector (``norm_k_img.diff``) or a bias alone has none."""
        return self.diff is not None and self.diff.dim() >= 2

    def with_sum(self, weight: torch.Tensor | None, bias: torch.Tensor | None) -> "FullDelta":
        """A full diff of ``weight`` (None: a bias difference alone) and ``bias``.

        >>> FullDelta(torch.ones(3)).with_sum(torch.full((3,), 2.0), None).diff.tolist()
        [2.0, 2.0, 2.0]
        """
        return FullDelta(diff=None if weight is None else weight.reshape(self.shape), diff_b=bias)

    def fit_problem(self, weight_shape: Shape) -> str | None:
        if self.diff is None:
            return None if self.diff_b.numel() == int(weight_shape[0]) else (
                f"its bias difference has {self.diff_b.numel()} values but the module has {weight_shape[0]} outputs")
        problem = super().fit_problem(weight_shape)
        if problem is None and self.diff_b is not None and self.diff_b.numel() != int(weight_shape[0]):
            return f"its bias difference has {self.diff_b.numel()} values but the module has {weight_shape[0]} outputs"
        return problem

    def pad_inputs(self, width: int) -> "FullDelta":
        """Zero columns on the right of a 2-D ``diff`` (a bias difference alone reads no input: itself)."""
        if self.diff is None:
            return self
        if self.diff.dim() != 2 or width < self.diff.shape[1]:
            return super().pad_inputs(width)
        diff = self.diff.new_zeros(self.diff.shape[0], width)
        diff[:, : self.diff.shape[1]] = self.diff
        return FullDelta(diff=diff, diff_b=self.diff_b)

    def take_rows(self, spans: RowSpans) -> "FullDelta":
        """Those rows of the weight and bias differences."""
        spans = check_spans(spans, self.out_features, "full diff")
        diff, diff_b = (None if t is None else take(t, spans) for t in (self.diff, self.diff_b))
        return FullDelta(diff=diff, diff_b=diff_b)

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from (t for t in (self.diff, self.diff_b) if t is not None)

    def kohya_tensors(self, weight_shape: Shape | None) -> Iterator[tuple[str, torch.Tensor]]:
        yield from present((("diff", self.diff), ("diff_b", self.diff_b)))  # a full diff has no alpha

    @classmethod
    def from_roles(cls, get: Mapping[str, torch.Tensor], alpha: float | None) -> "FullDelta":
        diff_b = get.get("diff_b")
        if diff_b is not None and diff_b.dim() != 1:
            raise DeltaProblem(f"a bias difference (diff_b) of shape {tuple(diff_b.shape)}: a bias has one axis")
        return cls(diff=get.get("diff"), diff_b=diff_b)
