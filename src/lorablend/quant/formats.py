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

import torch
from torch import nn

from .base import QuantFormat, Snapshot  # (the formats import base, never this module)


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
