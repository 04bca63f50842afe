"""The per-layer room of the runtime: what one touched module adds in its forward hook, and whether that is current.

A ``LayerState`` holds the adapters loaded on one ``Linear``/``Conv2d``, the ones that contribute to it now (the
runtime says which), and the ONE extra term its forward hook adds: a low-rank pair ``up · diag(svec) · down`` that
concatenates every contributing adapter's factors (``svec`` holds each adapter's weight repeated over its rank),
or one dense ``ΔW`` when the blend is not low-rank or the pair would cost more than the matrix. A ``LayerTable``
holds every layer of one pipeline, the adapters' per-layer weights and ONE version number: a layer whose
``version`` differs from the table's is stale and brings itself up to date on its next forward (or in
``prepare``). Nothing here calls back into the runtime.

>>> import torch
>>> from lorablend.kinds import LowRankDelta
>>> table = LayerTable(contextvars.ContextVar("scale", default=1.0))
>>> layer = table.add("unet.proj", "unet", torch.nn.Linear(3, 4))
>>> layer.loaded["a"] = LowRankDelta(down=torch.ones(1, 3), up=torch.ones(4, 1))
>>> table.weights["a"] = {"unet.proj": 0.5}
>>> layer.set_contributors([("a", layer.loaded["a"])]); table.version += 1
>>> with torch.no_grad():
...     _ = layer.module.weight.zero_(), layer.module.bias.zero_()
...     layer.module(torch.ones(1, 3)).tolist()
[[1.5, 1.5, 1.5, 1.5]]
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .fusion import concat_factors, delta_weight_fp32, fused_bias, fused_weight, has_bias_terms
from .model_view import ModulationTable
from ..kinds import Delta
from ..quant import format_of
from ..quant import fuse as quant_fuse


@dataclass(eq=False)
class WeightVectors:
    """The weight vectors of the low-rank layers on one device/dtype, as views of ONE flat tensor: a weights-only
    ``set_adapters`` rewrites ``flat`` in place with one gather (``gather[i]`` = which adapter weight goes to rank
    position ``i``), whatever the number of layers or loaded adapters. Valid while the same layers hold the terms
    it was made for: a layer that drops its term marks it ``intact = False``."""

    layers: list["LayerState"]
    gather: torch.Tensor
    flat: torch.Tensor
    intact: bool = True


@dataclass(eq=False)
class LayerState:
    """One touched module: its loaded deltas, its contributors, the term its hook adds, its pristine weight."""

    key: str
    component: str
    module: nn.Module
    table: "LayerTable"
    loaded: dict[str, Delta] = field(default_factory=dict)  # adapter name -> delta, in load order
    contributors: tuple[tuple[str, Delta], ...] = ()  # (name, delta) the term is made of, set by the runtime
    # the term: (up, down, svec) or (dense, bias); None when nothing is built
    up: torch.Tensor | None = None  # (out, R): the contributors' up factors side by side, alpha/rank folded in
    down: torch.Tensor | None = None  # (R, in) or, for a k×k conv, (R, in, kh, kw)
    svec: torch.Tensor | None = None  # (R,): each contributor's weight repeated over its rank (a view of vectors)
    ranks: tuple[int, ...] = ()  # each contributor's rank: its block of svec
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    built_for: tuple | None = None  # (device, dtype) the term was built for
    version: int = -1  # the table version the term is current at (-1: never)
    vectors: WeightVectors | None = None  # the shared flat tensor svec is a view of
    handle: Any = None  # the forward hook, present exactly while there are contributors
    pristine_weight: torch.Tensor | None = None  # the weight before fusing (None: not fused)
    pristine_bias: torch.Tensor | None = None
    quant: Any = None  # the weight's quantized format (lorablend.quant; found on creation), None for a float weight
    quant_snapshot: Any = None  # a quantized weight's original stored state, while fused
    sample_index: tuple | None = None  # (svec, columns, each rank's column): sample_weights' gather, kept

    def __post_init__(self) -> None:
        self.quant = format_of(self.module)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The logical weight shape (a quantized weight's ``out, in``, not its packed storage)."""
        return self.quant.shape(self.module) if self.quant is not None else tuple(self.module.weight.shape)

    def term_place(self, out: torch.Tensor | None = None) -> tuple:
        """``(device, dtype)`` the term is built for: the weight's; for a quantized weight the dtype its forward
        returns (``out``'s; before a forward, the dtype last built for, else the format's compute dtype)."""
        w = self.module.weight
        if self.quant is None:
            return w.device, w.dtype
        if out is not None:
            return w.device, out.dtype
        if self.built_for is not None and self.built_for[0] == w.device:
            return self.built_for
        return w.device, self.quant.compute_dtype(self.module)

    @property
    def is_norm(self) -> bool:
        """A norm's 1-D scale (a transformer's q/k RMSNorm): its delta multiplies the normalized input."""
        return not isinstance(self.module, (nn.Linear, nn.Conv2d, ModulationTable))

    @property
    def is_table(self) -> bool:
        """A modulation table (Wan's ``scale_shift_table``): its owner reads ``T + scale · ΔT`` for the call."""
        return isinstance(self.module, ModulationTable)

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    @property
    def is_pointwise(self) -> bool:
        m = self.module
        return m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding in ((0, 0), "valid")

    @property
    def has_term(self) -> bool:
        return self.up is not None or self.dense is not None

    def clear_term(self) -> None:
        if self.vectors is not None:  # its block of the shared weight vectors is gone
            self.vectors.intact = False
        self.up = self.down = self.svec = self.dense = self.bias = None
        self.ranks, self.built_for, self.version, self.vectors = (), None, -1, None

    def set_contributors(self, contributors: Sequence[tuple[str, Delta]]) -> None:
        """Make the term out of ``contributors`` from now on. A low-rank term made of the same deltas keeps its
        factors (only its weight vector is redone when the table's version moves); the hook is kept exactly
        while there is something to add."""
        contributors = tuple(contributors)
        # the same deltas in the same order (identity: Delta dataclasses compare by identity)
        if self.up is None or tuple(d for _, d in contributors) != tuple(d for _, d in self.contributors):
            self.clear_term()
        self.contributors = contributors
        if contributors and self.handle is None and self.component not in self.table.static:
            self.handle = self.module.hook(self.table_value) if self.is_table else self.module.register_forward_hook(self)
        elif not contributors and self.handle is not None:
            self.handle.remove()
            self.handle = None

    # ------------------------------------------------------------------------------- the forward hook
    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """``out + scale · ΔW x`` with the one term of this layer (built first if it is not current)."""
        scale = self.table.scale_var.get()
        if scale == 0.0:
            return out
        w = module.weight
        place = (w.device, w.dtype) if self.quant is None else self.term_place(out)
        if self.version != self.table.version or self.built_for != place:
            self.table.bring_current(self, place)
            if not self.has_term:
                return out
        x = args[0]
        if self.dense is not None:
            if self.table.sample_var.get() is not None:
                raise ValueError(f"{self.key}: per-sample LoRA weights need low-rank terms, and this layer's blend "
                                 "is a dense ΔW (LoHa, LoKr, a bias delta or a norm); run such mixes one at a time")
            if self.is_norm:  # y = n(x) · w (+ b): a weight delta adds n(x) · ΔW
                delta = _normalized(module, x).to(out.dtype) * self.dense
            elif self.is_conv:
                delta = F.conv2d(x, self.dense, self.bias, module.stride, module.padding, module.dilation)
            else:
                delta = F.linear(x, self.dense, self.bias)
        elif not self.is_conv:
            return self._add_linear_pair(x, out, scale)
        else:
            return self._add_conv_pair(module, x, out, scale)
        if torch.is_grad_enabled():
            return out + delta * scale if scale != 1.0 else out + delta
        return out.add_(delta, alpha=scale)

    def table_value(self) -> torch.Tensor | None:
        """What a modulation table's owner reads in this call: ``T + scale · ΔT`` (out of place: the parameter is
        never written unfused), or None when nothing is added (scale 0, no term)."""
        scale = self.table.scale_var.get()
        if scale == 0.0:
            return None
        w = self.module.weight
        if self.version != self.table.version or self.built_for != (w.device, w.dtype):
            self.table.bring_current(self, (w.device, w.dtype))
        if self.dense is None:
            return None
        if self.table.sample_var.get() is not None:
            raise ValueError(f"{self.key}: per-sample LoRA weights need low-rank terms, and a modulation table's "
                             "delta is one dense table; run mixes with diff_m deltas one at a time")
        return w + self.dense * scale if scale != 1.0 else w + self.dense

    def _weight_vector(self, rows: int) -> torch.Tensor:
        """``svec`` (R,), or (rows, R) when the call gives each sample its own adapter weights (a mixed batch)."""
        samples = self.table.sample_var.get()
        return self.svec if samples is None else samples.vector(self, rows)

    def _add_linear_pair(self, x: torch.Tensor, out: torch.Tensor, scale: float) -> torch.Tensor:
        h = F.linear(x, self.down)
        svec = self._weight_vector(h.shape[0])
        if svec.dim() == 2:  # per sample: (rows, R) against h's (rows, …, R)
            svec = svec.view(svec.shape[0], *([1] * (h.dim() - 2)), svec.shape[1])
        if torch.is_grad_enabled():
            delta = F.linear(h * svec, self.up)
            return out + delta * scale if scale != 1.0 else out + delta
        h.mul_(svec)
        if out.is_contiguous():  # inference: accumulate straight into the output (one GEMM, no temporary)
            out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), self.up.t(), alpha=scale)
            return out
        return out.add_(F.linear(h, self.up), alpha=scale)

    def _add_conv_pair(self, m: nn.Module, x: torch.Tensor, out: torch.Tensor, scale: float) -> torch.Tensor:
        # channel matmuls: 1×1 convs through conv2d take a slow path on CPU
        if self.down.dim() == 2:  # pointwise conv: down is a channel matmul too
            n, c, hh, ww = x.shape
            h = torch.matmul(self.down, x.reshape(n, c, hh * ww))
        else:
            h = F.conv2d(x, self.down, None, m.stride, m.padding, m.dilation)
            n, _, hh, ww = h.shape
            h = h.reshape(n, h.shape[1], hh * ww)
        col = self._weight_vector(n)[..., None]  # (R, 1), or (n, R, 1) per sample
        if torch.is_grad_enabled():
            delta = torch.matmul(self.up, h * col).reshape(n, -1, hh, ww)
            return out + delta * scale if scale != 1.0 else out + delta
        h.mul_(col)
        if out.is_contiguous():
            out.view(n, -1, hh * ww).baddbmm_(self.up.expand(n, -1, -1), h, alpha=scale)
            return out
        return out.add_(torch.matmul(self.up, h).reshape(n, -1, hh, ww), alpha=scale)

    # ------------------------------------------------------------------------------- building the term
    def build(self, version: int, weights: dict[str, dict[str, float]], place: tuple | None = None) -> None:
        """(Re)build the term from the contributors, current at ``version``.

        Low-rank blends keep the weights out of the factors: ``up``/``down`` concatenate the contributors'
        ``low_rank_factors()`` and ``svec`` scales each one's rank block between the two products, so a change
        of weights only redoes ``svec``. Other blends, or a pair costlier than the matrix, give one dense ΔW.
        """
        weight = self.module.weight
        device, dtype = place if place is not None else self.term_place()
        self.clear_term()
        self.built_for, self.version = (device, dtype), version
        terms = [(weights[name][self.key], d) for name, d in self.contributors]
        if not terms:
            return
        shape = self.weight_shape
        out_f, in_flat = shape[0], math.prod(shape[1:])
        pairs = [d.low_rank_factors() for _, d in terms]
        rank = sum(int(p[0].shape[1]) for p in pairs) if all(p is not None for p in pairs) else 0
        if any(d.changes_bias for _, d in terms) or self.is_table:
            # A bias delta (control LoRA lora_B.bias, kohya diff_b) would need re-weighing beside svec on every
            # weights-only switch: such layers take the dense term, which carries the weighted bias exactly. A
            # modulation table's owner reads the dense term (a merge may hand it a LoRA over its flattened rows).
            rank = 0
        with torch.no_grad():
            if rank and (self.table.low_rank_only or rank * (out_f + in_flat) < out_f * in_flat):
                up, down = concat_factors([(1.0, p) for p in pairs], device)
                if self.is_conv and not self.is_pointwise:
                    down = down.reshape(rank, *shape[1:])
                self.up, self.down = up.to(dtype).contiguous(), down.to(dtype).contiguous()
                self.ranks = tuple(int(p[0].shape[1]) for p in pairs)
                vec = torch.tensor([w for w, _ in terms], dtype=torch.float32).repeat_interleave(
                    torch.tensor(self.ranks))
                self.svec = vec.to(device=device, dtype=dtype)
                return
            if self.quant is not None:  # (DoRA is relative to the weight the quantized bytes stand for)
                base = quant_fuse.dequantized_weight(self)
            else:
                base = self.pristine_weight if self.pristine_weight is not None else weight
            dense = torch.zeros(shape, dtype=torch.float32, device=device)
            bias = None
            for w, d in terms:
                dense.add_(delta_weight_fp32(d, shape, base, device), alpha=w)
                if d.changes_bias:
                    db = d.delta_bias().to(device) * w
                    bias = db if bias is None else bias + db
            self.dense = dense.to(dtype)
            self.bias = None if bias is None else bias.to(dtype)

    # ------------------------------------------------------------------------------- the pristine weight
    def weight_is_pristine(self) -> bool:
        """True when the live weight IS the pristine backup tensor (unfused by rebinding, or never written)."""
        w, p = self.module.weight, self.pristine_weight
        return p is not None and w.data_ptr() == p.data_ptr() and w.dtype == p.dtype and w.device == p.device

    def restore_pristine(self) -> None:
        """Put the pristine weight back: rebind the parameter to the backup tensor when it lives next to the
        weight (no copy; the fused tensor is freed), else one copy (e.g. from a CPU backup). A quantized weight
        gets its original stored objects back (``quant.fuse.restore``)."""
        if self.quant_snapshot is not None:
            quant_fuse.restore(self)
            return
        w, p = self.module.weight, self.pristine_weight
        with torch.no_grad():
            if p.device == w.device and p.dtype == w.dtype and p.shape == w.shape and p.stride() == w.stride():
                w.data = p
            else:
                w.copy_(p)
            if self.pristine_bias is not None:
                self.module.bias.copy_(self.pristine_bias)

    # ------------------------------------------------------------------------------- the fused weight
    def write_fused(
        self,
        entries: Sequence[tuple[float, Delta]],
        *,
        safe: bool = False,
        pristine_device: str | torch.device | None = None,
        spares: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """Make the weight ``pristine + Σ coef·ΔW`` (``fusion.fused_weight``), or the pristine weight when
        ``entries`` is empty; returns the fused tensor a restore let go of (for the caller to keep for reuse).

        The first fuse whose backup stays on the weight's device keeps the ORIGINAL weight tensor as the backup
        and rebinds the parameter to a freshly computed fused tensor (written into ``spares[key]`` when the
        caller kept one of the right layout): no backup copy, one pass over the weight; restoring rebinds the
        backup (no copy at all). A backup elsewhere (``pristine_device``) is a copy, and restore copies it
        back. Re-fusing a fused layer writes into its fused tensor. The pristine copy stays until
        ``release_pristine`` (the runtime releases it only once every layer of a fuse is written).
        """
        if self.quant is not None:  # dequantize, fuse in fp32, requantize; unfuse rebinds the original bytes
            quant_fuse.write_fused(self, entries, safe=safe)
            return None
        module, weight = self.module, self.module.weight
        if not entries:
            if self.pristine_weight is None:
                return None
            fused = weight.data
            self.restore_pristine()
            return fused if fused.data_ptr() != weight.data_ptr() else None
        if self.pristine_weight is None:  # the live weight IS the pristine one
            target = torch.device(pristine_device) if pristine_device is not None else weight.device
            copy = target != weight.device
            self.pristine_weight = weight.detach().to(target, copy=True) if copy else weight.detach()
        if getattr(module, "bias", None) is not None and self.pristine_bias is None and has_bias_terms(entries):
            self.pristine_bias = module.bias.detach().to(self.pristine_weight.device, copy=True)
        with torch.no_grad():
            if self.weight_is_pristine():  # compute into another tensor and rebind: the backup stays untouched
                spare = (spares or {}).pop(self.key, None)
                if spare is not None and (spare.shape, spare.dtype, spare.device, spare.stride()) == (
                        weight.shape, weight.dtype, weight.device, weight.stride()):
                    weight.data = fused_weight(self.pristine_weight, entries, safe=safe, key=self.key, out=spare)
                else:
                    weight.data = fused_weight(self.pristine_weight, entries, safe=safe, key=self.key,
                                               out_dtype=weight.dtype, device=weight.device)
            else:
                fused_weight(self.pristine_weight, entries, safe=safe, key=self.key, out=weight.data)
            if self.pristine_bias is not None:
                module.bias.copy_(fused_bias(self.pristine_bias, entries, out_dtype=module.bias.dtype,
                                             device=module.bias.device))
        return None

    def release_pristine(self) -> None:
        """Forget the pristine copy: the live weight equals it again (nothing fused here any more)."""
        self.pristine_weight = self.pristine_bias = self.quant_snapshot = None

    def undo_first_fuse(self) -> None:
        """Roll back a fuse that began on this unfused layer: the pristine weight back, the copy forgotten."""
        if self.pristine_weight is not None:
            self.restore_pristine()
            self.release_pristine()


def _normalized(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a norm multiplies by its weight: ``x / rms(x)`` for an RMSNorm (diffusers' and torch's), the
    standardized ``x`` for a LayerNorm — the module's own eps, its arithmetic in fp32 as diffusers does it."""
    eps = getattr(module, "eps", None) or 1e-6
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x.float(), module.normalized_shape, eps=eps)
    if "RMSNorm" in type(module).__name__:
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    raise TypeError(f"a weight delta on a {type(module).__name__} is not supported (RMSNorm and LayerNorm are)")


class LayerTable:
    """The touched layers of one pipeline, the adapters' per-layer weights, and the ONE version number.

    The runtime bumps ``version`` whenever what a layer should add may have changed (weights, contributors,
    fused set, enabled); each layer compares its own ``version`` with it. ``weights[name][key]`` is written by
    the runtime and read here. ``scale_var`` is the call-time scale the hooks read.
    """

    def __init__(self, scale_var: contextvars.ContextVar) -> None:
        self.scale_var = scale_var
        self.by_key: dict[str, LayerState] = {}
        self.weights: dict[str, dict[str, float]] = {}
        self.version = 0
        self._vectors: dict[tuple, WeightVectors] = {}  # (device, dtype) -> the flat weight vectors
        # component -> its static-mode owner (``compiled.StaticDenoiser``): its layers get no hook here, the owner
        # adds their terms from fixed buffers (a compiled graph must not see hooks come and go)
        self.static: dict[str, Any] = {}
        # fp8 fuses round stochastically: each layer's generator is seeded from this and its name (reproducible;
        # set another value to draw other roundings, e.g. to check they are unbiased)
        self.rounding_seed = 0
        # a quantized layer's fuse: None requantizes into its own format; a float dtype (torch.bfloat16 …) keeps the
        # fused weight as a float copy of that dtype instead, the quantized objects untouched (quant/fuse.py)
        self.quantized_fuse_dtype: torch.dtype | None = None
        # per-sample adapter weights of the call in progress (a :class:`SampleWeights`, or None: one mix for all)
        self.sample_var: contextvars.ContextVar = contextvars.ContextVar(f"lorablend_samples_{id(self)}", default=None)
        self.low_rank_only = False  # True once per-sample weights were asked for: they need every term low-rank

    def set_static(self, component: str, owner: Any | None) -> None:
        """Hand ``component``'s layers to a static-mode ``owner`` (their hooks go), or back to hooks (``None``)."""
        if owner is not None:
            self.static[component] = owner
        else:
            self.static.pop(component, None)
        for layer in self.by_key.values():
            if layer.component != component:
                continue
            if owner is not None and layer.handle is not None:
                layer.handle.remove()
                layer.handle = None
            layer.clear_term()
            layer.set_contributors(layer.contributors)  # back to hooks: hooked again where something contributes
        self.version += 1

    def add(self, key: str, component: str, module: nn.Module) -> LayerState:
        """The layer of ``key``, created on first use."""
        layer = self.by_key.get(key)
        if layer is None:
            layer = self.by_key[key] = LayerState(key, component, module, self)
        return layer

    def bring_current(self, layer: LayerState, place: tuple | None = None) -> None:
        """Make ``layer``'s term current for ``place`` (``(device, dtype)``, default ``layer.term_place()``): a
        low-rank term built there only needs new weight vectors (every waiting layer's at once), anything else
        is rebuilt."""
        place = place if place is not None else layer.term_place()
        if layer.up is not None and layer.built_for == place:
            self.refresh_weight_vectors()
        else:
            layer.build(self.version, self.weights, place)

    def refresh_weight_vectors(self) -> None:
        """New ``svec`` for every stale low-rank term (its contributors unchanged), one flat tensor per
        device/dtype: written in place when the same layers hold the same terms as last time (one gather).
        (Inference does not mind in place; a backward pass through a forward made before the change would
        raise, not silently use the new weights.)"""
        groups: dict[tuple, list[LayerState]] = {}
        for layer in self.by_key.values():
            if layer.version != self.version and layer.up is not None:
                groups.setdefault(layer.built_for, []).append(layer)  # (the factors' device and dtype)
        for (device, dtype), layers in groups.items():
            values = torch.tensor([self.weights[name][layer.key] for layer in layers for name, _ in layer.contributors],
                                  dtype=torch.float32)
            vectors = self._vectors.get((device, dtype))
            if vectors is not None and vectors.intact and vectors.layers == layers:
                with torch.no_grad():
                    vectors.flat.copy_(values.index_select(0, vectors.gather))
            else:
                gather = torch.arange(len(values)).repeat_interleave(
                    torch.tensor([r for layer in layers for r in layer.ranks]))
                flat = values.index_select(0, gather).to(device=device, dtype=dtype)
                vectors = self._vectors[(device, dtype)] = WeightVectors(layers, gather, flat)
                for layer, part in zip(layers, flat.split([int(layer.up.shape[1]) for layer in layers])):
                    layer.svec, layer.vectors = part, vectors
            for layer in layers:
                layer.version = self.version

    def prepare(self) -> None:
        """Bring every hooked layer's term (and every static-mode owner's buffers) up to date now instead of on
        the next forward."""
        for owner in list(self.static.values()):
            owner.sync()
        self.refresh_weight_vectors()
        for layer in self.by_key.values():
            if layer.handle is None:
                continue
            weight = layer.module._parameters["weight"]  # (plain dict access: this loop runs on every set_adapters)
            place = (weight.device, weight.dtype) if layer.quant is None else layer.term_place()
            if layer.version != self.version or layer.built_for != place:
                layer.build(self.version, self.weights, place)


__all__ = ["LayerState", "LayerTable", "WeightVectors"]
