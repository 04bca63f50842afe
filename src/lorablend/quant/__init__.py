"""LoRAs on quantized bases: bitsandbytes NF4 / FP4 / int8, GGUF, float8 (plain and scaled), torchao.

``formats`` says what a quantized layer is (size, dequantize, requantize, stored state) for each format; ``fuse``
fuses into one and puts its bytes back; ``convert`` quantizes a model's linears in place (the tiny test models,
``lorablend serve --quantize``). The runtime asks :func:`format_of` for every touched layer; a plain float layer
has none. Nothing here imports bitsandbytes, gguf, diffusers or torchao until a quantized layer is met.

>>> import torch
>>> format_of(torch.nn.Linear(2, 2)) is None
True
"""

from .formats import QuantFormat, Snapshot, format_of, formats, weight_shape

__all__ = ["QuantFormat", "Snapshot", "format_of", "formats", "weight_shape"]
