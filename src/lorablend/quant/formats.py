"""What a quantized layer is, in one interface: each format (bitsandbytes NF4 / FP4 / int8, diffusers' GGUF linear,
float8 weights with or without a per-tensor scale, torchao) knows how to recognise its modules, size them (the
logical ``out × in``, not the packed storage), dequantize them to fp32, requantize a fused fp32 weight into its own
format, and hand over / put back its exact stored state (bytes and quant state) for a bit-exact unfuse.

The runtime asks :func:`format_of` once per touched module; a plain float ``Linear`` / ``Conv2d`` has no format
(``None``) and keeps the float path. Nothing here imports bitsandbytes, gguf, diffusers or torchao at import time:
a format recognises its modules by their weight's class name and imports its library only when it works on one.

>>> import torch
>>> format_of(torch.nn.Linear(4, 2)) is None
True
>>> weight_shape(torch.nn.Linear(4, 2))
(2, 4)
"""

from __future__ import annotations

import functools
import zlib
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


@functools.lru_cache(maxsize=1)
def formats() -> tuple[QuantFormat, ...]:
    """The known formats, in the order :func:`format_of` asks them (imported on first use: ``import lorablend``
    stays light).

    >>> [f.name for f in formats()]
    ['bnb-4bit', 'bnb-int8', 'gguf', 'fp8', 'torchao']
    """
    from .bnb import Bnb4bit, Bnb8bit
    from .fp8 import Fp8
    from .gguf import Gguf
    from .torchao import TorchAO

    return Bnb4bit(), Bnb8bit(), Gguf(), Fp8(), TorchAO()


def format_of(module: nn.Module) -> QuantFormat | None:
    """The quantized format of a module's weight, or None for a plain float weight (or no weight).

    >>> format_of(torch.nn.Conv2d(2, 2, 1)) is None
    True
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or (type(weight) in (torch.Tensor, nn.Parameter)
                                                 and weight.dtype.is_floating_point and weight.element_size() > 1):
        return None  # the common case, decided without asking every format
    return next((fmt for fmt in formats() if fmt.matches(module)), None)


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The logical shape of a module's weight: ``(out, in)`` for a quantized linear (bnb's packed NF4 bytes,
    a GGUF row of blocks), the weight's own shape otherwise.

    >>> weight_shape(torch.nn.Conv2d(3, 5, 3))
    (5, 3, 3, 3)
    """
    fmt = format_of(module)
    return fmt.shape(module) if fmt is not None else tuple(module.weight.shape)


def layer_seed(seed: int, key: str) -> int:
    """The seed of one layer's random rounding: the fuse's seed mixed with the layer's name (stable across runs
    and processes, unlike ``hash``), so each layer draws its own numbers and a fuse is reproducible.

    >>> layer_seed(0, "unet.a") == layer_seed(0, "unet.a") != layer_seed(1, "unet.a")
    True
    """
    return (zlib.crc32(key.encode()) ^ (int(seed) * 0x9E3779B1)) & 0x7FFF_FFFF_FFFF_FFFF


__all__ = ["QuantFormat", "Snapshot", "format_of", "formats", "layer_seed", "weight_shape"]
