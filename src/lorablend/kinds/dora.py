"""DoRA (weight-decomposed LoRA) on top of a LoRA, LoHa or LoKr delta."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Literal, Union

import torch

from .base import DeltaKind, DeltaProblem, RowSpans, Shape, check_spans, fit_to_shape, take
from .loha import LoHaDelta
from .lokr import LoKrDelta
from .lora import LowRankDelta

InnerDelta = Union[LowRankDelta, LoHaDelta, LoKrDelta]


@dataclass(eq=False)
class DoRADelta(DeltaKind):
    """DoRA (weight-decomposed) on top of a LoRA / LoHa / LoKr delta.

    ``W' = (W0 + ΔW) · m / ‖W0 + ΔW‖`` where the norm runs per output row (``magnitude`` of shape
    ``(out,)`` or ``(out, 1, …)``: PEFT's ``lora_magnitude_vector``, LyCORIS ``wd_on_out=True``)
    or per input column (``(1, in, …)``: A1111 and older LyCORIS). ``axis`` is detected from the
    shape by the reader (:meth:`axis_of`); for a square weight a flat vector means ``"out"``.
    The effective delta is ``W' - W0``, so it needs the base weight; the blend weighs that delta
    linearly (ComfyUI's strength semantics: ``W0 + m·(W' - W0)``).

    >>> d = DoRADelta(LowRankDelta(torch.ones(1, 3), torch.ones(2, 1)), magnitude=torch.ones(2))
    >>> d.delta_weight(base=torch.eye(2, 3)).shape, d.needs_base, d.base_free() is d.inner
    (torch.Size([2, 3]), True, True)
    """

    inner: InnerDelta
    magnitude: torch.Tensor
    axis: Literal["out", "in"] = "out"
    kind: str = field(default="dora", init=False)
    roles: ClassVar[frozenset[str]] = frozenset({"magnitude", "dora_scale"})
    needs_base: ClassVar[bool] = True

    @property
    def rank(self) -> int | None:
        return self.inner.rank

    @property
    def alpha(self) -> float | None:
        return self.inner.alpha

    @property
    def shape(self) -> Shape:
        return self.inner.shape

    @property
    def may_flatten_convs(self) -> bool:  # type: ignore[override]
        return self.inner.may_flatten_convs

    def delta_weight(self, shape: Shape | torch.Size | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
        if base is None:
            raise ValueError(
                "a DoRA delta depends on the base weight: pass base= (the runtime and fuse do this for you)"
            )
        w0 = base.float()
        merged = w0 + self.inner.delta_weight(w0.shape)
        if self.axis == "out":
            dims = tuple(range(1, merged.dim()))
            # vector_norm: Tensor.norm over three dims (a conv's in, kh, kw) is a matrix-norm error
            norm = torch.linalg.vector_norm(merged, dim=dims, keepdim=True)
            mag = self.magnitude.float().reshape(merged.shape[0], *([1] * (merged.dim() - 1)))
        else:
            # per input column: the norm runs over every dim but 1 (output rows and, for convs, the kernel),
            # as A1111's and LyCORIS' apply_weight_decompose do; magnitude is (1, in, 1, 1) for convs
            dims = (0, *range(2, merged.dim()))
            norm = torch.linalg.vector_norm(merged, dim=dims, keepdim=True)
            mag = self.magnitude.float().reshape(norm.shape)
        return fit_to_shape(merged * (mag / norm) - w0, shape, "DoRA")

    def base_free(self) -> InnerDelta:
        return self.inner

    def fit_problem(self, weight_shape: Shape) -> str | None:
        problem = self.inner.fit_problem(weight_shape)
        if problem is not None:
            return problem
        want = int(weight_shape[0] if self.axis == "out" else weight_shape[1])
        if self.magnitude.numel() != want:
            return (f"its DoRA magnitude has {self.magnitude.numel()} values but the module has {want} "
                    f"{'output rows' if self.axis == 'out' else 'input columns'}")
        return None

    def take_rows(self, spans: RowSpans) -> "DoRADelta":
        """Per-output-row norms are row by row, so those rows of the magnitude and of the inner delta are exact.
        Per-input-column norms run over every row of the fused layer, which no module made of some of its rows
        sees: refused, with why."""
        if self.axis != "out":
            raise DeltaProblem(
                "a DoRA delta with per-input-column norms (dora_scale of shape (1, in)) over a fused layer cannot be "
                "split into its modules: each column's norm runs over all the fused rows, which no single module has"
            )
        spans = check_spans(spans, self.out_features, "DoRA")
        inner = self.inner.take_rows(spans)
        if not isinstance(inner, type(self.inner)):  # a LoKr whose rows had to become a dense diff
            raise DeltaProblem("DoRA over a LoKr whose rows do not split on its Kronecker blocks is not applied")
        flat = self.magnitude.reshape(self.magnitude.shape[0], -1) if self.magnitude.dim() > 1 else self.magnitude
        magnitude = take(flat, spans)
        return DoRADelta(inner=inner, magnitude=magnitude.reshape(-1, *self.magnitude.shape[1:]), axis=self.axis)

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from self.inner.tensors()
        yield self.magnitude

    def kohya_tensors(self, weight_shape: Shape | None) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.inner.kohya_tensors(weight_shape)
        yield "dora_scale", self._kohya_magnitude(weight_shape)

    def _kohya_magnitude(self, weight_shape: Shape | None) -> torch.Tensor:
        """``dora_scale`` as LyCORIS stores it: (out, 1, …) for per-output-row norms, (1, in, …) for per-input ones."""
        mag = self.magnitude
        if weight_shape is None:
            if mag.dim() >= 2:
                return mag
            # No module shape known: a flat PEFT-style vector is per output row of a linear layer.
            return mag.reshape(-1, 1) if self.axis == "out" else mag.reshape(1, -1)
        ones = [1] * (len(weight_shape) - 2)
        if self.axis == "out":
            return mag.reshape(weight_shape[0], 1, *ones)
        # per input column the norm also runs over the kernel (A1111 / LyCORIS): one value per input channel
        return mag.reshape(1, weight_shape[1], *ones)

    @property
    def lycoris_algo(self) -> str:
        return self.inner.lycoris_algo or "locon"  # kohya's networks.lora holds no DoRA

    def peft_problem(self) -> str | None:
        if self.inner.peft_problem() is not None:
            return f"DoRA on {self.inner.kind}"
        if self.axis != "out":
            return "DoRA with per-input-column magnitudes"
        return None

    def peft_tensors(self, weight_shape: Shape | None) -> dict[str, torch.Tensor]:
        """The inner LoRA's tensors plus PEFT's ``lora_magnitude_vector`` (no ``.weight``): ``(out,)`` for a
        Linear, ``(1, out, 1, 1)`` for a Conv2d."""
        conv = len(weight_shape) == 4 if weight_shape is not None else len(self.inner.shape) == 4
        magnitude = self.magnitude.reshape(1, -1, 1, 1) if conv else self.magnitude.reshape(-1)
        return {**self.inner.peft_tensors(weight_shape), "lora_magnitude_vector": magnitude}

    @staticmethod
    def axis_of(magnitude: torch.Tensor, from_peft: bool) -> Literal["out", "in"]:
        """The norm axis a stored magnitude means: PEFT's ``lora_magnitude_vector`` is always per output row
        (``(out,)``, or ``(1, out, 1, 1)`` for convs); kohya / LyCORIS ``dora_scale`` ``(out, 1, …)`` or
        ``(out,)`` is per output row, ``(1, in, …)`` per input column (A1111 and older LyCORIS).

        >>> DoRADelta.axis_of(torch.ones(1, 8, 1, 1), from_peft=False), DoRADelta.axis_of(torch.ones(8, 1), False)
        ('in', 'out')
        """
        if from_peft or magnitude.dim() <= 1:
            return "out"
        if magnitude.shape[0] == 1 and math.prod(magnitude.shape[2:]) == 1 and magnitude.shape[1] > 1:
            return "in"
        if math.prod(magnitude.shape[1:]) == 1:
            return "out"
        raise DeltaProblem(f"dora_scale of shape {tuple(magnitude.shape)} is neither per output row nor per input column")
