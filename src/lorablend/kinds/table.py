"""A modulation-table difference (lightx2v / Kijai distillation LoRAs' ``diff_m``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Mapping

import torch

from .base import DeltaKind, DeltaProblem, RowSpans, Shape, fit_to_shape


@dataclass(eq=False)
class TableDelta(DeltaKind):
    """The difference of a transformer's modulation table (``diff_m``: Wan's per-block ``modulation``, diffusers'
    ``scale_shift_table`` of shape ``(1, 6, width)``; the head's ``(1, 2, width)``). The table is a parameter the
    block adds to its timestep embedding, no Linear: ``ΔT`` is the tensor itself, added with the adapter's weight.

    >>> d = TableDelta(torch.ones(1, 6, 4))
    >>> d.delta_weight().shape, d.shape, d.rank
    (torch.Size([1, 6, 4]), (1, 6, 4), None)
    """

    diff_m: torch.Tensor
    kind: str = field(default="table", init=False)
    roles: ClassVar[frozenset[str]] = frozenset({"diff_m"})
    takes_dora: ClassVar[bool] = False
    alpha = None
    rank = None

    @property
    def shape(self) -> Shape:
        return tuple(int(s) for s in self.diff_m.shape)

    def delta_weight(self, shape: Shape | torch.Size | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
        return fit_to_shape(self.diff_m.float(), shape, "modulation table diff")

    def fit_problem(self, weight_shape: Shape) -> str | None:
        """Only the table's own shape fits: a table's rows are (shift, scale, gate …), not outputs to reshape."""
        weight_shape = tuple(int(s) for s in weight_shape)
        if self.shape != weight_shape:
            return f"its table difference is {self.shape} but the table is {weight_shape}: made for another model"
        return None

    @property
    def has_lora_form(self) -> bool:
        """No: a table is one parameter, not a matrix a module multiplies; ComfyUI, WanVideoWrapper and lightx2v
        exchange it as the table difference itself (``diffusion_model.blocks.N.diff_m``), never as LoRA factors."""
        return False

    def with_sum(self, weight: torch.Tensor | None, bias: torch.Tensor | None) -> "TableDelta":
        """The table difference ``weight`` (a weighted sum of tables of this shape: what merge gives, exact).

        >>> TableDelta(torch.ones(1, 6, 4)).with_sum(torch.zeros(1, 6, 4), None).shape
        (1, 6, 4)
        """
        if weight is None or bias is not None or tuple(weight.shape) != self.shape:
            raise DeltaProblem(f"a modulation table difference is one tensor of shape {self.shape}; got weight "
                               f"{None if weight is None else tuple(weight.shape)} and a bias {bias is not None}")
        return TableDelta(diff_m=weight)

    def peft_problem(self) -> str | None:
        return "modulation table (diff_m)"

    def take_rows(self, spans: RowSpans) -> "TableDelta":
        raise DeltaProblem("a modulation table is one parameter of its block: it is never split over modules")

    def tensors(self) -> Iterator[torch.Tensor]:
        yield self.diff_m

    def kohya_tensors(self, weight_shape: Shape | None) -> Iterator[tuple[str, torch.Tensor]]:
        yield "diff_m", self.diff_m

    @classmethod
    def from_roles(cls, get: Mapping[str, torch.Tensor], alpha: float | None) -> "TableDelta":
        diff_m = get.get("diff_m")
        if diff_m is None or diff_m.dim() != 3:
            shape = None if diff_m is None else tuple(diff_m.shape)
            raise DeltaProblem(f"a modulation table difference (diff_m) of shape {shape}: a table has three axes "
                               "(1, rows, width)")
        return cls(diff_m=diff_m)
