"""float8 weights: plain ``float8_e4m3fn`` / ``float8_e5m2`` (diffusers' layerwise casting, a plain fp8 single file) and
ComfyUI's "scaled fp8" (an fp8 weight times a per-tensor fp32 ``scale_weight``).

A fused fp8 weight is rounded **stochastically** with a seeded generator (:func:`stochastic_round`): each value goes
to one of its two fp8 neighbours with the probability that makes the expected value exact, so a fuse is unbiased
(the mean error over seeds tends to 0) and the same seed gives the same bytes. A scaled weight keeps its scale
unless the fused weight no longer fits under ``scale · max``; then the scale grows to ``max|W| / max`` (what a
scaled-fp8 writer would choose) — the stored scale is part of what unfuse puts back.

>>> import torch
>>> x = torch.tensor([0.3, -1.7, 500.0])
>>> stochastic_round(x, torch.float8_e4m3fn, torch.Generator().manual_seed(0)).float().tolist()[2]
448.0
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import QuantFormat, RowFuse, Snapshot

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


_CHUNK = 1 << 20  # values rounded per step: the temporaries of a step stay a few MB whatever the layer's size


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """``x`` (fp32) in the float8 ``dtype``, each value rounded to its lower or upper fp8 neighbour with
    probability proportional to its distance to the other (unbiased: ``E[round(x)] = x`` inside the range); values
    beyond the largest finite fp8 saturate to it. ``generator`` (on ``x``'s device) makes it reproducible.

    Works on the bit patterns: fp8 magnitudes are ordered like their 7 low bits, so the neighbours of a value are
    the nearest fp8 value's pattern and the one next to it. Runs over ``x`` in chunks of ``_CHUNK`` values (the
    random draws in the same order), so its extra memory is a few MB, not several copies of the layer.

    >>> g = torch.Generator().manual_seed(1)
    >>> stochastic_round(torch.tensor([1.0, -2.0]), torch.float8_e4m3fn, g).float().tolist()
    [1.0, -2.0]
    """
    flat = x.reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.uint8, device=x.device)
    for start in range(0, flat.numel(), _CHUNK):
        out[start:start + _CHUNK] = _round_chunk(flat[start:start + _CHUNK], dtype, generator)
    return out.view(dtype).reshape(x.shape)


def _round_chunk(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """The fp8 bit patterns (uint8) of one chunk of :func:`stochastic_round`."""
    fmax = torch.finfo(dtype).max
    top = int(torch.tensor(fmax, dtype=dtype).view(torch.uint8).item())  # the largest finite magnitude's pattern
    mag = x.abs().clamp_(max=fmax)
    nearest = mag.to(dtype)
    bits = nearest.view(torch.uint8).to(torch.int16)
    lower = torch.where(nearest.float() > mag, bits - 1, bits)
    upper = (lower + 1).clamp_(max=top)
    lo = lower.to(torch.uint8).view(dtype).float()
    gap = upper.to(torch.uint8).view(dtype).float() - lo
    p = torch.where(gap > 0, (mag - lo) / torch.where(gap > 0, gap, 1.0), 0.0)
    draw = torch.rand(x.shape, generator=generator, device=x.device)
    chosen = torch.where(draw < p, upper, lower).to(torch.uint8)
    chosen |= torch.signbit(x).to(torch.uint8) << 7
    return chosen


class ScaledFp8Linear(nn.Linear):
    """A ``Linear`` whose weight is stored in float8 times a per-tensor fp32 ``scale_weight`` (ComfyUI's scaled
    fp8 layout: ``<layer>.weight`` + ``<layer>.scale_weight``); it computes in ``compute_dtype``.

    >>> layer = ScaledFp8Linear.from_linear(torch.nn.Linear(4, 2), compute_dtype=torch.float32)
    >>> layer.weight.dtype, layer(torch.ones(1, 4)).shape
    (torch.float8_e4m3fn, torch.Size([1, 2]))
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, compute_dtype: torch.dtype,
                 fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> None:
        super().__init__(in_features, out_features, bias, device="meta")
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=fp8_dtype), requires_grad=False)
        self.register_buffer("scale_weight", torch.ones((), dtype=torch.float32))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, compute_dtype: torch.dtype, scaled: bool = True,
                    fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> "ScaledFp8Linear":
        """The layer of a float ``linear`` in fp8: scale ``max|W| / fp8 max`` (``scaled``) or 1, round to nearest
        (how scaled-fp8 files are made)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype=compute_dtype,
                    fp8_dtype=fp8_dtype)
        with torch.no_grad():
            w = linear.weight.detach().float()
            scale = (w.abs().max() / torch.finfo(fp8_dtype).max).clamp_(min=1e-12) if scaled else torch.ones(())
            layer.weight = nn.Parameter((w / scale).to(fp8_dtype), requires_grad=False)
            layer.scale_weight = scale.reshape(()).float()
            if linear.bias is not None:
                layer.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
        return layer.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight.float() * self.scale_weight).to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), weight, bias).to(x.dtype)


class Fp8(QuantFormat):
    """A float8 weight, with (``scale_weight``) or without a per-tensor scale."""

    name = "fp8"

    def matches(self, module: nn.Module) -> bool:
        weight = module.weight
        return weight.dtype in FP8_DTYPES and type(weight) in (torch.Tensor, nn.Parameter)

    def label(self, module: nn.Module) -> str:
        scaled = "scaled-" if isinstance(getattr(module, "scale_weight", None), torch.Tensor) else ""
        return f"{scaled}fp8-{str(module.weight.dtype).split('_', 1)[1]}"

    def snapshot(self, module: nn.Module) -> Snapshot:
        return Snapshot(module._parameters["weight"], {"scale_weight": module._buffers.get("scale_weight")})

    def dequantize(self, module: nn.Module, snap: Snapshot) -> torch.Tensor:
        w = snap.weight.detach().float()
        scale = snap.extra["scale_weight"]
        return w.mul_(scale.float()) if scale is not None else w.contiguous()

    def requantize(self, module: nn.Module, snap: Snapshot, fused: torch.Tensor, seed: int) -> None:
        dtype, scale = snap.weight.dtype, snap.extra["scale_weight"]
        generator = torch.Generator(device=fused.device).manual_seed(seed)
        if scale is not None:  # keep the file's scale while the fused weight fits under it
            fmax = torch.finfo(dtype).max
            low, high = torch.aminmax(fused)  # (|W|'s max without an |W|-sized temporary)
            peak = torch.maximum(-low, high) / fmax
            scale = torch.maximum(scale.float(), peak).to(scale.dtype).reshape(scale.shape)
            module._buffers["scale_weight"] = scale
            fused = fused.div_(scale.float())  # (fused is this fuse's own buffer)
        module._parameters["weight"] = nn.Parameter(stochastic_round(fused, dtype, generator), requires_grad=False)

    def row_fuse(self, module: nn.Module, snap: Snapshot, seed: int) -> RowFuse | None:
        return Fp8Rows(module, snap, seed) if snap.weight.dim() == 2 else None  # (not an fp8 conv)

    def restore(self, module: nn.Module, snap: Snapshot) -> None:
        module._parameters["weight"] = snap.weight
        if snap.extra["scale_weight"] is not None:
            module._buffers["scale_weight"] = snap.extra["scale_weight"]

    def stored_state(self, module: nn.Module) -> dict[str, Any]:
        out: dict[str, Any] = {"weight": module.weight.detach().view(torch.uint8)}  # (torch.equal has no fp8 kernel)
        if isinstance(getattr(module, "scale_weight", None), torch.Tensor):
            out["scale_weight"] = module.scale_weight
        return out

    def fused_rounding(self, module: nn.Module) -> float:
        # stochastic rounding moves a value by less than one fp8 step: 2^-mantissa bits of its own magnitude
        return 2.0 ** -(3 if module.weight.dtype == torch.float8_e4m3fn else 2)


class Fp8Rows(RowFuse):
    """An fp8 weight fused a block of rows at a time, into a new fp8 tensor: the blocks are rounded in order from
    one seeded generator (the same draws, so the same bytes, as rounding the whole layer at once on the CPU). A
    scaled weight's new scale needs the whole fused weight's range first (``needs_peak``)."""

    def __init__(self, module: nn.Module, snap: Snapshot, seed: int) -> None:
        super().__init__(module, snap, seed)
        weight, self.scale = snap.weight, snap.extra["scale_weight"]
        self.needs_peak = self.scale is not None
        self.bits = torch.empty(weight.shape, dtype=torch.uint8, device=weight.device)
        self.generator = torch.Generator(device=weight.device).manual_seed(seed)
        self.range: tuple[torch.Tensor, torch.Tensor] | None = None
        self.new_scale: torch.Tensor | None = None

    def read(self, start: int, stop: int) -> torch.Tensor:
        w = self.snap.weight[start:stop].float()
        return w.mul_(self.scale.float()) if self.scale is not None else w

    def observe(self, rows: torch.Tensor) -> None:
        low, high = torch.aminmax(rows)
        self.range = (low, high) if self.range is None else (
            torch.minimum(self.range[0], low), torch.maximum(self.range[1], high))

    def write(self, start: int, rows: torch.Tensor) -> None:
        dtype = self.snap.weight.dtype
        if self.scale is not None:  # Fp8.requantize's rule, on the range of every block
            if self.new_scale is None:
                low, high = self.range if self.range is not None else (rows.new_zeros(()), rows.new_zeros(()))
                peak = torch.maximum(-low, high) / torch.finfo(dtype).max
                self.new_scale = torch.maximum(self.scale.float(), peak).to(self.scale.dtype).reshape(self.scale.shape)
            rows = rows.div_(self.new_scale.float())
        self.bits[start:start + rows.shape[0]] = stochastic_round(rows, dtype, self.generator).view(torch.uint8)

    def finish(self) -> None:
        module = self.module
        module._parameters["weight"] = nn.Parameter(self.bits.view(self.snap.weight.dtype), requires_grad=False)
        if self.scale is not None:
            module._buffers["scale_weight"] = self.new_scale if self.new_scale is not None else self.scale


__all__ = ["FP8_DTYPES", "Fp8", "Fp8Rows", "ScaledFp8Linear", "stochastic_round"]
