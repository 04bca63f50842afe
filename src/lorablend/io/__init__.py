"""Reading and writing LoRA files: every common format in, diffusers or kohya format out.

>>> from lorablend.io import load_adapter
>>> adapter = load_adapter("style.safetensors")                      # doctest: +SKIP
>>> print(adapter.report.summary())                                  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from .load import load_adapter

try:
    from .write import save_adapter
except ModuleNotFoundError as _missing:  # the writer is built beside the readers; it may not exist yet
    if _missing.name != f"{__name__}.write":
        raise

    def save_adapter(*args: Any, **kwargs: Any) -> Any:
        """Write an Adapter as a diffusers or kohya file (not available in this build)."""
        raise NotImplementedError("lorablend.io.write is missing from this build: save_adapter is unavailable")


__all__ = ["load_adapter", "save_adapter"]
