"""bitsandbytes layers: ``Linear4bit`` (NF4 / FP4, with or without double quant: a ``Params4bit`` weight of packed
nibbles and a ``QuantState``) and ``Linear8bitLt`` (an ``Int8Params`` weight with per-row scales ``SCB``).

A fused weight is requantized by bitsandbytes' own quantizers with the layer's settings (block size, quant type,
double quant, storage dtype; int8's row-wise absmax), into NEW parameter and state objects: the originals are kept
untouched for unfuse. On an AVX512-BF16 CPU bitsandbytes repacks a 4-bit weight and its quant state in place on
the first forward (``packing_format_for_cpu``: a nibble layout for its CPU kernel, absmax in bf16); a packed
weight is dequantized here from that layout with the same bf16 absmax its kernel uses, and the fused weight is
quantized in the standard layout with the original settings (the next forward packs it again).

>>> Bnb4bit().matches(torch.nn.Linear(2, 2))
False
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .base import QuantFormat, Snapshot, type_name


def _unpacked_state(weight: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """A CPU-packed 4-bit weight (``packing_format_for_cpu``) in bitsandbytes' standard nibble layout, with a
    shallow copy of its state that describes it (fp32 absmax in standard order; the original objects untouched)."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    probe = copy.copy(state)
    probe.original_nested = False  # only the nibbles are wanted from the inverse (its absmax re-nesting is lossy)
    qweight, _ = _convert_weight_packed_for_cpu_inverse(weight.detach(), probe)
    plain = copy.copy(state)
    plain.absmax = state.absmax.T.reshape(-1).float()  # (K/blocksize, N) bf16 -> the standard (N·K/blocksize,)
    plain.nested, plain.dtype, plain.packing_format_for_cpu = False, state.original_dtype, False
    return qweight, plain


class Bnb4bit(QuantFormat):
    """bitsandbytes ``Linear4bit``: NF4 or FP4, optionally double-quantized statistics."""

    name = "bnb-4bit"

    def matches(self, module: nn.Module) -> bool:
        return type_name(module.weight) == "Params4bit" and module.weight.quant_state is not None

    def label(self, module: nn.Module) -> str:
        state = module.weight.quant_state
        nested = getattr(state, "original_nested", state.nested) if _packed(state) else state.nested
        return f"bnb-{state.quant_type}" + ("-dq" if nested else "")

    def shape(self, module: nn.Module) -> tuple[int, ...]:
        return tuple(module.weight.quant_state.shape)

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        state = module.weight.quant_state
        return module.compute_dtype or getattr(state, "original_dtype", state.dtype)

    def snapshot(self, module: nn.Module) -> Snapshot:
        weight = module._parameters["weight"]
        return Snapshot(weight, {"data": weight.data, "quant_state": weight.quant_state})

    def dequantize(self, module: nn.Module, snap: Snapshot) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        data, state = snap.extra["data"], snap.extra["quant_state"]
        if _packed(state):
            data, state = _unpacked_state(data, state)
        return dequantize_4bit(data, state).float().contiguous()

    def requantize(self, module: nn.Module, snap: Snapshot, fused: torch.Tensor, seed: int) -> None:
        from bitsandbytes.functional import quantize_4bit
        from bitsandbytes.nn import Params4bit

        old, state = snap.weight, snap.extra["quant_state"]
        packed = _packed(state)
        dtype = state.original_dtype if packed else state.dtype
        nested = state.original_nested if packed else state.nested
        storage = getattr(state, "original_storage_type", None) or old.quant_storage
        data, new_state = quantize_4bit(fused.to(dtype), blocksize=state.blocksize, compress_statistics=nested,
                                        quant_type=state.quant_type, quant_storage=storage)
        module._parameters["weight"] = Params4bit(
            data, requires_grad=False, quant_state=new_state, blocksize=state.blocksize, compress_statistics=nested,
            quant_type=state.quant_type, quant_storage=storage, module=module, bnb_quantized=True)

    def restore(self, module: nn.Module, snap: Snapshot) -> None:
        weight = snap.weight
        weight.data, weight.quant_state = snap.extra["data"], snap.extra["quant_state"]
        module._parameters["weight"] = weight
        if hasattr(module, "quant_state"):
            module.quant_state = weight.quant_state

    def stored_state(self, module: nn.Module) -> dict[str, Any]:
        state = module.weight.quant_state
        out: dict[str, Any] = {"weight": module.weight.detach()}
        for name, value in sorted(vars(state).items()):
            if name == "state2" and value is not None:
                out.update({f"state2.{k}": v for k, v in sorted(vars(value).items())})
            else:
                out[name] = value
        return out

    def fused_rounding(self, module: nn.Module) -> float:
        # half the widest gap of the 16-level code (NF4: -1.0 .. -0.70, FP4: 0.67 .. 1.0) of the block absmax. With
        # double quant the absmax itself is 8-bit coded: on real-size layers (thousands of blocks) that adds ~1%
        # (measured 0.155 worst on 256 x 256); on a layer of a few blocks it can add tens of percent (bitsandbytes'
        # own rounding, which a fuse reproduces exactly: tests compare the bytes with its quantizer's)
        return 0.17


def _packed(state: Any) -> bool:
    return bool(getattr(state, "packing_format_for_cpu", False))


class Bnb8bit(QuantFormat):
    """bitsandbytes ``Linear8bitLt`` (LLM.int8 inference weights: int8 rows and their absmax ``SCB``)."""

    name = "bnb-int8"

    def matches(self, module: nn.Module) -> bool:
        return type_name(module.weight) == "Int8Params" and module.weight.dtype == torch.int8

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        return torch.float16  # bitsandbytes' int8 matmul returns the input's dtype; the hook rebuilds to match it

    def _scales(self, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        state, weight = module.state, module.weight
        if getattr(state, "CB", None) is not None:
            return state.CB, state.SCB
        return weight.data, weight.SCB

    def snapshot(self, module: nn.Module) -> Snapshot:
        weight, state = module._parameters["weight"], module.state
        return Snapshot(weight, {"data": weight.data, "CB": weight.CB, "SCB": weight.SCB,
                                 "state.CB": state.CB, "state.SCB": state.SCB})

    def dequantize(self, module: nn.Module, snap: Snapshot) -> torch.Tensor:
        extra = snap.extra
        scb = extra["state.SCB"] if extra["state.SCB"] is not None else extra["SCB"]
        return extra["data"].float() * (scb.float() / 127.0)[:, None]

    def requantize(self, module: nn.Module, snap: Snapshot, fused: torch.Tensor, seed: int) -> None:
        from bitsandbytes.functional import int8_vectorwise_quant
        from bitsandbytes.nn import Int8Params

        cb, scb, _ = int8_vectorwise_quant(fused.to(torch.float16))  # what Int8Params does on load
        weight = Int8Params(cb, requires_grad=False, has_fp16_weights=False)
        weight.CB, weight.SCB = cb, scb
        module._parameters["weight"] = weight
        module.state.CB = module.state.SCB = None  # the next forward moves them from the weight, as on load

    def restore(self, module: nn.Module, snap: Snapshot) -> None:
        weight, extra = snap.weight, snap.extra
        weight.data, weight.CB, weight.SCB = extra["data"], extra["CB"], extra["SCB"]
        module._parameters["weight"] = weight
        module.state.CB, module.state.SCB = extra["state.CB"], extra["state.SCB"]

    def stored_state(self, module: nn.Module) -> dict[str, Any]:
        cb, scb = self._scales(module)
        return {"weight": module.weight.detach(), "CB": cb, "SCB": scb}

    def fused_rounding(self, module: nn.Module) -> float:
        return 0.5 / 127.0 + 2 ** -10  # half an int8 step of the row's absmax, after bitsandbytes' cast to fp16


__all__ = ["Bnb4bit", "Bnb8bit"]
