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

from .base import QuantFormat, RowFuse, Snapshot, type_name


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

    def row_fuse(self, module: nn.Module, snap: Snapshot, seed: int) -> RowFuse | None:
        # rows hold whole blocks only when the width is a multiple of the block size (every real model: 3072 / 64).
        # Else bitsandbytes' CPU dequantize kernel counts blocks per row while its quantizer counts them over the
        # flattened weight, so a block of rows would not decode as the whole layer does: the whole-layer path.
        shape = snap.extra["quant_state"].shape
        return Bnb4bitRows(module, snap, seed) if len(shape) == 2 and shape[1] % snap.extra[
            "quant_state"].blocksize == 0 else None

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

    def row_fuse(self, module: nn.Module, snap: Snapshot, seed: int) -> RowFuse | None:
        return Int8Rows(module, snap, seed)  # (row-wise absmax: every row quantizes alone)

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


class Bnb4bitRows(RowFuse):
    """A 4-bit weight fused a block of rows at a time. Each row holds whole quantization blocks, so bitsandbytes'
    ``quantize_4bit`` on a block of rows gives the packed bytes and fp32 absmax of those blocks; with double
    quant the absmax of all blocks is compressed at the end, as ``quantize_4bit`` does (mean offset, blockwise
    8-bit coding of 256) — the same bytes and state as quantizing the whole fused weight at once."""

    def __init__(self, module: nn.Module, snap: Snapshot, seed: int) -> None:
        from bitsandbytes.functional import dequantize_blockwise

        super().__init__(module, snap, seed)
        data, state = snap.extra["data"], snap.extra["quant_state"]
        packed = _packed(state)
        self.dtype = state.original_dtype if packed else state.dtype
        self.nested = state.original_nested if packed else state.nested
        self.storage = getattr(state, "original_storage_type", None) or snap.weight.quant_storage
        if packed:
            data, state = _unpacked_state(data, state)
        self.nibbles = data.reshape(-1).view(torch.uint8)
        absmax = state.absmax
        if state.nested:
            absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset
        self.absmax, self.state = absmax.float(), state
        self.width, blocksize = int(state.shape[1]), int(state.blocksize)
        n = int(state.shape[0]) * self.width
        self.new_nibbles = torch.empty((n + 1) // 2, dtype=torch.uint8, device=data.device)
        self.new_absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=data.device)

    def _span(self, start: int, stop: int) -> tuple[slice, slice]:
        """The packed bytes and the absmax blocks of rows ``[start, stop)``."""
        a, b, size = start * self.width, stop * self.width, int(self.state.blocksize)
        return slice(a // 2, (b + 1) // 2), slice(a // size, -(-b // size))

    def read(self, start: int, stop: int) -> torch.Tensor:
        from bitsandbytes.functional import QuantState, dequantize_4bit

        nibbles, blocks = self._span(start, stop)
        s = self.state
        # (copies: bitsandbytes' CPU kernel reads a sliced view from the start of its storage)
        part = QuantState(absmax=self.absmax[blocks].clone(), shape=torch.Size((stop - start, self.width)), dtype=s.dtype,
                          blocksize=s.blocksize, code=s.code, quant_type=s.quant_type)
        return dequantize_4bit(self.nibbles[nibbles].clone().reshape(-1, 1), part).float().contiguous()

    def write(self, start: int, rows: torch.Tensor) -> None:
        from bitsandbytes.functional import quantize_4bit

        nibbles, blocks = self._span(start, start + rows.shape[0])
        data, state = quantize_4bit(rows.to(self.dtype), blocksize=self.state.blocksize, quant_type=self.state.quant_type)
        self.new_nibbles[nibbles] = data.reshape(-1)
        self.new_absmax[blocks] = state.absmax

    def finish(self) -> None:
        from bitsandbytes.functional import QuantState, get_4bit_type, quantize_blockwise
        from bitsandbytes.nn import Params4bit

        s, absmax = self.state, self.new_absmax
        shape = torch.Size((int(s.shape[0]), self.width))
        code = get_4bit_type(s.quant_type, device=absmax.device)
        if self.nested:  # quantize_4bit's compress_statistics, on the absmax of every block
            offset = absmax.mean()
            qabsmax, state2 = quantize_blockwise(absmax - offset, blocksize=256)
            state = QuantState(absmax=qabsmax, shape=shape, dtype=self.dtype, blocksize=s.blocksize, code=code,
                               quant_type=s.quant_type, offset=offset, state2=state2)
        else:
            state = QuantState(absmax=absmax, shape=shape, dtype=self.dtype, blocksize=s.blocksize, code=code,
                               quant_type=s.quant_type)
        data = self.new_nibbles.view(self.storage).reshape(-1, 1)
        self.module._parameters["weight"] = Params4bit(
            data, requires_grad=False, quant_state=state, blocksize=s.blocksize, compress_statistics=self.nested,
            quant_type=s.quant_type, quant_storage=self.storage, module=self.module, bnb_quantized=True)


class Int8Rows(RowFuse):
    """An int8 weight fused a block of rows at a time: each row is scaled by its own absmax (``SCB``), so
    bitsandbytes' row-wise quantizer on a block gives those rows' bytes and scales."""

    def __init__(self, module: nn.Module, snap: Snapshot, seed: int) -> None:
        super().__init__(module, snap, seed)
        extra = snap.extra
        self.data = extra["data"]
        self.scb = extra["state.SCB"] if extra["state.SCB"] is not None else extra["SCB"]
        self.cb = torch.empty(self.data.shape, dtype=torch.int8, device=self.data.device)
        self.new_scb: torch.Tensor | None = None

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.data[start:stop].float() * (self.scb[start:stop].float() / 127.0)[:, None]

    def write(self, start: int, rows: torch.Tensor) -> None:
        from bitsandbytes.functional import int8_vectorwise_quant

        cb, scb, _ = int8_vectorwise_quant(rows.to(torch.float16))
        if self.new_scb is None:
            self.new_scb = torch.empty(self.data.shape[0], dtype=scb.dtype, device=scb.device)
        self.cb[start:start + cb.shape[0]] = cb
        self.new_scb[start:start + cb.shape[0]] = scb

    def finish(self) -> None:
        from bitsandbytes.nn import Int8Params

        weight = Int8Params(self.cb, requires_grad=False, has_fp16_weights=False)
        weight.CB, weight.SCB = self.cb, self.new_scb
        self.module._parameters["weight"] = weight
        self.module.state.CB = self.module.state.SCB = None  # the next forward moves them from the weight


__all__ = ["Bnb4bit", "Bnb4bitRows", "Bnb8bit", "Int8Rows"]
