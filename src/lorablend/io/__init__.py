"""Reading and writing LoRA files: every common format in, diffusers or kohya format out.

>>> from lorablend.io import load_adapter
>>> adapter = load_adapter("style.safetensors")                      # doctest: +SKIP
>>> print(adapter.report.summary())                                  # doctest: +SKIP
"""

from __future__ import annotations

from .files import all_finite
from .load import load_adapter
from .write import save_adapter

__all__ = ["all_finite", "load_adapter", "save_adapter"]
