"""Reading and writing LoRA files: every common format in, diffusers or kohya format out.

>>> from lorablend.io import load_adapter
>>> adapter = load_adapter("style.safetensors")                      # doctest: +SKIP
>>> print(adapter.report.summary())                                  # doctest: +SKIP
"""

from __future__ import annotations

from .load import load_adapter
from .write import save_adapter

__all__ = ["load_adapter", "save_adapter"]
