"""What every Delta kind answers, and the few helpers the kinds share.

A Delta is one layer's change. Each kind (one file in this package, one entry in ``KINDS``) knows its own
shape, its ΔW, whether it has cheap low-rank factors, whether it changes the bias, and how it is named in
each file format it appears in. Callers ask the kind; they never switch on it.

Scale semantics, decided once for every kind: ``scale = alpha / rank``; a missing alpha, or an alpha of 0,
means ``scale = 1`` (kohya's rule: sd-scripts treats alpha 0 as alpha = rank; ComfyUI would zero the layer
instead, which silently disables it, so we do not follow it). Every ``delta_weight`` is float32 and already
carries that scale.

>>> from lorablend.kinds import LowRankDelta
>>> d = LowRankDelta(down=torch.ones(2, 3), up=torch.ones(4, 2), alpha=1.0)
>>> d.shape, d.out_features, d.scale, d.changes_bias
((4, 3), 4, 0.5, False)
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

import torch

Shape = tuple[int, ...]


class DeltaProblem(ValueError):
    """Why one module's tensors do not make a Delta (reported as unsupported for that module's keys)."""


def scale_of(alpha: float | None, rank: int | None) -> float:
    """``alpha / rank``; 1 when alpha is missing or 0, or the kind has no rank.

    >>> scale_of(8.0, 16), scale_of(None, 16), scale_of(0.0, 16)
    (0.5, 1.0, 1.0)
    """
    if alpha is None or alpha == 0 or not rank:
        return 1.0
    return float(alpha) / float(rank)


def fit_to_shape(delta: torch.Tensor, shape: Shape | torch.Size | None, kind: str) -> torch.Tensor:
    """Reshape a ΔW to a module weight's shape; only element-count-preserving reshapes are allowed.

    >>> fit_to_shape(torch.zeros(4, 18), (4, 2, 3, 3), "LoKr").shape
    torch.Size([4, 2, 3, 3])
    """
    if shape is None:
        return delta
    shape = tuple(shape)
    if tuple(delta.shape) == shape:
        return delta
    if delta.numel() != math.prod(shape):
        raise ValueError(
            f"{kind} delta of shape {tuple(delta.shape)} cannot fit a weight of shape {shape}: "
            f"{delta.numel()} elements against {math.prod(shape)}. The adapter was made for another model."
        )
    return delta.reshape(shape)


def tucker(core: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """LyCORIS' rebuild_tucker: ``ΔW[p, r, ...] = Σ_ij core[i, j, ...] · left[i, p] · right[j, r]``.

    >>> tucker(torch.ones(1, 1, 3, 3), torch.ones(1, 2), torch.ones(1, 4)).shape
    torch.Size([2, 4, 3, 3])
    """
    # contiguous: torch.kron (LoKr with a Tucker w2) fails on the strided view einsum returns
    return torch.einsum("i j ..., i p, j r -> p r ...", core.float(), left.float(), right.float()).contiguous()


def alpha_tensor(alpha: float) -> torch.Tensor:
    """A 0-d alpha tensor: fp32 when that holds the value exactly, else fp64, so the scale survives a round trip.

    >>> alpha_tensor(4.0).dtype, alpha_tensor(0.1).dtype
    (torch.float32, torch.float64)
    """
    t32 = torch.tensor(float(alpha), dtype=torch.float32)
    if float(t32) == float(alpha):
        return t32
    return torch.tensor(float(alpha), dtype=torch.float64)


def written_alpha(delta: Any) -> float | None:
    """The alpha to store: ``None`` stays absent (scale 1 everywhere); alpha 0 is stored as ``rank`` because
    lorablend and kohya read 0 as scale 1 but ComfyUI reads it as scale 0 — storing ``rank`` means the same
    to every loader.

    >>> from lorablend.kinds import LowRankDelta
    >>> written_alpha(LowRankDelta(torch.ones(4, 3), torch.ones(2, 4), alpha=0.0))
    4.0
    """
    alpha = getattr(delta, "alpha", None)
    if alpha is None:
        return None
    if float(alpha) == 0.0:
        return float(delta.rank) if delta.rank else None
    return float(alpha)


def module_shaped(down: torch.Tensor, up: torch.Tensor, weight_shape: Shape | None) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors with the dims the module's own layer would have: 4-D ``(r, in, kh, kw)`` / ``(out, r, 1, 1)``
    for a Conv2d, 2-D for a Linear. A1111 copies factors into real Conv2d/Linear layers, so 2-D factors of a 1x1
    conv (as some converters write them) would not load there. Element order is unchanged.

    >>> [t.shape for t in module_shaped(torch.zeros(2, 8), torch.zeros(4, 2), (4, 8, 1, 1))]
    [torch.Size([2, 8, 1, 1]), torch.Size([4, 2, 1, 1])]
    """
    if weight_shape is None or down.shape[0] * math.prod(weight_shape[1:]) != down.numel():
        return down, up
    if len(weight_shape) == 4:
        return down.reshape(down.shape[0], *weight_shape[1:]), up.reshape(up.shape[0], -1, 1, 1)
    return down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)


RowSpans = Sequence[tuple[int, int]]


def check_spans(spans: RowSpans, out: int, what: str) -> list[tuple[int, int]]:
    """The spans as a list, or a DeltaProblem when one is empty or falls outside ``out`` rows.

    >>> check_spans(((0, 2), (4, 6)), 6, "LoRA")
    [(0, 2), (4, 6)]
    """
    spans = [(int(a), int(b)) for a, b in spans]
    bad = [(a, b) for a, b in spans if not 0 <= a < b <= out]
    if not spans or bad:
        raise DeltaProblem(f"rows {bad or spans} are not inside the {out} output rows of this {what} delta")
    return spans


def take(tensor: torch.Tensor, spans: RowSpans, dim: int = 0) -> torch.Tensor:
    """The rows (``dim``) of ``tensor`` in ``spans``, in order: a view for one span, else one new tensor.

    >>> take(torch.arange(6), ((4, 6), (0, 2))).tolist()
    [4, 5, 0, 1]
    """
    parts = [tensor.narrow(dim, a, b - a) for a, b in spans]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def takes_old_shape_keyword(method: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``delta_weight`` that still takes its pre-0.2 keyword ``weight_shape=`` (now ``shape=``), with a
    ``DeprecationWarning`` (removed in 0.3). ``DeltaKind`` wraps every kind's ``delta_weight`` with it, once.

    >>> from lorablend.kinds import FullDelta
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     FullDelta(torch.ones(2, 2)).delta_weight(weight_shape=(4,)).shape, caught[0].category.__name__
    (torch.Size([4]), 'DeprecationWarning')
    """

    @functools.wraps(method)
    def delta_weight(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if "weight_shape" in kwargs:
            if args or "shape" in kwargs:
                raise TypeError("delta_weight() got both shape and its old name weight_shape: pass shape= only")
            warnings.warn("delta_weight(weight_shape=...) is deprecated and will be removed in lorablend 0.3: "
                          "use delta_weight(shape=...)", DeprecationWarning, stacklevel=2)
            kwargs["shape"] = kwargs.pop("weight_shape")
        return method(self, *args, **kwargs)

    delta_weight.takes_old_shape_keyword = True
    return delta_weight


def present(pairs: Iterable[tuple[str, torch.Tensor | None]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The ``(name, tensor)`` pairs whose tensor exists (optional factors are None)."""
    return ((n, t) for n, t in pairs if t is not None)


class DeltaKind:
    """The questions every kind answers. Subclasses are dataclasses holding the kind's tensors and give:
    ``kind``, ``roles`` (the tensor roles readers sort a module's keys into that identify the kind), ``rank``,
    ``alpha``, ``shape``, ``delta_weight``, ``tensors``, ``kohya_tensors`` and ``from_roles``; the rest has
    defaults here that kinds override where they differ."""

    kind: ClassVar[str]
    roles: ClassVar[frozenset[str]] = frozenset()
    # roles the kind also takes when a module has them (a LoRA's bias); any other role a module has beside the
    # kind's own is refused by the reader, never dropped
    extra_roles: ClassVar[frozenset[str]] = frozenset()
    # DoRA's ΔW depends on the base weight: fuse and merge must pass it.
    needs_base: ClassVar[bool] = False
    # LyCORIS LoHa / LoKr may hold a conv's ΔW flattened to (out, in·kh·kw): its 4-D shape comes from the module.
    may_flatten_convs: ClassVar[bool] = False
    # Whether trainers write DoRA magnitudes over this kind (LoRA, LoHa, LoKr do; a full diff does not).
    takes_dora: ClassVar[bool] = True

    rank: Any
    alpha: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # every kind's delta_weight keeps the old keyword for one release (callers outside broke on the rename)
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("delta_weight")
        if own is not None and not getattr(own, "takes_old_shape_keyword", False):
            cls.delta_weight = takes_old_shape_keyword(own)

    @property
    def scale(self) -> float:
        """``alpha / rank`` (1 without alpha): already folded into every ΔW and factor this kind gives."""
        return scale_of(self.alpha, self.rank)

    @property
    def shape(self) -> Shape:  # pragma: no cover - every kind defines it
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        """The output width the delta was made for (rows of its ΔW), read from its factor shapes."""
        return int(self.shape[0])

    def delta_weight(self, shape: Shape | torch.Size | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
        """The fp32 ΔW (scale applied), reshaped to ``shape`` when given. ``base`` (the module's weight) is used
        only by kinds that need it (``needs_base``)."""
        raise NotImplementedError  # pragma: no cover

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """2-D fp32 ``(up, down)`` with ``up @ down`` = ΔW flattened to (out, -1), scale folded into ``up`` — for
        kinds whose natural form is one cheap low-rank pair (what the runtime and fuse use); else None."""
        return None

    def exact_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Exact 2-D fp32 factors of ΔW (scale folded in) where they are smaller than ΔW, else None: what merge
        stacks for ``cat`` and decomposes for ``svd``. Kinds with a product structure override it."""
        return self.low_rank_factors()

    @property
    def changes_bias(self) -> bool:
        """Whether the delta also changes the module's bias (see :meth:`delta_bias`)."""
        return False

    def delta_bias(self) -> torch.Tensor | None:
        """The fp32 bias difference, or None."""
        return None

    @property
    def changes_weight(self) -> bool:
        """Whether the delta changes the weight at all (a full diff holding only a bias difference does not)."""
        return True

    @property
    def has_lora_form(self) -> bool:
        """Whether a LoRA can hold this delta's ΔW: a Linear's or a conv's weight matrix. A modulation table or a
        norm's scale vector has no matrix to factor: merge sums such deltas exactly, in their own kind
        (:meth:`with_sum`)."""
        return True

    def with_sum(self, weight: torch.Tensor | None, bias: torch.Tensor | None) -> "DeltaKind":
        """A delta of this kind holding exactly ``weight`` (a weighted sum of ΔWs of this delta's shape, or None when
        only biases change) and ``bias``: what merge gives a layer whose kind has no LoRA form. Kinds whose
        ``has_lora_form`` is False give it."""
        raise DeltaProblem(f"a {self.kind} delta is merged as a LoRA, not summed in its own kind")

    def base_free(self) -> "DeltaKind":
        """The part of this delta whose ΔW needs no base weight (itself; DoRA: its inner delta) — what an
        offline view (inspect, plots) can show without a model."""
        return self

    def rows(self, start: int, stop: int) -> "DeltaKind":
        """The exact delta of output rows ``[start, stop)`` of this one: what a module made of those rows of a
        fused layer gets (a LoRA over Flux's ``qkv`` gives ``to_q`` its rows ``0:3072``). Same kind where the kind
        allows it (a LoRA keeps its down factor and alpha and takes those rows of ``up``), so nothing becomes dense
        that was not; ``DeltaProblem`` when the rows cannot be separated exactly.

        >>> from lorablend.kinds import LowRankDelta
        >>> LowRankDelta(torch.ones(2, 3), torch.ones(6, 2), alpha=1.0).rows(2, 4).shape
        (2, 3)
        """
        return self.take_rows(((start, stop),))

    def pad_inputs(self, width: int) -> "DeltaKind":
        """The same delta reading ``width`` input features, the new ones (on the right) with zero columns: a LoRA
        made for a plain Flux ``x_embedder`` on one widened for a control image (diffusers zero-pads it the same
        way). ``DeltaProblem`` where the kind cannot be widened exactly (those that can say so).

        >>> from lorablend.kinds import LowRankDelta
        >>> LowRankDelta(torch.ones(2, 3), torch.ones(4, 2)).pad_inputs(5).shape
        (4, 5)
        """
        raise DeltaProblem(f"a {self.kind} delta cannot be widened to {width} input features; only LoRA and full "
                           f"diffs can (zero columns for the new inputs)")

    def take_rows(self, spans: RowSpans) -> "DeltaKind":
        """The exact delta whose output rows are these ``(start, stop)`` spans of this one's, in order (one span:
        :meth:`rows`; two swapped halves: a modulation whose (shift, scale) diffusers reads as (scale, shift)).
        Every kind gives it; ``DeltaProblem`` when the rows cannot be separated exactly."""
        raise NotImplementedError  # pragma: no cover

    def fit_problem(self, weight_shape: Shape) -> str | None:
        """None when the delta fits a weight of ``weight_shape``; else the reason, in words.

        A fit is the same shape, or the same output width and element count: a conv stored flattened
        ``(out, in·kh·kw)`` (LyCORIS LoKr), or a 1×1 conv given 2-D factors (and the reverse).
        """
        weight_shape = tuple(int(s) for s in weight_shape)
        natural = self.shape
        if natural != weight_shape and not (
            natural[0] == weight_shape[0] and math.prod(natural) == math.prod(weight_shape)
        ):
            return f"its ΔW is {natural} but the module's weight is {weight_shape}: made for another model"
        return None

    def kohya_tensors(self, weight_shape: Shape | None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(suffix, tensor)`` pairs as kohya / LyCORIS files name them (``lora_down.weight``, ``hada_w1_a``…)."""
        raise NotImplementedError  # pragma: no cover

    @property
    def lycoris_algo(self) -> str | None:
        """The LyCORIS ``algo`` a kohya file names for this delta, or None when kohya's own ``networks.lora``
        holds it (plain LoRA / LoCon)."""
        return self.kind

    def peft_problem(self) -> str | None:
        """None when a diffusers / PEFT LoRA file can hold this delta; else what it is, for the error message."""
        return self.kind

    def peft_tensors(self, weight_shape: Shape | None) -> dict[str, torch.Tensor]:
        """``{suffix: tensor}`` as PEFT names them (``lora_A.weight``…), for kinds with no ``peft_problem``."""
        raise ValueError(f"a diffusers / PEFT LoRA file cannot hold a {self.kind} delta")  # pragma: no cover

    def tensors(self) -> Iterator[torch.Tensor]:  # pragma: no cover - every kind defines it
        raise NotImplementedError

    @classmethod
    def from_roles(cls, get: Mapping[str, torch.Tensor], alpha: float | None) -> "DeltaKind":
        """Build the kind from a module's tensors by role (``get`` holds the roles present), or raise
        :class:`DeltaProblem` saying what is missing or inconsistent."""
        raise NotImplementedError  # pragma: no cover


def need(get: Mapping[str, torch.Tensor], *roles: str) -> list[torch.Tensor]:
    """The tensors of ``roles``, or a DeltaProblem naming those missing."""
    missing = [r for r in roles if r not in get]
    if missing:
        raise DeltaProblem(f"incomplete module: has {sorted(get)} but no {missing}")
    return [get[r] for r in roles]
