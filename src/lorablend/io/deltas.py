"""From one module's tensors (already sorted into roles by a reader) to a Delta, and the shape check.

Readers turn their key spellings into *roles*: ``down``, ``up``, ``mid`` (Tucker), ``alpha``, ``magnitude``
(PEFT DoRA), ``dora_scale`` (kohya/LyCORIS DoRA), ``hada_w1_a`` … ``hada_t2``, ``lokr_w1`` … ``lokr_t2``,
``diff``, ``diff_b``. The algorithm of a module is read from the roles it has, module by module (one LyCORIS
file may mix algorithms).

DoRA axis, decided from the tensor and where it came from (documented once, here):

* PEFT ``lora_magnitude_vector`` is always per output row: ``(out,)`` for linears and ``(1, out, 1, 1)`` for
  convs (PEFT's conv layout); both mean ``"out"``.
* kohya / LyCORIS ``dora_scale``: ``(out, 1, …)`` or ``(out,)`` means per output row (``"out"``, LyCORIS
  ``wd_on_out=True``); ``(1, in, …)`` means per input column (``"in"``, A1111 and older LyCORIS).

>>> import torch
>>> group = ModuleGroup("m", {"down": "m.d", "up": "m.u"})
>>> d = build_delta(group, {"m.d": torch.ones(2, 3), "m.u": torch.ones(4, 2)})
>>> delta_shape(d), shape_problem(d, (4, 3)) is None
((4, 3), True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..adapter import Delta, DoRADelta, FullDelta, LoHaDelta, LoKrDelta, LowRankDelta

_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


class DeltaProblem(ValueError):
    """Why one module's tensors do not make a Delta (reported as unsupported for that module's keys)."""


@dataclass
class ModuleGroup:
    """The tensors one source module contributes: ``parts`` maps role -> source key.

    ``name`` is how the file names the module (for messages); ``lookup`` how to find its target key
    (``("kohya", flat_name)`` or ``("dotted", component_or_None, path)``); ``refused`` is set when the
    module uses an algorithm we recognise but do not apply (OFT, IA3, GLoRA, …), with the reason.
    """

    name: str
    parts: dict[str, str]
    lookup: tuple = ()
    refused: str | None = None
    magnitude_source: Literal["peft", "kohya"] = "kohya"
    alpha: float | None = None  # from file metadata (diffusers lora_adapter_metadata) when no alpha key
    keys: list[str] = field(default_factory=list)

    def all_keys(self) -> list[str]:
        return self.keys or list(self.parts.values())


def _alpha(group: ModuleGroup, tensors: dict[str, torch.Tensor]) -> float | None:
    key = group.parts.get("alpha")
    if key is None:
        return group.alpha
    t = tensors[key]
    if t.numel() != 1:
        raise DeltaProblem(f"alpha {key!r} has {t.numel()} values; an alpha is one number")
    return float(t.double().item())  # fp64 keeps an alpha such as 0.1 exact as written


def _need(group: ModuleGroup, tensors: dict[str, torch.Tensor], *roles: str) -> list[torch.Tensor]:
    missing = [r for r in roles if r not in group.parts]
    if missing:
        have = sorted(r for r in group.parts if r != "alpha")
        raise DeltaProblem(f"incomplete module: has {have} but no {missing}")
    return [tensors[group.parts[r]] for r in roles]


def _inner_delta(group: ModuleGroup, tensors: dict[str, torch.Tensor]) -> Delta:
    roles = set(group.parts)
    alpha = _alpha(group, tensors)
    if roles & set(_LOHA) or {"hada_t1", "hada_t2"} & roles:
        w1_a, w1_b, w2_a, w2_b = _need(group, tensors, *_LOHA)
        t1 = tensors[group.parts["hada_t1"]] if "hada_t1" in roles else None
        t2 = tensors[group.parts["hada_t2"]] if "hada_t2" in roles else None
        if (t1 is None) != (t2 is None):
            raise DeltaProblem("LoHa with only one of hada_t1 / hada_t2: Tucker LoHa needs both")
        return LoHaDelta(w1_a=w1_a, w1_b=w1_b, w2_a=w2_a, w2_b=w2_b, alpha=alpha, t1=t1, t2=t2)
    if roles & set(_LOKR):
        get = {r: tensors[group.parts[r]] for r in _LOKR if r in roles}
        try:
            return LoKrDelta(
                w1=get.get("lokr_w1"), w1_a=get.get("lokr_w1_a"), w1_b=get.get("lokr_w1_b"),
                w2=get.get("lokr_w2"), w2_a=get.get("lokr_w2_a"), w2_b=get.get("lokr_w2_b"),
                t2=get.get("lokr_t2"), alpha=alpha,
            )
        except ValueError as e:
            raise DeltaProblem(f"incomplete LoKr module: {e}") from None
    if "down" in roles or "up" in roles:
        down, up = _need(group, tensors, "down", "up")
        mid = tensors[group.parts["mid"]] if "mid" in roles else None
        if down.dim() not in (2, 4) or up.dim() not in (2, 4):
            raise DeltaProblem(f"LoRA factors must be 2-D or 4-D, got down {tuple(down.shape)} and up {tuple(up.shape)}")
        if up.reshape(up.shape[0], -1).shape[1] != down.shape[0] and mid is None:
            raise DeltaProblem(f"LoRA factors do not chain: up {tuple(up.shape)} and down {tuple(down.shape)}")
        return LowRankDelta(down=down, up=up, alpha=alpha, mid=mid)
    if "diff" in roles:
        diff_b = tensors[group.parts["diff_b"]] if "diff_b" in roles else None
        return FullDelta(diff=tensors[group.parts["diff"]], diff_b=diff_b)
    if "diff_b" in roles:
        raise DeltaProblem("a bias difference (diff_b) without a weight difference (diff) is not applied")
    raise DeltaProblem(f"no weights for this module, only {sorted(roles)}")


def build_delta(group: ModuleGroup, tensors: dict[str, torch.Tensor]) -> Delta:
    """The Delta of one module, or :class:`DeltaProblem` saying why there is none."""
    if group.refused:
        raise DeltaProblem(group.refused)
    inner = _inner_delta(group, tensors)
    mag_role = "magnitude" if "magnitude" in group.parts else "dora_scale" if "dora_scale" in group.parts else None
    if mag_role is None:
        return inner
    if isinstance(inner, FullDelta):
        raise DeltaProblem("DoRA on a full weight difference is not a format any trainer writes")
    magnitude = tensors[group.parts[mag_role]]
    axis = _dora_axis(magnitude, mag_role == "magnitude")
    return DoRADelta(inner=inner, magnitude=magnitude, axis=axis)


def _dora_axis(magnitude: torch.Tensor, from_peft: bool) -> Literal["out", "in"]:
    if from_peft or magnitude.dim() <= 1:
        return "out"
    if magnitude.shape[0] == 1 and math.prod(magnitude.shape[2:]) == 1 and magnitude.shape[1] > 1:
        return "in"
    if math.prod(magnitude.shape[1:]) == 1:
        return "out"
    raise DeltaProblem(f"dora_scale of shape {tuple(magnitude.shape)} is neither per output row nor per input column")


def delta_shape(delta: Delta) -> tuple[int, ...]:
    """The shape a Delta's ΔW has before any reshape, computed from factor shapes only (no dense product)."""
    if isinstance(delta, DoRADelta):
        return delta_shape(delta.inner)
    if isinstance(delta, LowRankDelta):
        return tuple(delta.natural_shape())
    if isinstance(delta, FullDelta):
        return tuple(delta.diff.shape)
    if isinstance(delta, LoHaDelta):
        if delta.t1 is not None:
            return (int(delta.w1_a.shape[1]), int(delta.w1_b.shape[1]), *delta.t1.shape[2:])
        return (int(delta.w1_a.shape[0]), int(delta.w1_b.reshape(delta.w1_b.shape[0], -1).shape[1]))
    if isinstance(delta, LoKrDelta):
        w1 = tuple(delta.w1.shape) if delta.w1 is not None else (int(delta.w1_a.shape[0]), int(delta.w1_b.shape[1]))
        if delta.w2 is not None:
            w2 = tuple(delta.w2.shape)
        elif delta.t2 is not None:
            w2 = (int(delta.w2_a.shape[1]), int(delta.w2_b.shape[1]), *delta.t2.shape[2:])
        else:
            w2 = (int(delta.w2_a.shape[0]), int(delta.w2_b.reshape(delta.w2_b.shape[0], -1).shape[1]))
        if len(w2) == 4 and len(w1) == 2:
            w1 = (*w1, 1, 1)
        return tuple(a * b for a, b in zip(w1, w2))
    raise TypeError(f"unknown Delta kind {type(delta).__name__}")


def shape_problem(delta: Delta, weight_shape: tuple[int, ...]) -> str | None:
    """None when the Delta fits a weight of ``weight_shape``; else the reason, in words.

    A fit is the same shape, or the same output width and element count: a conv stored flattened
    ``(out, in·kh·kw)`` (LyCORIS LoKr), or a 1×1 conv given 2-D factors (and the reverse).
    """
    weight_shape = tuple(int(s) for s in weight_shape)
    natural = delta_shape(delta)
    if natural != weight_shape and not (
        natural[0] == weight_shape[0] and math.prod(natural) == math.prod(weight_shape)
    ):
        return f"its ΔW is {natural} but the module's weight is {weight_shape}: made for another model"
    if isinstance(delta, DoRADelta):
        want = weight_shape[0] if delta.axis == "out" else weight_shape[1]
        if delta.magnitude.numel() != want:
            return (f"its DoRA magnitude has {delta.magnitude.numel()} values but the module has {want} "
                    f"{'output rows' if delta.axis == 'out' else 'input columns'}")
    if isinstance(delta, FullDelta) and delta.diff_b is not None and delta.diff_b.numel() != weight_shape[0]:
        return f"its bias difference has {delta.diff_b.numel()} values but the module has {weight_shape[0]} outputs"
    return None
