"""torchao quantized weights (``quantize_(model, Int8WeightOnlyConfig())`` → ``Int8Tensor``,
``Float8WeightOnlyConfig()`` → ``Float8Tensor``): tensor subclasses with the logical shape and dtype, which
``dequantize()`` themselves.

A fused weight is requantized by torchao itself with the weight-only config of its class, and checked to come out
in the same layout (block size, dtype); a weight torchao made some other way (activation quantization, another
granularity) is refused with what to do instead, before anything changes.

>>> TorchAO().matches(torch.nn.Linear(2, 2))
False
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import QuantFormat, RowFuse, Snapshot

_CONFIGS = {"Int8Tensor": "Int8WeightOnlyConfig", "Float8Tensor": "Float8WeightOnlyConfig"}


def _layout(weight: torch.Tensor) -> dict[str, Any]:
    names, meta = weight.__tensor_flatten__()
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in meta.items()
            if not k.startswith("act_") and not isinstance(v, torch.Tensor)}


class TorchAO(QuantFormat):
    """A torchao weight-only quantized tensor (int8 or float8)."""

    name = "torchao"

    def matches(self, module: nn.Module) -> bool:
        weight = module.weight
        return type(weight).__module__.startswith("torchao") and hasattr(weight, "dequantize")

    def label(self, module: nn.Module) -> str:
        return f"torchao-{type(module.weight).__name__}"

    def compute_dtype(self, module: nn.Module) -> torch.dtype:
        return module.weight.dtype  # the logical dtype the subclass reports and computes in

    def dequantize(self, module: nn.Module, snap: Snapshot) -> torch.Tensor:
        return snap.weight.dequantize().float().contiguous()

    def check(self, module: nn.Module) -> str | None:
        """Why this weight cannot be requantized after a fuse (None: it can)."""
        weight = module.weight
        meta = weight.__tensor_flatten__()[1]
        if type(weight).__name__ not in _CONFIGS or meta.get("act_quant_kwargs") is not None:
            return (f"a torchao {type(weight).__name__} with activation quantization or an unknown layout is not "
                    "requantized after a fuse; use the unfused runtime (set_adapters) on it")
        return None

    def requantize(self, module: nn.Module, snap: Snapshot, fused: torch.Tensor, seed: int) -> None:
        problem = self.check(module)
        if problem:
            raise ValueError(problem)
        _install(module, _quantized(snap.weight, fused))

    def row_fuse(self, module: nn.Module, snap: Snapshot, seed: int) -> RowFuse | None:
        # weight-only int8 / float8 keep one scale per row (block size [1, in]): a block of rows quantizes alone
        weight = snap.weight
        per_row = _layout(weight).get("block_size") == [1, weight.shape[-1]] and weight.dim() == 2
        return TorchAORows(module, snap, seed) if per_row and self.check(module) is None else None

    def stored_state(self, module: nn.Module) -> dict[str, Any]:
        weight = module.weight
        names, meta = weight.__tensor_flatten__()
        out: dict[str, Any] = {name: getattr(weight, name) for name in names}
        out.update({k: v for k, v in meta.items() if not isinstance(v, torch.Tensor)})
        return out

    def fused_rounding(self, module: nn.Module) -> float:
        return 0.5 / 127 + 2 ** -8 if type(module.weight).__name__ == "Int8Tensor" else 2.0 ** -4


def _quantized(old: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
    """``fused`` (fp32 rows) quantized by torchao with the weight-only config of ``old``'s class, checked to come out
    in ``old``'s layout (``ValueError`` otherwise, before anything is installed)."""
    import torchao.quantization as tq

    shell = nn.Linear(fused.shape[1], fused.shape[0], bias=False, device=fused.device, dtype=old.dtype)
    with torch.no_grad():
        shell.weight.copy_(fused)
    tq.quantize_(shell, getattr(tq, _CONFIGS[type(old).__name__])())
    new = shell.weight
    vars(shell).clear()  # (quantize_ leaves the shell in a reference cycle: without this, its memory waits for the gc)
    if type(new) is not type(old) or _layout(new) != _layout(old):
        raise ValueError(f"torchao requantized this weight as {type(new).__name__} {_layout(new)}, not as the "
                         f"stored {type(old).__name__} {_layout(old)}: use the unfused runtime on it")
    return new


def _install(module: nn.Module, new: torch.Tensor) -> None:
    module._parameters["weight"] = new if isinstance(new, nn.Parameter) else nn.Parameter(new, requires_grad=False)


class TorchAORows(RowFuse):
    """A per-row torchao weight fused a block of rows at a time: each block is dequantized from its rows (a slice
    of the subclass), and quantized by torchao as a weight of its own; the blocks' inner tensors (``qdata``,
    ``scale``, ``zero_point`` …: one row each per weight row) are copied into full-size tensors, from which the
    new weight is rebuilt with torchao's own ``__tensor_unflatten__``."""

    def __init__(self, module: nn.Module, snap: Snapshot, seed: int) -> None:
        super().__init__(module, snap, seed)
        self.inner: dict[str, torch.Tensor] = {}
        self.meta: dict[str, Any] = {}

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.snap.weight[start:stop].dequantize().float().contiguous()

    def write(self, start: int, rows: torch.Tensor) -> None:
        block = _quantized(self.snap.weight, rows)
        names, self.meta = block.__tensor_flatten__()
        for name in names:
            part = getattr(block, name)
            if name not in self.inner:
                self.inner[name] = part.new_empty((self.snap.weight.shape[0], *part.shape[1:]))
            self.inner[name][start:start + part.shape[0]] = part

    def finish(self) -> None:
        old = self.snap.weight
        new = type(old).__tensor_unflatten__(self.inner, self.meta, old.shape, old.stride())
        _install(self.module, new)


__all__ = ["TorchAO", "TorchAORows"]
