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

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..kinds import KINDS, Delta, DeltaProblem, DoRADelta


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


_NOT_WEIGHTS = {"alpha", *DoRADelta.roles}


def _inner_delta(group: ModuleGroup, tensors: dict[str, torch.Tensor]) -> Delta:
    """The first kind of ``KINDS`` whose roles the module has builds it."""
    get = {role: tensors[key] for role, key in group.parts.items() if role not in _NOT_WEIGHTS}
    for role, t in get.items():  # every kind's shape arithmetic assumes factors with axes and values
        if t.dim() == 0 or t.numel() == 0:
            what = "a single number" if t.dim() == 0 else f"empty (shape {tuple(t.shape)})"
            raise DeltaProblem(f"{group.parts[role]!r} is {what}; a factor of a LoRA layer is a matrix of values")
    for kind in KINDS:
        if kind.roles & get.keys():
            stray = sorted(get.keys() - kind.roles - kind.extra_roles)
            if stray:  # never drop a tensor silently: a kind that cannot apply it refuses the module
                raise DeltaProblem(f"a {kind.kind} module with {stray} beside it, which a {kind.kind} delta cannot apply")
            return kind.from_roles(get, _alpha(group, tensors))
    raise DeltaProblem(f"no weights for this module, only {sorted(group.parts)}")


def build_delta(group: ModuleGroup, tensors: dict[str, torch.Tensor]) -> Delta:
    """The Delta of one module, or :class:`DeltaProblem` saying why there is none."""
    if group.refused:
        raise DeltaProblem(group.refused)
    inner = _inner_delta(group, tensors)
    mag_role = "magnitude" if "magnitude" in group.parts else "dora_scale" if "dora_scale" in group.parts else None
    if mag_role is None:
        return inner
    if not inner.takes_dora:
        raise DeltaProblem(f"DoRA on a {inner.kind} delta is not a format any trainer writes")
    magnitude = tensors[group.parts[mag_role]]
    return DoRADelta(inner=inner, magnitude=magnitude, axis=DoRADelta.axis_of(magnitude, mag_role == "magnitude"))


def delta_shape(delta: Delta) -> tuple[int, ...]:
    """The shape a Delta's ΔW has before any reshape (the kind's own ``shape``)."""
    return delta.shape


def shape_problem(delta: Delta, weight_shape: tuple[int, ...]) -> str | None:
    """None when the Delta fits a weight of ``weight_shape``; else the reason, in words (the kind's ``fit_problem``)."""
    return delta.fit_problem(weight_shape)
