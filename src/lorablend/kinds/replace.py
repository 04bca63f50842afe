"""A replacement weight: the file gives the module's new weight, not a difference."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Mapping

import torch

from .base import DeltaKind, DeltaProblem, RowSpans, Shape, check_spans, fit_to_shape, take


@dataclass(eq=False)
class SetDelta(DeltaKind):
    """A replacement weight (BFL Flux control LoRAs' q/k norm ``.scale``; LyCORIS / ComfyUI ``set_weight``):
    ``W' = value``, so ``ΔW = value − W0`` and it needs the base weight, as DoRA does. A blend weight ``w`` moves
    the weight that fraction of the way (``W0 + w·(value − W0)``; ``w = 1`` is the file's weight exactly).

    >>> d = SetDelta(torch.full((3,), 2.0))
    >>> d.delta_weight(base=torch.ones(3)).tolist(), d.needs_base, d.shape
    ([1.0, 1.0, 1.0], True, (3,))
    """

    value: torch.Tensor
    kind: str = field(default="set", init=False)
    roles: ClassVar[frozenset[str]] = frozenset({"set_weight"})
    needs_base: ClassVar[bool] = True
    takes_dora: ClassVar[bool] = False
    alpha = None
    rank = None

    @property
    def shape(self) -> Shape:
        return tuple(int(s) for s in self.value.shape)

    def delta_weight(self, shape: Shape | torch.Size | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None:
            raise ValueError("a replacement weight's delta depends on the base weight: pass base= (the runtime and "
                             "fuse do this for you)")
        return fit_to_shape(self.value.float().reshape(base.shape) - base.float(), shape, "replacement")

    def base_free(self) -> DeltaKind:
        """Without the model a replacement's change is unknown: an offline view shows none (a zero diff)."""
        from .full import FullDelta  # full does not import this module; imported here to keep the kinds apart

        return FullDelta(diff=torch.zeros(self.shape))

    def take_rows(self, spans: RowSpans) -> "SetDelta":
        """Those rows of the replacement."""
        return SetDelta(value=take(self.value, check_spans(spans, self.out_features, "replacement")))

    def tensors(self) -> Iterator[torch.Tensor]:
        yield self.value

    def kohya_tensors(self, weight_shape: Shape | None) -> Iterator[tuple[str, torch.Tensor]]:
        yield "set_weight", self.value  # ComfyUI's name for a replacement

    @classmethod
    def from_roles(cls, get: Mapping[str, torch.Tensor], alpha: float | None) -> "SetDelta":
        if "set_weight" not in get:
            raise DeltaProblem("a replacement module needs its set_weight tensor")
        return cls(value=get["set_weight"])
