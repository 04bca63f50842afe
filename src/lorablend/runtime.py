"""The live LoRA state of one pipeline: loaded adapters, the active blend, the call-time scale, fused weights.

How it runs (and why):

* **One extra term per touched layer, whatever the number of adapters.** Every touched ``Linear``/``Conv2d``
  gets one forward hook while it has something to add (none while disabled, fused or at weight 0). It adds
  ``scale · up(svec ⊙ down(x))`` from ONE low-rank pair that concatenates the active adapters' factors
  (``U = [U1 | U2 …]``, ``D = [D1; D2; …]``, alpha/rank folded into ``U``) with ``svec`` holding each
  adapter's weight repeated over its rank, so ``U · diag(svec) · D = Σ wi·ΔWi`` exactly, with no cross terms.
  A ``set_adapters`` that only changes weights refreshes ``svec`` (one small vector per layer, all layers in
  one tensor operation); the pair is rebuilt only when the contributing adapters, the fused set or the
  module's device/dtype change, lazily on the layer's next forward (or all at once by ``prepare``). 1×1
  convs (proj_in/proj_out) run their term as channel matmuls, which are much faster than conv2d on a CPU.
  When the blend holds LoHa/LoKr/full/DoRA deltas, or the concatenated rank makes the pair costlier than a
  dense matrix, the layer adds one dense ``ΔW`` instead. No module is replaced, nothing is randomly
  initialised, and there is no per-adapter Python loop in the forward pass.
* **The call-time scale is a context variable**, read by the hooks: nothing stored on a module changes, so a
  call that raises leaves no state behind, and threads sharing a pipeline each see their own scale.
* **Fuse computes ``W0 + Σ c_i·ΔW_i`` in fp32 from the pristine ``W0`` and casts once** (``fusion.fused_weight``,
  the code the offline bake uses too: all low-rank terms in one ``addmm`` over concatenated factors). The
  first fuse of a layer keeps its ORIGINAL weight tensor as the pristine backup and rebinds the parameter to
  the freshly computed fused tensor (one pass over the weight, no backup copy); unfuse rebinds the backup
  (no copy at all, bit for bit, never by subtraction). With ``pristine_device`` elsewhere (e.g. ``"cpu"`` for
  a GPU model) the backup is a copy and unfuse copies it back. Unfusing some adapters re-fuses the rest from
  the pristine weight. A failed fuse or unfuse restores every layer it already wrote (recomputed from the
  pristine weight and the previous fused set: same operations, same bits, no extra memory).
* **Where adapters live**: next to their modules, as in diffusers (``add`` moves a loaded adapter to its
  modules' device in one transfer per dtype, ``adapter.deltas_to``), so blending and fusing never copy factors
  between devices; ``move_adapters`` (``set_lora_device``) parks them elsewhere.
* **Memory**: low-rank blends cost ``rank · (in + out)`` per layer; LoHa/LoKr/full/DoRA deltas in the
  unfused blend cost one dense ``ΔW`` per touched layer (fuse them to avoid it); fusing holds one extra
  copy of each fused layer (its pristine weight); ``keep_fuse_buffers=True`` keeps that much after unfuse
  too, to re-fuse without allocating. ``memory()`` reports all of them.

>>> rt = LoraRuntime({"unet": pipe.unet})                              # doctest: +SKIP
>>> rt.add(bind_adapter(adapter, rt.view)); rt.set_adapters(["style"], [0.7])   # doctest: +SKIP
"""

from __future__ import annotations

import contextvars
import itertools
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import Delta, FullDelta, LowRankDelta, deltas_to
from .fusion import delta_weight_fp32, fused_bias, fused_weight, has_bias_terms, low_rank_factors
from .resolve import COMPONENT_ORDER, BoundAdapter, ModelView, layer_weights

logger = logging.getLogger(__name__)

# Distinct context variables per runtime: two pipelines in one thread never see each other's scale.
_runtime_ids = itertools.count()


@dataclass
class _Fused:
    """One adapter fused into one component: the coefficients and deltas it was fused with."""

    lora_scale: float
    coefs: dict[str, float]  # target key -> lora_scale * set_adapters weight at fuse time
    deltas: dict[str, Delta]


class _Epoch:
    """A counter shared by a runtime and its slots, bumped whenever ``set_adapters`` weights may have changed."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


@dataclass(eq=False)
class _Slot:
    """The live state of one touched module."""

    key: str
    component: str
    module: nn.Module
    scale_var: contextvars.ContextVar
    rebuild: Any  # callable(slot): the runtime's term builder (stale term, or the module moved device/dtype)
    epoch: "_Epoch"  # the runtime's weights epoch: a term built at an older epoch holds old weights
    loaded: dict[str, Delta] = field(default_factory=dict)  # adapter name -> delta, in load order
    up: torch.Tensor | None = None  # (out, R): the active adapters' up factors side by side, alpha/rank folded in
    down: torch.Tensor | None = None  # (R, in) or, for a k×k conv, (R, in, kh, kw)
    svec: torch.Tensor | None = None  # (R,): each adapter's set_adapters weight, repeated over its rank
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    built_for: tuple | None = None  # (device, dtype) the term was built for; None = stale
    built_names: tuple = ()  # the adapters up/down were built from, in order
    built_deltas: tuple = ()  # their deltas, for a quick identity comparison
    built_ranks: tuple = ()  # each built adapter's rank (its block of svec)
    built_epoch: int = -1  # the weights epoch svec (or the dense term) was computed at
    handle: Any = None
    pristine_weight: torch.Tensor | None = None
    pristine_bias: torch.Tensor | None = None

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
        self.up = self.down = self.svec = self.dense = self.bias = None
        self.built_for = None
        self.built_names = self.built_deltas = self.built_ranks = ()
        self.built_epoch = -1

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        scale = self.scale_var.get()
        if scale == 0.0:
            return out
        w = module.weight
        if self.built_epoch != self.epoch.value or self.built_for != (w.device, w.dtype):
            self.rebuild(self)
            if not self.has_term:
                return out
        x = args[0]
        m = module
        grad = torch.is_grad_enabled()
        if self.dense is not None:
            if self.is_conv:
                delta = F.conv2d(x, self.dense, self.bias, m.stride, m.padding, m.dilation)
            else:
                delta = F.linear(x, self.dense, self.bias)
        elif not self.is_conv:
            h = F.linear(x, self.down)
            if not grad and out.is_contiguous():
                # inference: accumulate straight into the output (one GEMM, no output-sized temporary)
                h.mul_(self.svec)
                out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), self.up.t(), alpha=scale)
                return out
            h = h * self.svec if grad else h.mul_(self.svec)
            delta = F.linear(h, self.up)
        else:  # channel matmuls (1×1 convs through conv2d take a slow path on CPU)
            if self.down.dim() == 2:  # pointwise conv: down is a channel matmul too
                n, c, hh, ww = x.shape
                h = torch.matmul(self.down, x.reshape(n, c, hh * ww))
            else:
                h = F.conv2d(x, self.down, None, m.stride, m.padding, m.dilation)
                n, _, hh, ww = h.shape
                h = h.reshape(n, h.shape[1], hh * ww)
            col = self.svec[:, None]
            if not grad and out.is_contiguous():
                h.mul_(col)
                out.view(n, -1, hh * ww).baddbmm_(self.up.expand(n, -1, -1), h, alpha=scale)
                return out
            h = h * col if grad else h.mul_(col)
            delta = torch.matmul(self.up, h).reshape(n, -1, hh, ww)
        if grad:
            return out + delta * scale if scale != 1.0 else out + delta
        return out.add_(delta, alpha=scale)

    def weight_is_pristine(self) -> bool:
        """True when the live weight IS the pristine backup tensor (unfused by rebinding, or never written)."""
        w, p = self.module.weight, self.pristine_weight
        return p is not None and w.data_ptr() == p.data_ptr() and w.dtype == p.dtype and w.device == p.device

    def restore_pristine(self) -> None:
        """Put the pristine weight back: rebind the parameter to the backup tensor when it lives next to the
        weight (no copy; the fused tensor is freed), else one copy (e.g. from a CPU backup)."""
        w, p = self.module.weight, self.pristine_weight
        with torch.no_grad():
            if p.device == w.device and p.dtype == w.dtype and p.shape == w.shape and p.stride() == w.stride():
                w.data = p
            else:
                w.copy_(p)
            if self.pristine_bias is not None:
                self.module.bias.copy_(self.pristine_bias)


def _placed_on_modules(bound: BoundAdapter) -> list[tuple[Any, Delta]]:
    """``(layer, delta on the layer's device)`` for the layers whose delta lives elsewhere, as diffusers keeps a
    loaded LoRA on its module's device: blending and fusing then never copy factors. One transfer per device
    and dtype for the whole adapter (``deltas_to``); nothing to do when model and adapter share the host."""
    by_device: dict[torch.device, list[Any]] = {}
    for layer in bound.layers.values():
        device = layer.module.weight.device
        if device.type != "meta" and any(t.device != device for t in layer.delta.tensors()):
            by_device.setdefault(device, []).append(layer)
    return [(layer, delta) for device, layers in by_device.items()
            for layer, delta in zip(layers, deltas_to([layer.delta for layer in layers], device))]


def _same_zeros(old_spec: Any, new_spec: Any, old: Mapping[str, float], new: Mapping[str, float]) -> bool:
    """True when two per-layer weight maps of one adapter are zero on the same layers (a number as the spec
    gives every layer that number: decided without looking at the layers)."""
    numbers = (int, float, type(None))
    if isinstance(old_spec, numbers) and isinstance(new_spec, numbers):
        return (old_spec == 0) == (new_spec == 0)
    return old.keys() == new.keys() and all((old[k] == 0.0) == (w == 0.0) for k, w in new.items())


class LoraRuntime:
    """Adapters loaded on the components of one pipeline.

    ``components`` maps ``"unet"``, ``"text_encoder"``, ``"text_encoder_2"`` to live modules.
    ``pristine_device`` says where pristine copies of fused weights live: ``None`` keeps them next to the
    weight (fastest restore; costs the touched weights' size in device memory), ``"cpu"`` keeps them on
    the host (restore is a host-to-device copy). ``keep_fuse_buffers=True`` keeps each layer's fused tensor
    after unfuse and writes the next fuse into it: re-fusing skips allocating (and, on a CPU, page-faulting)
    fresh memory, at the cost of holding one copy of the touched weights while unfused too (never more than
    one copy at any time: a layer holds either its pristine backup or its spare). ``release_fuse_buffers()``
    frees them.

    >>> rt = LoraRuntime({"unet": pipe.unet, "text_encoder": pipe.text_encoder})   # doctest: +SKIP
    """

    def __init__(
        self,
        components: Mapping[str, nn.Module],
        *,
        pristine_device: str | torch.device | None = None,
        keep_fuse_buffers: bool = False,
    ):
        self.view = ModelView.of(components)
        self.pristine_device = pristine_device
        self.keep_fuse_buffers = keep_fuse_buffers
        self._spare: dict[str, torch.Tensor] = {}  # key -> a fused tensor kept after unfuse for the next fuse
        self.adapters: dict[str, BoundAdapter] = {}
        self.active: list[str] = []
        self.enabled = True
        self._weight_specs: dict[str, Any] = {}
        self._weights: dict[str, dict[str, float]] = {}
        self._slots: dict[str, _Slot] = {}
        self._epoch = _Epoch()  # weights version: terms built at an older one refresh svec (_update_weight_vectors)
        self._svec_layouts: dict[tuple, tuple] = {}  # (device, dtype) -> builds, slots, gather index, flat svec
        self._terms_built = 0  # counts term builds: a cached layout is valid only if no term was rebuilt since
        self._fused: dict[str, dict[str, _Fused]] = {}
        self._scale = contextvars.ContextVar(f"lorablend_scale_{next(_runtime_ids)}", default=1.0)

    # ----------------------------------------------------------------------------------- queries
    @property
    def fused_names(self) -> list[str]:
        """Adapters fused into at least one component, in fuse order."""
        return list(self._fused)

    def fused_components(self, name: str) -> list[str]:
        return [c for c in COMPONENT_ORDER if c in self._fused.get(name, {})]

    def list_adapters(self) -> dict[str, list[str]]:
        """``{component: [adapter names]}`` for the components that have adapters loaded."""
        out: dict[str, list[str]] = {}
        for name, bound in self.adapters.items():
            for comp in bound.components():
                out.setdefault(comp, []).append(name)
        return {c: out[c] for c in COMPONENT_ORDER if c in out}

    def memory(self) -> dict[str, int]:
        """Bytes held by the runtime: loaded adapter tensors, blended terms, pristine copies of fused weights."""
        def nbytes(ts: Iterable[torch.Tensor | None]) -> int:
            return sum(t.numel() * t.element_size() for t in ts if t is not None)

        return {
            "adapters": sum(nbytes(l.delta.tensors()) for b in self.adapters.values() for l in b.layers.values()),
            "blended": sum(nbytes((s.up, s.down, s.svec, s.dense, s.bias)) for s in self._slots.values()),
            "pristine": sum(nbytes((s.pristine_weight, s.pristine_bias)) for s in self._slots.values()),
            "fuse_buffers": nbytes(self._spare.values()),
        }

    def release_fuse_buffers(self) -> None:
        """Free the fused tensors kept for reuse by ``keep_fuse_buffers=True``."""
        self._spare.clear()

    def pristine_weight(self, key: str) -> torch.Tensor:
        """The pristine weight of a target key (the backup when the layer is fused, else the live weight)."""
        slot = self._slots.get(key)
        if slot is not None and slot.pristine_weight is not None:
            return slot.pristine_weight
        return self.view.module(key).weight.detach()

    def _check_names(self, names: Sequence[str], what: str) -> None:
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise ValueError(
                f"{what}: adapter(s) {unknown} not in the list of present adapters {list(self.adapters)}"
                + (f" (fused after unload: {self.fused_names})" if self.fused_names else "")
            )

    # ----------------------------------------------------------------------------------- loading
    def add(self, bound: BoundAdapter, *, activate: bool = True, replace_existing: bool = False) -> None:
        """Register a bound adapter. ``activate`` makes it the only active adapter (diffusers' behaviour).

        ``replace_existing`` swaps the tensors of an adapter of the same name (hotswap), keeping its
        activation and weight spec.
        """
        name = bound.name
        if name in self._fused:
            raise ValueError(
                f"adapter {name!r} is fused into {self.fused_components(name)}; unfuse_lora(adapter_names="
                f"[{name!r}]) first or load under another adapter_name"
            )
        if name in self.adapters and not replace_existing:
            raise ValueError(
                f"an adapter named {name!r} is already loaded ({list(self.adapters)}); pass another adapter_name "
                f"or delete_adapters({name!r}) first"
            )
        if replace_existing and name not in self.adapters:
            raise ValueError(f"hotswap: no adapter named {name!r} to replace; loaded: {list(self.adapters)}")
        spec = self._weight_specs.get(name) if replace_existing else None
        weights = layer_weights(spec, bound, self.view)  # validate before any change
        placed = _placed_on_modules(bound)  # (a failed transfer, e.g. out of memory, changes nothing)
        touched = set(bound.layers)
        if replace_existing:
            touched |= set(self.adapters[name].layers)
            self._detach(name)
        for layer, delta in placed:
            layer.delta = delta
        self.adapters[name] = bound
        self._weight_specs[name] = spec
        self._weights[name] = weights
        for key, layer in bound.layers.items():
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _Slot(key, layer.component, layer.module, self._scale, self._build_term,
                                                    self._epoch)
            slot.loaded[name] = layer.delta
        if activate and not replace_existing:
            touched |= {k for n in self.active for k in self.adapters[n].layers}
            self.active = [name]
        self._refresh(touched)

    def _detach(self, name: str) -> None:
        for key in self.adapters[name].layers:
            self._slots[key].loaded.pop(name, None)

    def delete(self, names: Sequence[str]) -> None:
        """Forget adapters. A fused adapter stays fused (its record is kept so it can still be unfused)."""
        self._check_names(names, "delete_adapters")
        touched: set[str] = set()
        for name in names:
            touched |= set(self.adapters[name].layers)
            self._detach(name)
            del self.adapters[name], self._weights[name], self._weight_specs[name]
        self.active = [n for n in self.active if n in self.adapters]
        self._refresh(touched)

    def unload(self) -> None:
        """Drop every adapter; fused weights stay fused (and can still be unfused: their records remain)."""
        self.delete(list(self.adapters))

    def move_adapters(self, names: Sequence[str], device: torch.device | str) -> None:
        """Move the stored tensors of ``names`` to ``device`` (blended terms stay on each module's device)."""
        self._check_names(names, "set_lora_device")
        for name in names:
            bound = self.adapters[name]
            layers = list(bound.layers.values())
            for layer, delta in zip(layers, deltas_to([layer.delta for layer in layers], device)):
                layer.delta = self._slots[layer.key].loaded[name] = delta

    # ----------------------------------------------------------------------------------- blending
    def set_adapters(self, names: Sequence[str], weights: Sequence[Any]) -> None:
        """Activate exactly ``names`` with one weight spec each (see ``resolve.layer_weights``)."""
        self._check_names(names, "set_adapters")
        if len(set(names)) != len(names):
            raise ValueError(f"set_adapters: adapter names repeat: {list(names)}")
        new = {n: layer_weights(w, self.adapters[n], self.view) for n, w in zip(names, weights)}
        # Same adapters, same order, zero on the same layers: every layer keeps its contributing adapters, so
        # only the weights move. Bumping the epoch is all it takes (terms refresh their weight vectors lazily,
        # all layers in one tensor operation), whatever the number of loaded adapters.
        same_blend = self.enabled and list(names) == self.active and all(
            _same_zeros(self._weight_specs[n], w, self._weights[n], new[n]) for n, w in zip(names, weights))
        touched = () if same_blend else {k for n in set(self.active) | set(names) for k in self.adapters[n].layers}
        for n, w in zip(names, weights):
            self._weights[n] = new[n]
            self._weight_specs[n] = w
        self._epoch.value += 1
        if not same_blend:
            self.active = list(names)
            self._refresh(touched)

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)
        self._refresh(self._slots)

    def _terms(self, slot: _Slot) -> list[tuple[str, float, Delta]]:
        """``(name, weight, delta)`` of the active, unfused adapters with a non-zero weight on this layer."""
        if not self.enabled:
            return []
        terms = []
        for name in self.active:
            delta = slot.loaded.get(name)
            if delta is None or slot.component in self._fused.get(name, {}):
                continue
            w = self._weights[name][slot.key]
            if w != 0.0:
                terms.append((name, w, delta))
        return terms

    def _build_term(self, slot: _Slot) -> None:
        """(Re)build the slot's single extra term from the active, unfused adapters.

        Low-rank blends keep the weights out of the factors: ``up``/``down`` concatenate the adapters' factors
        (alpha/rank folded in) and ``svec`` scales each adapter's rank block between the two products, so a
        ``set_adapters`` that only changes weights refreshes ``svec`` (one small vector per layer) and keeps
        the factors. The factors are rebuilt only when the set of contributing adapters changes.
        """
        weight = slot.module.weight
        device, dtype = weight.device, weight.dtype
        if slot.up is not None and slot.built_for == (device, dtype):
            self._update_weight_vectors()  # only the weights moved: every waiting layer in one go
            return
        terms = self._terms(slot)
        slot.clear_term()
        slot.built_for = (device, dtype)
        slot.built_epoch = self._epoch.value
        self._terms_built += 1
        if not terms:
            return
        shape = tuple(weight.shape)
        out_f, in_flat = shape[0], weight[0].numel()
        low_rank = all(type(d) is LowRankDelta for _, _, d in terms)
        rank = sum(int(d.up.shape[1]) for _, _, d in terms) if low_rank else 0
        with torch.no_grad():
            if low_rank and rank * (out_f + in_flat) < out_f * in_flat:
                up, down = low_rank_factors([(1.0, d) for _, _, d in terms], device)
                if slot.is_conv and not slot.is_pointwise:
                    down = down.reshape(rank, *shape[1:])
                slot.up, slot.down = up.to(dtype).contiguous(), down.to(dtype).contiguous()
                slot.built_names = tuple(n for n, _, _ in terms)
                slot.built_deltas = tuple(d for _, _, d in terms)
                slot.built_ranks = tuple(int(d.up.shape[1]) for _, _, d in terms)
                vec = torch.tensor([w for _, w, _ in terms], dtype=torch.float32).repeat_interleave(
                    torch.tensor(slot.built_ranks))
                slot.svec = vec.to(device=device, dtype=dtype)
            else:
                base = slot.pristine_weight if slot.pristine_weight is not None else weight
                dense = torch.zeros(shape, dtype=torch.float32, device=device)
                bias = None
                for _, w, d in terms:
                    dense.add_(delta_weight_fp32(d, shape, base, device), alpha=w)
                    if isinstance(d, FullDelta) and d.diff_b is not None:
                        db = d.delta_bias().to(device) * w
                        bias = db if bias is None else bias + db
                slot.dense = dense.to(dtype)
                slot.bias = None if bias is None else bias.to(dtype)

    def _update_weight_vectors(self) -> None:
        """Refresh ``svec`` of every low-rank term built at an older weights epoch (its adapters are unchanged).

        The vectors of a device/dtype are views of one flat tensor: when the same layers hold the same terms as
        at the last refresh, the new weights are written into it in place (one gather), so a weight-only
        ``set_adapters`` costs one list of floats and two small tensor operations, whatever the number of
        layers or loaded adapters. (Inference does not mind in place; a backward pass through a forward made
        before the change would raise, not silently use the new weights.)
        """
        current = self._epoch.value
        groups: dict[tuple, list[_Slot]] = {}
        for slot in self._slots.values():
            if slot.built_epoch != current and slot.up is not None:
                groups.setdefault(slot.built_for, []).append(slot)  # (the factors' device and dtype)
        weights = self._weights
        for (device, dtype), slots in groups.items():
            values = torch.tensor([weights[n][slot.key] for slot in slots for n in slot.built_names],
                                  dtype=torch.float32)
            layout = self._svec_layouts.get((device, dtype))
            # valid when the same slots (identity) hold the same terms (no build since): ranks and sizes stand
            if layout is not None and layout[0] == self._terms_built and layout[1] == slots:
                _, _, gather, flat = layout
                with torch.no_grad():
                    flat.copy_(values.index_select(0, gather))
                for slot in slots:
                    slot.built_epoch = current
                continue
            # each rank position of every layer -> its adapter's weight in ``values``
            gather = torch.arange(len(values)).repeat_interleave(
                torch.tensor([r for slot in slots for r in slot.built_ranks]))
            flat = values.index_select(0, gather).to(device=device, dtype=dtype)
            self._svec_layouts[(device, dtype)] = (self._terms_built, slots, gather, flat)
            for slot, part in zip(slots, flat.split([slot.up.shape[1] for slot in slots])):
                slot.svec, slot.built_epoch = part, current

    def _refresh(self, keys: Iterable[str]) -> None:
        """Mark the terms of ``keys`` stale and keep a hook exactly on the slots that will have a term.

        Terms are built lazily, on a layer's next forward (or by ``prepare``): a run of set_adapters /
        fuse / unfuse calls costs one rebuild, not one per call, and a fused layer holds no term at all.
        A low-rank term whose adapters did not change keeps its factors (only its weight vector is redone).
        """
        for key in list(keys):
            slot = self._slots.get(key)
            if slot is None:
                continue
            terms = self._terms(slot)
            # the same deltas in the same order (identity: Delta dataclasses compare by identity)
            if slot.up is None or tuple(d for _, _, d in terms) != slot.built_deltas:
                slot.clear_term()
            wanted = bool(terms)
            if wanted and slot.handle is None:
                slot.handle = slot.module.register_forward_hook(slot)
            elif not wanted and slot.handle is not None:
                slot.handle.remove()
                slot.handle = None
            if not slot.loaded and slot.pristine_weight is None and slot.handle is None:
                del self._slots[key]
        self._epoch.value += 1  # the kept low-rank terms refresh their weight vectors

    def prepare(self) -> None:
        """Build every stale blended term now instead of on the first forward (e.g. before serving).

        >>> pipeline._runtime.prepare()                                     # doctest: +SKIP
        """
        self._update_weight_vectors()
        current = self._epoch.value
        for slot in self._slots.values():
            if slot.handle is None:
                continue
            weight = slot.module._parameters["weight"]  # (plain dict access: this loop runs on every set_adapters)
            if slot.built_epoch != current or slot.built_for != (weight.device, weight.dtype):
                self._build_term(slot)

    # ----------------------------------------------------------------------------------- call-time scale
    @contextmanager
    def call_scale(self, scale: float) -> Iterator[None]:
        """Scale every unfused adapter term by ``scale`` for the calls made inside the block only.

        A fused adapter is part of the weights: a scale other than 1 cannot reach it, so that raises instead
        of being silently ignored (diffusers ignores it).
        """
        scale = float(scale)
        if scale != scale or scale in (float("inf"), float("-inf")):
            raise ValueError(f"cross_attention_kwargs['scale'] must be finite, got {scale}")
        if scale != 1.0 and self._fused:
            raise ValueError(
                f"cross_attention_kwargs={{'scale': {scale}}} cannot rescale fused adapters {self.fused_names}: "
                "they are part of the weights now. unfuse_lora() and fuse_lora(lora_scale=...) again, or "
                "drop the scale"
            )
        token = self._scale.set(scale)
        try:
            yield
        finally:
            self._scale.reset(token)

    # ----------------------------------------------------------------------------------- fuse / unfuse
    def fuse(
        self,
        names: Sequence[str] | None = None,
        components: Sequence[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
    ) -> None:
        """Fuse ``names`` (default: the active adapters) into ``components`` (default: all they touch)."""
        lora_scale = float(lora_scale)
        if lora_scale != lora_scale or abs(lora_scale) == float("inf"):
            raise ValueError(f"fuse_lora: lora_scale must be finite, got {lora_scale}")
        components = self._check_components(components, "fuse_lora")
        if names is None:
            names = [n for n in self.active if any(c not in self._fused.get(n, {}) for c in
                                                    self.adapters[n].components() if c in components)]
            if not names:
                raise ValueError(
                    "fuse_lora: nothing to fuse: " + (
                        f"the active adapters {self.active} are already fused (fused: {self.fused_names})"
                        if self.active else f"no adapter is active (loaded: {list(self.adapters)})")
                )
        names = [names] if isinstance(names, str) else list(names)
        self._check_names(names, "fuse_lora")
        new: dict[str, dict[str, _Fused]] = {}
        for name in names:
            bound = self.adapters[name]
            comps = [c for c in bound.components() if c in components]
            if not comps:
                raise ValueError(f"fuse_lora: adapter {name!r} touches {bound.components()}, not {components}")
            already = [c for c in comps if c in self._fused.get(name, {})]
            if already:
                raise ValueError(
                    f"fuse_lora: adapter {name!r} is already fused into {already}; fused adapters: "
                    f"{ {n: self.fused_components(n) for n in self.fused_names} }. unfuse_lora first to re-fuse it"
                )
            for comp in comps:
                keys = [k for k, l in bound.layers.items() if l.component == comp]
                new.setdefault(name, {})[comp] = _Fused(
                    lora_scale,
                    {k: lora_scale * self._weights[name][k] for k in keys},
                    {k: bound.layers[k].delta for k in keys},
                )
        state = {n: dict(c) for n, c in self._fused.items()}
        for name, comps in new.items():
            state.setdefault(name, {}).update(comps)
        touched = {k for comps in new.values() for f in comps.values() for k in f.deltas}
        self._apply_fused(state, touched, safe_fusing)

    def unfuse(self, names: Sequence[str] | None = None, components: Sequence[str] | None = None) -> None:
        """Restore pristine weights where ``names`` were fused; adapters not named stay fused (re-fused from
        the pristine copy)."""
        components = self._check_components(components, "unfuse_lora")
        if not self._fused:
            raise ValueError(
                "unfuse_lora: nothing is fused in this pipeline. (A pipeline loaded from a folder saved after "
                "fuse_lora has the LoRA baked into its weights: load the original base model to get it back.)"
            )
        names = list(self._fused) if names is None else ([names] if isinstance(names, str) else list(names))
        not_fused = [n for n in names if n not in self._fused]
        if not_fused:
            raise ValueError(
                f"unfuse_lora: adapter(s) {not_fused} are not fused; fused adapters: "
                f"{ {n: self.fused_components(n) for n in self.fused_names} }"
            )
        state = {n: dict(c) for n, c in self._fused.items()}
        touched: set[str] = set()
        for name in names:
            for comp in [c for c in state[name] if c in components]:
                touched |= set(state[name].pop(comp).deltas)
            if not state[name]:
                del state[name]
        if not touched:
            raise ValueError(
                f"unfuse_lora: {names} are not fused into {components}; fused: "
                f"{ {n: self.fused_components(n) for n in self.fused_names} }"
            )
        self._apply_fused(state, touched, safe=False)

    def _check_components(self, components: Sequence[str] | None, what: str) -> list[str]:
        present = [c for c in COMPONENT_ORDER if c in self.view.components]
        if components is None:
            return present
        components = [components] if isinstance(components, str) else list(components)
        bad = [c for c in components if c not in present]
        if bad:
            raise ValueError(f"{what}: unknown component(s) {bad}; this pipeline has {present}")
        return components

    def _apply_fused(self, state: dict[str, dict[str, _Fused]], keys: set[str], safe: bool) -> None:
        """Make the weights of ``keys`` equal to pristine + the fused ``state``; all or nothing.

        A rollback recomputes each written layer from its pristine copy and the previous state: the same
        operations in the same order give the same bits, so no copy of the current weights is needed.
        Pristine copies are only released after every layer was written.
        """
        def entries_of(fused: dict[str, dict[str, _Fused]], slot: _Slot) -> list[tuple[float, Delta]]:
            return [
                (f.coefs[slot.key], f.deltas[slot.key])
                for comps in fused.values()
                for comp, f in comps.items()
                if comp == slot.component and slot.key in f.deltas
            ]

        written: list[tuple[_Slot, bool]] = []
        try:
            for key in keys:
                slot = self._slots[key]
                written.append((slot, slot.pristine_weight is not None))
                self._write_fused(slot, entries_of(state, slot), safe)
        except BaseException:
            for slot, was_fused in reversed(written):
                if was_fused:
                    self._write_fused(slot, entries_of(self._fused, slot), safe=False)
                elif slot.pristine_weight is not None:
                    slot.restore_pristine()
                    slot.pristine_weight = slot.pristine_bias = None
            raise
        self._fused = state
        still_fused = {k for comps in state.values() for f in comps.values() for k in f.deltas}
        for key in keys:
            if key not in still_fused:  # the weight already equals the pristine copy: release it
                slot = self._slots[key]
                slot.pristine_weight = slot.pristine_bias = None
        self._refresh(keys)

    def _write_fused(self, slot: _Slot, entries: list[tuple[float, Delta]], safe: bool) -> None:
        """Make the layer's weight ``pristine + Σ coef·ΔW`` (``fusion.fused_weight``), or pristine when empty.

        The first fuse of a layer whose backup stays on the weight's device keeps the ORIGINAL weight tensor as
        the backup and rebinds the parameter to a freshly computed fused tensor: no backup copy, one pass over
        the weight; restoring rebinds the backup (no copy at all). A backup elsewhere (``pristine_device``)
        is a copy, and restore copies it back. Re-fusing a fused layer writes into its fused tensor.
        """
        module = slot.module
        weight = module.weight
        if not entries:
            if slot.pristine_weight is not None:
                fused = weight.data
                slot.restore_pristine()
                if self.keep_fuse_buffers and fused.data_ptr() != weight.data_ptr():
                    self._spare[slot.key] = fused
            return
        if slot.pristine_weight is None:  # the live weight IS the pristine one
            target = torch.device(self.pristine_device) if self.pristine_device is not None else weight.device
            if target == weight.device:
                slot.pristine_weight = weight.detach()
            else:
                slot.pristine_weight = weight.detach().to(target, copy=True)
        if module.bias is not None and slot.pristine_bias is None and has_bias_terms(entries):
            slot.pristine_bias = module.bias.detach().to(slot.pristine_weight.device, copy=True)
        with torch.no_grad():
            if slot.weight_is_pristine():  # compute into another tensor and rebind: the backup stays untouched
                spare = self._spare.pop(slot.key, None)
                if spare is not None and (spare.shape, spare.dtype, spare.device, spare.stride()) == (
                        weight.shape, weight.dtype, weight.device, weight.stride()):
                    weight.data = fused_weight(slot.pristine_weight, entries, safe=safe, key=slot.key, out=spare)
                else:
                    weight.data = fused_weight(slot.pristine_weight, entries, safe=safe, key=slot.key,
                                               out_dtype=weight.dtype, device=weight.device)
            else:
                fused_weight(slot.pristine_weight, entries, safe=safe, key=slot.key, out=weight.data)
            if slot.pristine_bias is not None:
                module.bias.copy_(fused_bias(slot.pristine_bias, entries, out_dtype=module.bias.dtype,
                                             device=module.bias.device))
