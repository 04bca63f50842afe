"""The exceptions lorablend raises on bad input. Both are ``ValueError`` so callers can catch either."""

from __future__ import annotations


class LoraFormatError(ValueError):
    """A file or state dict cannot be read as a LoRA: the message names the source and the problem.

    >>> raise LoraFormatError("x.safetensors: empty file (0 bytes); pass a LoRA .safetensors file")
    Traceback (most recent call last):
    ...
    lorablend.errors.LoraFormatError: x.safetensors: empty file (0 bytes); pass a LoRA .safetensors file
    """


class LoraCompatibilityError(ValueError):
    """An adapter does not fit a model (family, missing modules, shapes, NaN); nothing was changed."""
