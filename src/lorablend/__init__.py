"""lorablend: load, blend, merge, fuse and unfuse LoRA adapters on diffusers pipelines — SD1.x, SD2.x, SDXL,
Flux.1, SD3 / SD3.5, Qwen-Image, Wan 2.1 / 2.2, Flux.2, Z-Image and Chroma, on full-precision or quantized bases
(``adapter.FAMILIES`` lists every family we cover).

>>> import lorablend
>>> adapter = lorablend.load_adapter("style.safetensors")            # doctest: +SKIP
>>> print(adapter.report.summary())                                  # doctest: +SKIP
>>> merged = lorablend.merge([adapter, adapter], [0.5, 0.5])         # doctest: +SKIP
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .adapter import Adapter, DoRADelta, FullDelta, LoHaDelta, LoKrDelta, LowRankDelta
from .errors import LoraCompatibilityError, LoraFormatError
from . import merge  # the package, callable as merge.merge (lorablend.merge(adapters, weights))
from .merge import merge_with_report
from .report import KeyRecord, LoadReport

# Loaded on first use so that `import lorablend` costs little more than `import torch`: DiffusionPipeline imports
# diffusers and transformers (seconds, torch._dynamo included); the io names import the readers and writers,
# which need neither (tests/test_offline_imports.py keeps it so).
_LAZY = {
    "load_adapter": "lorablend.io",
    "save_adapter": "lorablend.io",
    "DiffusionPipeline": "lorablend.pipeline",
}

__all__ = [
    "Adapter",
    "LowRankDelta",
    "LoHaDelta",
    "LoKrDelta",
    "FullDelta",
    "DoRADelta",
    "LoadReport",
    "KeyRecord",
    "LoraFormatError",
    "LoraCompatibilityError",
    "merge",
    "merge_with_report",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lorablend' has no attribute {name!r}")
