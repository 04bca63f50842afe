"""Moving Deltas between devices: every tensor of a delta mapped by one function, and a whole adapter's deltas
moved in as few transfers as its memory layout allows (a LoRA is hundreds of small tensors, and each transfer to
an accelerator has a fixed cost)."""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace
from typing import Callable, Sequence

import torch

from ..kinds import Delta, FullDelta


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


__all__ = ["deltas_to", "map_tensors"]
