"""What every quantized format is: ``QuantFormat`` (the questions a format answers for its modules), ``Snapshot``
(a layer's exact stored state before a fuse) and ``type_name`` (how a format recognises its tensor class without
importing its library). The format modules (``bnb``, ``fp8``, ``gguf``, ``torchao``) build on this; ``formats``
lists them.

>>> type_name(torch.zeros(1))
'Tensor'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def type_name(tensor: Any) -> str:
    """The class name of a weight (how a format recognises its tensor subclass without importing its library).

    >>> type_name(torch.zeros(1))
    'Tensor'
    """
    return type(tensor).__name__


@dataclass
class Snapshot:
    """The exact stored state of one quantized layer before a fuse: the objects themselves (the original weight
    parameter, its quant-state tensors and attributes), never copies of them. A fuse builds NEW objects for the
    fused weight and never writes into these, so putting them back is bit for bit whatever happened in between."""

    weight: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)


class QuantFormat:
    """One quantized storage format. Subclasses answer every question for their modules; callers never branch on
    the format. ``name`` is what reports and errors say (``"bnb-nf4"``, ``"gguf-Q8_0"``, ``"fp8-e4m3fn"`` …)."""

    name = "quantized"

    def matches(self, module: nn.Module) -> bool:
        """True when ``module`` stores its weight in this format."""
        raise NotImplementedError

    def label(self, module: nn.Module) -> str:
        """The format of this module's weight, precisely (the quant type, the float8 flavour)."""
        return self.name

    def shape(self, module: nn.Module) -> tuple[int, ...]:
        """The logical weight shape (``out, in``) of the module, whatever the packed storage looks like."""
        return tuple(module.weight.shape)

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        """The dtype the module's forward computes and returns in (the dtype of a LoRA term added to it)."""
        return getattr(module, "compute_dtype", None) or torch.float32

    def snapshot(self, module: nn.Module) -> Snapshot:
        """The module's stored state as it is now (references, no copies)."""
        return Snapshot(module._parameters["weight"])

    def dequantize(self, module: nn.Module, snap: Snapshot) -> torch.Tensor:
        """A NEW contiguous fp32 ``(out, in)`` tensor: the weight stored in ``snap`` as its format decodes it."""
        raise NotImplementedError

    def requantize(self, module: nn.Module, snap: Snapshot, fused: torch.Tensor, seed: int) -> None:
        """Store ``fused`` (fp32, logical shape) into ``module`` in the format of ``snap`` (same quant type, block
        size, statistics layout), as new objects: ``snap`` stays untouched. ``seed`` drives any rounding that
        draws random numbers (fp8's stochastic rounding), so a fuse is reproducible."""
        raise NotImplementedError

    def restore(self, module: nn.Module, snap: Snapshot) -> None:
        """Put the stored state of ``snap`` back on ``module`` (rebinding, no arithmetic)."""
        module._parameters["weight"] = snap.weight

    def stored_state(self, module: nn.Module) -> dict[str, Any]:
        """Everything the format stores for the module's weight, by name: tensors (bytes, scales, quant-state
        tensors) and plain values (block size, quant type, flags). What a bit-exact comparison checks (tensors
        with ``torch.equal``, values with ``==``)."""
        return {"weight": module.weight.detach()}

    def fused_rounding(self, module: nn.Module) -> float:
        """A bound, relative to the largest weight magnitude, of what requantizing a fused weight may round away
        (per element). Tests and the README state it per format."""
        return 0.0

    def row_fuse(self, module: nn.Module, snap: Snapshot, seed: int) -> "RowFuse | None":
        """A :class:`RowFuse` that dequantizes and requantizes ``snap``'s weight a block of rows at a time (what
        keeps a fuse's memory near one layer's quantized size), or None where the format is not row-local (the
        fuse then dequantizes the whole layer at once)."""
        return None


class RowFuse:
    """Dequantize / requantize one layer's weight by blocks of rows, for a fuse whose memory must stay small: the
    fuse reads rows ``[a, b)`` as fp32 (:meth:`read`), adds the LoRA rows, and hands them to :meth:`write`, which
    quantizes them into NEW storage; :meth:`finish` installs that storage on the module (the snapshot's objects
    are never written). ``step``: row counts a block must be a multiple of (a block of quantization must not
    straddle two reads). ``needs_peak``: the format's scale depends on the whole fused weight (scaled fp8), so
    the fuse first shows it every block (:meth:`observe`) and reads them all again to write. The bytes are the
    ones the format's whole-layer ``requantize`` writes (tests compare them with ``torch.equal``)."""

    step = 1
    needs_peak = False

    def __init__(self, module: nn.Module, snap: Snapshot, seed: int) -> None:
        self.module, self.snap, self.seed = module, snap, seed

    def read(self, start: int, stop: int) -> torch.Tensor:
        """A NEW contiguous fp32 tensor: rows ``[start, stop)`` of the stored weight, decoded."""
        raise NotImplementedError

    def observe(self, rows: torch.Tensor) -> None:
        """See a block of the fused weight before any is written (only asked when ``needs_peak``)."""

    def write(self, start: int, rows: torch.Tensor) -> None:
        """Quantize the fused ``rows`` (fp32, this call's own buffer: it may be changed in place) into the new
        storage at row ``start``; blocks come in order."""
        raise NotImplementedError

    def finish(self) -> None:
        """Install the new storage (written by every block) on the module."""
        raise NotImplementedError


__all__ = ["QuantFormat", "RowFuse", "Snapshot", "type_name"]
