"""GGUF weights: diffusers' ``GGUFLinear`` holding a ``GGUFParameter`` (the tensor's raw GGML blocks, ``(out, bytes per
row)`` uint8, and its ``quant_type``), as loaded by ``GGUFQuantizationConfig`` or ``from_single_file``.

Dequantizing and requantizing both go through gguf-py (``gguf.quants``, numpy, fp32), the reference code of the
format — the live fuse and the offline GGUF bake (:mod:`lorablend.offline.quantized_files`) share these two functions,
so they write the same bytes. gguf-py quantizes F32 / F16 / BF16 / Q8_0 / Q5_0 / Q5_1 / Q4_0 / Q4_1; a fused layer
of any other type (the K-quants Q6_K / Q5_K / Q4_K / Q3_K / Q2_K, the IQ types) is stored as **Q8_0** — a type
every GGUF loader reads, at least as precise as the K-quants it replaces; its untouched layers keep their types.

>>> from gguf import GGMLQuantizationType as T
>>> fused_quant_type(T.Q4_K).name, fused_quant_type(T.Q4_0).name
('Q8_0', 'Q4_0')
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .base import QuantFormat, RowFuse, Snapshot, type_name

# the types gguf-py can quantize: a fused layer keeps its own type exactly when it is one of these
_REQUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1")


def fused_quant_type(qtype: Any) -> Any:
    """The GGML type a fused tensor of type ``qtype`` is written in: its own where gguf-py quantizes it, else Q8_0."""
    from gguf import GGMLQuantizationType

    qtype = GGMLQuantizationType(int(qtype))
    return qtype if qtype.name in _REQUANTIZABLE else GGMLQuantizationType.Q8_0


def dequantize_gguf(raw: np.ndarray, qtype: Any) -> np.ndarray:
    """gguf-py's fp32 decoding of GGML blocks ``raw`` (uint8 rows, or the element array of a float type), as a NEW
    writable array: for F32 gguf-py hands back ``raw`` itself, which a fuse summing in place would overwrite (the
    layer's original bytes).

    >>> from gguf import GGMLQuantizationType as T
    >>> dequantize_gguf(quantize_gguf(np.ones((2, 32), np.float32), T.Q8_0), T.Q8_0).shape
    (2, 32)
    """
    from gguf.quants import dequantize

    out = np.ascontiguousarray(dequantize(raw, qtype), dtype=np.float32)
    return out.copy() if np.shares_memory(out, raw) or not out.flags.writeable else out


def quantize_gguf(weight: np.ndarray, qtype: Any) -> np.ndarray:
    """``weight`` (fp32, rows a multiple of the type's block) as GGML blocks of ``fused_quant_type(qtype)``."""
    from gguf.quants import quantize

    return quantize(np.ascontiguousarray(weight, dtype=np.float32), fused_quant_type(qtype))


class Gguf(QuantFormat):
    """diffusers' GGUF linear (any quant type diffusers reads)."""

    name = "gguf"

    def matches(self, module: nn.Module) -> bool:
        return type_name(module.weight) == "GGUFParameter"

    def label(self, module: nn.Module) -> str:
        from gguf import GGMLQuantizationType

        return f"gguf-{GGMLQuantizationType(int(module.weight.quant_type)).name}"

    def shape(self, module: nn.Module) -> tuple[int, ...]:
        return tuple(module.weight.quant_shape)

    def dequantize(self, module: nn.Module, snap: Snapshot) -> torch.Tensor:
        raw = snap.weight.detach().cpu().numpy()  # (GGUFParameter's data as a plain uint8 array)
        w = torch.from_numpy(dequantize_gguf(raw, snap.weight.quant_type))
        return w.to(snap.weight.device)

    def requantize(self, module: nn.Module, snap: Snapshot, fused: torch.Tensor, seed: int) -> None:
        from diffusers.quantizers.gguf.utils import GGUFParameter

        qtype = fused_quant_type(snap.weight.quant_type)
        raw = quantize_gguf(fused.cpu().numpy(), qtype)
        data = torch.from_numpy(raw).to(snap.weight.device)
        module._parameters["weight"] = GGUFParameter(data, requires_grad=False, quant_type=qtype)

    def row_fuse(self, module: nn.Module, snap: Snapshot, seed: int) -> RowFuse | None:
        # a GGUF row is whole blocks along the input dimension: any block of rows decodes and encodes alone
        return GgufRows(module, snap, seed) if snap.weight.dim() == 2 else None

    def stored_state(self, module: nn.Module) -> dict[str, Any]:
        w = module.weight
        return {"weight": torch.Tensor.as_subclass(w.detach(), torch.Tensor), "quant_type": int(w.quant_type)}

    def fused_rounding(self, module: nn.Module) -> float:
        # per element, relative to the block's absmax: half a step of its grid (Q8_0: d = absmax/127), a whole
        # step where the grid is asymmetric and the far end clamps (Q4_0 / Q5_0: -8..7 / -16..15 times
        # max/-8 or max/-16), plus the fp16 scale's own rounding
        name = fused_quant_type(module.weight.quant_type).name
        step = {"Q8_0": 0.5 / 127, "Q5_0": 1 / 16, "Q5_1": 1 / 31, "Q4_0": 1 / 8, "Q4_1": 1 / 15}.get(name, 2 ** -8)
        return step + 2 ** -10


class GgufRows(RowFuse):
    """A GGUF weight fused a block of rows at a time: gguf-py decodes the block's raw rows and encodes the fused
    rows into a new ``(out, bytes per row)`` array of the fused type (what ``Gguf.requantize`` writes, row by row)."""

    def __init__(self, module: nn.Module, snap: Snapshot, seed: int) -> None:
        super().__init__(module, snap, seed)
        self.raw = snap.weight.detach().cpu().numpy()
        self.qtype = fused_quant_type(snap.weight.quant_type)
        self.out: np.ndarray | None = None

    def read(self, start: int, stop: int) -> torch.Tensor:
        rows = dequantize_gguf(self.raw[start:stop], self.snap.weight.quant_type)
        return torch.from_numpy(rows).to(self.snap.weight.device)

    def write(self, start: int, rows: torch.Tensor) -> None:
        raw = quantize_gguf(rows.cpu().numpy(), self.qtype)
        if self.out is None:
            self.out = np.empty((self.raw.shape[0], *raw.shape[1:]), dtype=raw.dtype)
        self.out[start:start + raw.shape[0]] = raw

    def finish(self) -> None:
        from diffusers.quantizers.gguf.utils import GGUFParameter

        data = torch.from_numpy(self.out).to(self.snap.weight.device)
        self.module._parameters["weight"] = GGUFParameter(data, requires_grad=False, quant_type=self.qtype)


__all__ = ["Gguf", "GgufRows", "dequantize_gguf", "fused_quant_type", "quantize_gguf"]
