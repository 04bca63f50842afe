"""What a bake is, shared by every output format: ``BakeJob`` (one bake, its inputs checked), ``BakeReport`` (what it
did), ``BakeOp`` (one fused region of a checkpoint tensor) and ``fused_tensor`` (one tensor fused from its pristine
values with the one formula, ``runtime.fusion``). ``bake`` (safetensors checkpoints, pipeline folders) and
``quantized_files`` (GGUF) both build on it.

>>> BakeJob(Path("m.safetensors"), ((Path("a.safetensors"), 0.7),), Path("out.safetensors"), ()).lora_scale
1.0
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from ..adapter import Adapter, Delta
from ..runtime.fusion import fused_bias, fused_weight
from .checkpoint import Placement

LoraSource = Union[str, os.PathLike, Adapter]


@dataclass
class BakeReport:
    """What a bake did: inputs, output, how many tensors/layers it changed, and what it skipped (strict=False)."""

    model: str
    output: str
    kind: str  # "pipeline" | "single_file"
    family: str | None
    lora_scale: float
    dtype: str | None
    loras: list[dict[str, Any]] = field(default_factory=list)
    tensors: int = 0  # tensors written (single file) or layers in the pipeline's adaptable components
    touched: int = 0  # layers whose weight changed
    bytes: int = 0
    seconds: float = 0.0
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        names = ", ".join(f"{l['name']}:{l['weight']:g}" for l in self.loras)
        text = (f"baked {names} (lora_scale {self.lora_scale:g}) into {self.output} ({self.kind}, {self.family}): "
                f"{self.touched} layers changed, {self.bytes:,} bytes, {self.seconds:.1f} s")
        if self.skipped:
            text += f"; {len(self.skipped)} layer(s) skipped, e.g. {self.skipped[0]['key']}: {self.skipped[0]['reason']}"
        return text


@dataclass(frozen=True)
class BakeJob:
    """One bake, its inputs checked: what every step reads (weights finite, paths checked, dtype parsed).

    >>> BakeJob(Path("m.safetensors"), ((Path("a.safetensors"), 0.7),), Path("out.safetensors"), ()).lora_scale
    1.0
    """

    model: Path
    loras: tuple[tuple[LoraSource, float], ...]  # (file or Adapter, finite weight), in the caller's order
    output: Path
    inputs: tuple[Path, ...]  # never written over: the model and the LoRA files
    lora_scale: float = 1.0
    dtype: torch.dtype | None = None  # the output's float dtype; None keeps the model's
    overwrite: bool = False
    strict: bool = True
    safe: bool = True
    progress: bool = False


def lora_name(src: LoraSource, taken: set[str]) -> str:
    base = src.name if isinstance(src, Adapter) else Path(src).stem
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


@dataclass
class BakeOp:
    """One fused region of a checkpoint tensor: a layer's weight (or bias), maybe a row block, maybe transposed."""

    placement: Placement
    part: str  # "weight" | "bias"
    terms: list[tuple[float, Delta]]


def fused_tensor(tensor: torch.Tensor, ops: list[BakeOp], out_dtype: torch.dtype, safe: bool) -> torch.Tensor:
    """The fused version of one checkpoint tensor (every region computed from the pristine values)."""
    if len(ops) == 1 and ops[0].placement.row_spans is None:
        op = ops[0]
        if op.part == "bias":
            return fused_bias(tensor, op.terms, out_dtype=out_dtype)
        if op.placement.transposed:  # stored as Wᵀ: fuse W exactly as the live module would, store its transpose
            fused = fused_weight(tensor.t().contiguous(), op.terms, out_dtype=out_dtype, safe=safe, key=op.placement.target_key)
            return fused.t().contiguous()
        return fused_weight(tensor, op.terms, out_dtype=out_dtype, safe=safe, key=op.placement.target_key)
    # read_tensor gave fresh memory and the ops' rows are disjoint: each block is fused from its pristine rows and
    # written back over them, so no second copy of the whole tensor is needed when the dtype stays
    result = tensor if tensor.dtype == out_dtype else tensor.to(out_dtype)
    for op in ops:  # row blocks of a fused tensor (q/k/v, Flux linear1, swapped modulation halves): each its own layer
        spans = op.placement.row_spans
        rows = tensor[spans[0][0]:spans[0][1]] if len(spans) == 1 else torch.cat([tensor[a:b] for a, b in spans])
        if op.part == "bias":
            fused = fused_bias(rows, op.terms, out_dtype=out_dtype)
        else:
            fused = fused_weight(rows, op.terms, out_dtype=out_dtype, safe=safe, key=op.placement.target_key)
        at = 0
        for a, b in spans:  # the module's rows back where the file keeps them
            result[a:b] = fused[at:at + b - a]
            at += b - a
    return result


__all__ = ["BakeJob", "BakeOp", "BakeReport", "LoraSource", "fused_tensor", "lora_name"]
