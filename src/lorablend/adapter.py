"""The canonical model: an Adapter is a name, a family and one Delta per target layer.

Every reader maps its format into this; every writer maps out of it; merge, resolve and the
runtime only ever see these classes. A *target key* is ``component.module_path`` in diffusers
naming, e.g. ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` or
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``.

Scale semantics, decided once for every kind: ``scale = alpha / rank``; a missing alpha, or an
alpha of 0, means ``scale = 1`` (kohya's rule: sd-scripts treats alpha 0 as alpha = rank; ComfyUI
would zero the layer instead, which silently disables it, so we do not follow it).

All ``delta_weight`` results are float32 and already carry the alpha/rank scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Callable, Iterator, Literal, Sequence, Union

import torch

from .report import LoadReport

Family = Literal["sd1", "sd2", "sdxl"]
FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl")


def _scale(alpha: float | None, rank: int | None) -> float:
    if alpha is None or alpha == 0 or not rank:
        return 1.0
    return float(alpha) / float(rank)


def _fit_to_shape(delta: torch.Tensor, weight_shape: tuple[int, ...] | torch.Size | None, kind: str) -> torch.Tensor:
    """Reshape a ΔW to the module weight's shape; only element-count-preserving reshapes are allowed."""
    if weight_shape is None:
        return delta
    weight_shape = tuple(weight_shape)
    if tuple(delta.shape) == weight_shape:
        return delta
    if delta.numel() != math.prod(weight_shape):
        raise ValueError(
            f"{kind} delta of shape {tuple(delta.shape)} cannot fit a weight of shape {weight_shape}: "
            f"{delta.numel()} elements against {math.prod(weight_shape)}. The adapter was made for another model."
        )
    return delta.reshape(weight_shape)


def _tucker(core: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """LyCORIS' rebuild_tucker: ΔW[p, r, ...] = Σ_ij core[i, j, ...] · left[i, p] · right[j, r]."""
    # contiguous: torch.kron (LoKr with a Tucker w2) fails on the strided view einsum returns
    return torch.einsum("i j ..., i p, j r -> p r ...", core.float(), left.float(), right.float()).contiguous()


@dataclass(eq=False)
class LowRankDelta:
    """LoRA / LoCon: ``ΔW = alpha/rank · up @ down`` (optionally through a Tucker ``mid`` core).

    Shapes: linear ``down (r, in)``, ``up (out, r)``; conv ``down (r, in, kh, kw)``,
    ``up (out, r, 1, 1)``; Tucker conv ``down (r, in, 1, 1)``, ``mid (r, r, kh, kw)``.

    >>> d = LowRankDelta(down=torch.ones(2, 3), up=torch.ones(4, 2), alpha=1.0)
    >>> d.delta_weight().shape, d.scale
    (torch.Size([4, 3]), 0.5)
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    mid: torch.Tensor | None = None
    kind: str = field(default="lora", init=False)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return _scale(self.alpha, self.rank)

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4 or self.up.dim() == 4

    def natural_shape(self) -> tuple[int, ...]:
        out = int(self.up.shape[0])
        if self.mid is not None:
            return (out, int(self.down.shape[1]), *self.mid.shape[2:])
        if self.down.dim() == 4:
            return (out, *self.down.shape[1:])
        return (out, int(self.down.shape[1]))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D fp32 factors ``(up, down)`` with ``up @ down == delta_weight()`` flattened to (out, -1).

        The alpha/rank scale is folded into ``up`` so callers never apply it twice.
        """
        up = self.up.reshape(self.up.shape[0], -1).float() * self.scale
        if self.mid is not None:
            down2d = self.down.reshape(self.down.shape[0], -1).float()
            # mid (r_up, r_down, kh, kw) contracted with down (r_down, in): (r_up, in, kh, kw)
            core = torch.einsum("i j k l, j r -> i r k l", self.mid.float(), down2d)
            return up, core.reshape(core.shape[0], -1)
        return up, self.down.reshape(self.down.shape[0], -1).float()

    def delta_weight(self, weight_shape: tuple[int, ...] | torch.Size | None = None) -> torch.Tensor:
        up, down = self.factors()
        return _fit_to_shape((up @ down).reshape(self.natural_shape()), weight_shape, "LoRA")

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from (t for t in (self.down, self.up, self.mid) if t is not None)


@dataclass(eq=False)
class LoHaDelta:
    """LyCORIS LoHa: ``ΔW = alpha/rank · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``; optional Tucker ``t1``/``t2``.

    Plain: ``w?_a (out, r)``, ``w?_b (r, in·kh·kw)``. Tucker: ``t? (r, r, kh, kw)``, ``w?_a (r, out)``,
    ``w?_b (r, in)``, rebuilt as LyCORIS does (``einsum("i j k l, j r, i p -> p r k l")``).

    >>> d = LoHaDelta(w1_a=torch.ones(4, 2), w1_b=torch.ones(2, 3), w2_a=torch.ones(4, 2), w2_b=torch.ones(2, 3))
    >>> d.delta_weight()[0, 0].item()
    4.0
    """

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    alpha: float | None = None
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    kind: str = field(default="loha", init=False)

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    @property
    def scale(self) -> float:
        return _scale(self.alpha, self.rank)

    def _factor(self, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        if t is not None:
            # With Tucker, LyCORIS stores both factors rank-first: a (r, out), b (r, in).
            return _tucker(t, a, b)
        return a.float().reshape(a.shape[0], -1) @ b.float().reshape(b.shape[0], -1)

    def delta_weight(self, weight_shape: tuple[int, ...] | torch.Size | None = None) -> torch.Tensor:
        w = self._factor(self.w1_a, self.w1_b, self.t1) * self._factor(self.w2_a, self.w2_b, self.t2)
        return _fit_to_shape(w * self.scale, weight_shape, "LoHa")

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from (t for t in (self.w1_a, self.w1_b, self.w2_a, self.w2_b, self.t1, self.t2) if t is not None)


@dataclass(eq=False)
class LoKrDelta:
    """LyCORIS LoKr: ``ΔW = scale · kron(w1, w2)``, each factor full or low-rank (``a @ b``).

    ``w2`` may also be Tucker (``t2`` with ``w2_a (r, out2)``, ``w2_b (r, in2)``). The scale is
    ``alpha / dim`` where ``dim`` is the rank of the decomposed factor, and 1 when neither factor
    is decomposed (LyCORIS ignores alpha for full-dim LoKr). Either factor may be the larger
    one. Convs may be stored flattened 2-D ``(out, in·kh·kw)``: pass ``weight_shape`` to get 4-D.

    >>> d = LoKrDelta(w1=torch.eye(2), w2=torch.ones(2, 3))
    >>> d.delta_weight().shape
    torch.Size([4, 6])
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
    def scale(self) -> float:
        return _scale(self.alpha, self.rank)

    def _w1(self) -> torch.Tensor:
        if self.w1 is not None:
            return self.w1.float()
        return self.w1_a.float() @ self.w1_b.float()

    def _w2(self) -> torch.Tensor:
        if self.w2 is not None:
            return self.w2.float()
        if self.t2 is not None:
            return _tucker(self.t2, self.w2_a, self.w2_b)
        return self.w2_a.float() @ self.w2_b.float().reshape(self.w2_b.shape[0], -1)

    def delta_weight(self, weight_shape: tuple[int, ...] | torch.Size | None = None) -> torch.Tensor:
        w1, w2 = self._w1(), self._w2()
        if w2.dim() == 4 and w1.dim() == 2:
            w1 = w1[:, :, None, None]
        return _fit_to_shape(torch.kron(w1, w2) * self.scale, weight_shape, "LoKr")

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from (
            t for t in (self.w1, self.w1_a, self.w1_b, self.w2, self.w2_a, self.w2_b, self.t2) if t is not None
        )


@dataclass(eq=False)
class FullDelta:
    """A full weight difference (LyCORIS ``diff``) with an optional bias difference (``diff_b``).

    >>> FullDelta(diff=torch.ones(2, 2)).delta_weight().sum().item()
    4.0
    """

    diff: torch.Tensor
    diff_b: torch.Tensor | None = None
    kind: str = field(default="full", init=False)
    alpha = None

    rank = None
    scale = 1.0

    def delta_weight(self, weight_shape: tuple[int, ...] | torch.Size | None = None) -> torch.Tensor:
        return _fit_to_shape(self.diff.float(), weight_shape, "full diff")

    def delta_bias(self) -> torch.Tensor | None:
        return None if self.diff_b is None else self.diff_b.float()

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from (t for t in (self.diff, self.diff_b) if t is not None)


InnerDelta = Union[LowRankDelta, LoHaDelta, LoKrDelta]


@dataclass(eq=False)
class DoRADelta:
    """DoRA (weight-decomposed) on top of a LoRA / LoHa / LoKr delta.

    ``W' = (W0 + ΔW) · m / ‖W0 + ΔW‖`` where the norm runs per output row (``magnitude`` of shape
    ``(out,)`` or ``(out, 1, …)``: PEFT's ``lora_magnitude_vector``, LyCORIS ``wd_on_out=True``)
    or per input column (``(1, in, …)``: A1111 and older LyCORIS). ``axis`` is detected from the
    shape by the reader (``"out"`` or ``"in"``); for a square weight a flat vector means ``"out"``.
    The effective delta is ``W' - W0``, so it needs the base weight; the blend weighs that delta
    linearly (ComfyUI's strength semantics: ``W0 + m·(W' - W0)``).
    """

    inner: InnerDelta
    magnitude: torch.Tensor
    axis: Literal["out", "in"] = "out"
    kind: str = field(default="dora", init=False)

    @property
    def rank(self) -> int | None:
        return self.inner.rank

    @property
    def alpha(self) -> float | None:
        return self.inner.alpha

    @property
    def scale(self) -> float:
        return self.inner.scale

    def delta_weight(
        self, weight_shape: tuple[int, ...] | torch.Size | None = None, base_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        if base_weight is None:
            raise ValueError(
                "a DoRA delta depends on the base weight: pass base_weight= (the runtime and fuse do this for you)"
            )
        w0 = base_weight.float()
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
        return _fit_to_shape(merged * (mag / norm) - w0, weight_shape, "DoRA")

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from self.inner.tensors()
        yield self.magnitude


Delta = Union[LowRankDelta, LoHaDelta, LoKrDelta, FullDelta, DoRADelta]


def map_tensors(delta: Delta, fn: Callable[[torch.Tensor], torch.Tensor]) -> Delta:
    """``delta`` with ``fn`` applied to each of its tensors: a new Delta when some tensor changed (the original
    is left untouched), ``delta`` itself when ``fn`` returned every tensor unchanged.

    >>> d = FullDelta(diff=torch.ones(2, 2))
    >>> map_tensors(d, lambda t: t.half()).diff.dtype, map_tensors(d, lambda t: t) is d
    (torch.float16, True)
    """
    changes = {}
    for f in fields(delta):
        if not f.init:
            continue
        value = getattr(delta, f.name)
        if isinstance(value, torch.Tensor):
            new = fn(value)
        elif is_dataclass(value):
            new = map_tensors(value, fn)
        else:
            continue
        if new is not value:
            changes[f.name] = new
    return replace(delta, **changes) if changes else delta


def deltas_to(deltas: Sequence[Delta], device: torch.device | str) -> list[Delta]:
    """The deltas with every tensor on ``device``, in as few transfers as the memory layout allows: tensors that
    are views of one buffer (a file read by ``load_adapter``) move as that one span of bytes, the others as one
    packed buffer per dtype; each tensor is then a view on the device. A LoRA is hundreds of small tensors, and
    each transfer to a GPU has a fixed cost. Tensors already there are kept as they are.

    >>> deltas_to([FullDelta(diff=torch.ones(2, 2))], "cpu")[0].diff.device.type
    'cpu'
    """
    device = torch.device(device)
    unique: dict[int, torch.Tensor] = {}  # a tensor shared by two deltas moves once
    for delta in deltas:
        for t in delta.tensors():
            if t.device != device:
                unique.setdefault(id(t), t)
    spans: dict[int, list[torch.Tensor]] = {}
    packed: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in unique.values():
        if t.is_contiguous() and t.numel():
            spans.setdefault(t.untyped_storage().data_ptr(), []).append(t)
        else:
            packed.setdefault(t.dtype, []).append(t)
    moved: dict[int, torch.Tensor] = {}  # id of a source tensor -> its copy on the device
    for group in spans.values():
        # byte range of the group in its storage, starting on an 8-byte boundary so that views stay aligned
        starts = [t.storage_offset() * t.element_size() for t in group]
        lo = min(starts) // 8 * 8
        hi = max(s + t.numel() * t.element_size() for s, t in zip(starts, group))
        used = sum(t.numel() * t.element_size() for t in group)
        if len(group) == 1 or hi - lo > 2 * used or any(8 % t.element_size() for t in group):
            for t in group:  # (a few views scattered over a big buffer: pack them instead)
                packed.setdefault(t.dtype, []).append(t)
            continue
        blob = torch.empty(0, dtype=torch.uint8, device=group[0].device).set_(
            group[0].untyped_storage(), lo, (hi - lo,)).to(device)
        for start, t in zip(starts, group):
            moved[id(t)] = blob[start - lo:start - lo + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
    for ts in packed.values():
        flat = torch.cat([t.reshape(-1) for t in ts]).to(device)
        for t, part in zip(ts, flat.split([t.numel() for t in ts])):
            moved[id(t)] = part.view(t.shape)
    return [map_tensors(d, lambda t: moved.get(id(t), t)) for d in deltas]


@dataclass(eq=False)
class Adapter:
    """One LoRA-family file in canonical form.

    ``deltas`` maps target keys (``unet.…``, ``text_encoder.…``, ``text_encoder_2.…``) to Deltas;
    ``metadata`` is the file's header metadata, kept and written back out; ``report`` accounts for
    every key of the source; ``format`` names the on-disk format it was read from.

    >>> a = Adapter("style", "sd1", {"unet.mid_block.attentions.0.proj_in": FullDelta(torch.zeros(4, 4))})
    >>> a.components()
    ['unet']
    """

    name: str
    family: str
    deltas: dict[str, Delta]
    metadata: dict[str, str] = field(default_factory=dict)
    report: LoadReport = field(default_factory=LoadReport)
    format: str = "canonical"
    # Set by lorablend.merge: per layer the rank used and the relative error against the exact sum.
    merge_report: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")

    def components(self) -> list[str]:
        """The model components this adapter touches, in a stable order."""
        order = {"unet": 0, "text_encoder": 1, "text_encoder_2": 2}
        return sorted({k.split(".", 1)[0] for k in self.deltas}, key=lambda c: (order.get(c, 9), c))

    def kinds(self) -> dict[str, int]:
        """How many layers of each Delta kind."""
        counts: dict[str, int] = {}
        for d in self.deltas.values():
            counts[d.kind] = counts.get(d.kind, 0) + 1
        return counts

    def num_parameters(self) -> int:
        return sum(t.numel() for d in self.deltas.values() for t in d.tensors())

    def __repr__(self) -> str:
        return (
            f"Adapter(name={self.name!r}, family={self.family!r}, format={self.format!r}, "
            f"layers={len(self.deltas)}, kinds={self.kinds()})"
        )
