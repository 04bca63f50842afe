"""The live LoRA state of one pipeline: loaded adapters, the active blend, the call-time scale, fused weights.

How it runs (and why):

* **One extra term per touched layer, whatever the number of adapters.** Every touched ``Linear``/``Conv2d``
  gets one forward hook while it has something to add (none while disabled, fused or at weight 0). It adds
  ``scale · up(down(x))`` from ONE low-rank pair that concatenates the active adapters' factors, each adapter's
  ``up`` multiplied by its weight (``U = [w1·U1 | w2·U2 …]``, ``D = [D1; D2; …]``, so ``U @ D = Σ wi·ΔWi``
  exactly, with no cross terms). The pair is rebuilt only when the active set, the weights, the fused set
  or the module's device/dtype change, lazily on the layer's next forward (or all at once by ``prepare``).
  When the blend holds LoHa/LoKr/full/DoRA deltas, or the concatenated rank makes the pair costlier than a
  dense matrix, the layer adds one dense ``ΔW`` instead. No module is replaced, nothing is randomly
  initialised, and there is no per-adapter Python loop in the forward pass.
* **The call-time scale is a context variable**, read by the hooks: nothing stored on a module changes, so a
  call that raises leaves no state behind, and threads sharing a pipeline each see their own scale.
* **Fuse computes ``W0 + Σ c_i·ΔW_i`` in fp32 from the pristine ``W0`` and casts once.** The first fuse that
  touches a layer keeps a copy of its pristine weight (same device by default, or ``pristine_device="cpu"``);
  unfuse copies it back (bit for bit, never by subtraction), and unfusing some adapters re-fuses the rest
  from the pristine copy. A failed fuse or unfuse restores every layer it already wrote (recomputed from
  the pristine copy and the previous fused set: same operations, same bits, no extra memory).
* **Memory**: low-rank blends cost ``rank · (in + out)`` per layer; LoHa/LoKr/full/DoRA deltas in the
  unfused blend cost one dense ``ΔW`` per touched layer (fuse them to avoid it); fusing keeps one pristine
  copy per fused layer. ``memory()`` reports all three.

>>> rt = LoraRuntime({"unet": pipe.unet})                              # doctest: +SKIP
>>> rt.add(bind_adapter(adapter, rt.view)); rt.set_adapters(["style"], [0.7])   # doctest: +SKIP
"""

from __future__ import annotations

import contextvars
import itertools
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import Delta, DoRADelta, FullDelta, LowRankDelta
from .resolve import COMPONENT_ORDER, BoundAdapter, ModelView, layer_weights

logger = logging.getLogger(__name__)

# Distinct context variables per runtime: two pipelines in one thread never see each other's scale.
_runtime_ids = itertools.count()


def delta_to(delta: Delta, device: torch.device | str) -> Delta:
    """A copy of ``delta`` whose tensors live on ``device`` (the original is left untouched)."""
    changes = {}
    for f in fields(delta):
        if not f.init:
            continue
        value = getattr(delta, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = value.to(device)
        elif is_dataclass(value):
            changes[f.name] = delta_to(value, device)
    return replace(delta, **changes)


@dataclass
class _Fused:
    """One adapter fused into one component: the coefficients and deltas it was fused with."""

    lora_scale: float
    coefs: dict[str, float]  # target key -> lora_scale * set_adapters weight at fuse time
    deltas: dict[str, Delta]


@dataclass(eq=False)
class _Slot:
    """The live state of one touched module."""

    key: str
    component: str
    module: nn.Module
    scale_var: contextvars.ContextVar
    rebuild: Any  # callable(slot): the runtime's term builder, used when the module moved device/dtype
    loaded: dict[str, Delta] = field(default_factory=dict)  # adapter name -> delta, in load order
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    built_for: tuple | None = None
    handle: Any = None
    pristine_weight: torch.Tensor | None = None
    pristine_bias: torch.Tensor | None = None

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    @property
    def has_term(self) -> bool:
        return self.up is not None or self.dense is not None

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        scale = self.scale_var.get()
        if scale == 0.0:
            return out
        w = module.weight
        if self.built_for != (w.device, w.dtype):
            self.rebuild(self)
            if not self.has_term:
                return out
        x = args[0]
        m = module
        if self.dense is not None:
            if self.is_conv:
                delta = F.conv2d(x, self.dense, self.bias, m.stride, m.padding, m.dilation)
            else:
                delta = F.linear(x, self.dense, self.bias)
        elif self.is_conv:
            delta = F.conv2d(F.conv2d(x, self.down, None, m.stride, m.padding, m.dilation), self.up)
        else:
            delta = F.linear(F.linear(x, self.down), self.up)
        if torch.is_grad_enabled():
            return out + delta * scale if scale != 1.0 else out + delta
        return out.add_(delta, alpha=scale)

    def restore_pristine(self) -> None:
        with torch.no_grad():
            self.module.weight.copy_(self.pristine_weight)
            if self.pristine_bias is not None:
                self.module.bias.copy_(self.pristine_bias)
        self.pristine_weight = self.pristine_bias = None


class LoraRuntime:
    """Adapters loaded on the components of one pipeline.

    ``components`` maps ``"unet"``, ``"text_encoder"``, ``"text_encoder_2"`` to live modules.
    ``pristine_device`` says where pristine copies of fused weights live: ``None`` keeps them next to the
    weight (fastest restore; costs the touched weights' size in device memory), ``"cpu"`` keeps them on
    the host (restore is a host-to-device copy).

    >>> rt = LoraRuntime({"unet": pipe.unet, "text_encoder": pipe.text_encoder})   # doctest: +SKIP
    """

    def __init__(self, components: Mapping[str, nn.Module], *, pristine_device: str | torch.device | None = None):
        self.view = ModelView.of(components)
        self.pristine_device = pristine_device
        self.adapters: dict[str, BoundAdapter] = {}
        self.active: list[str] = []
        self.enabled = True
        self._weight_specs: dict[str, Any] = {}
        self._weights: dict[str, dict[str, float]] = {}
        self._slots: dict[str, _Slot] = {}
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
            "blended": sum(nbytes((s.up, s.down, s.dense, s.bias)) for s in self._slots.values()),
            "pristine": sum(nbytes((s.pristine_weight, s.pristine_bias)) for s in self._slots.values()),
        }

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
        touched = set(bound.layers)
        if replace_existing:
            touched |= set(self.adapters[name].layers)
            self._detach(name)
        self.adapters[name] = bound
        self._weight_specs[name] = spec
        self._weights[name] = weights
        for key, layer in bound.layers.items():
            slot = self._slots.get(key)
            if slot is None:
                slot = self._slots[key] = _Slot(key, layer.component, layer.module, self._scale, self._build_term)
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
            for key, layer in bound.layers.items():
                layer.delta = delta_to(layer.delta, device)
                self._slots[key].loaded[name] = layer.delta

    # ----------------------------------------------------------------------------------- blending
    def set_adapters(self, names: Sequence[str], weights: Sequence[Any]) -> None:
        """Activate exactly ``names`` with one weight spec each (see ``resolve.layer_weights``)."""
        self._check_names(names, "set_adapters")
        if len(set(names)) != len(names):
            raise ValueError(f"set_adapters: adapter names repeat: {list(names)}")
        new = {n: layer_weights(w, self.adapters[n], self.view) for n, w in zip(names, weights)}
        touched = {k for n in set(self.active) | set(names) for k in self.adapters[n].layers}
        for n, w in zip(names, weights):
            self._weights[n] = new[n]
            self._weight_specs[n] = w
        self.active = list(names)
        self._refresh(touched)

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)
        self._refresh(self._slots)

    def _terms(self, slot: _Slot) -> list[tuple[float, Delta]]:
        if not self.enabled:
            return []
        terms = []
        for name in self.active:
            delta = slot.loaded.get(name)
            if delta is None or slot.component in self._fused.get(name, {}):
                continue
            w = self._weights[name][slot.key]
            if w != 0.0:
                terms.append((w, delta))
        return terms

    def _build_term(self, slot: _Slot) -> None:
        """(Re)build the slot's single extra term from the active, unfused adapters."""
        slot.up = slot.down = slot.dense = slot.bias = None
        weight = slot.module.weight
        slot.built_for = (weight.device, weight.dtype)
        terms = self._terms(slot)
        if not terms:
            return
        device, dtype, shape = weight.device, weight.dtype, tuple(weight.shape)
        out_f, in_flat = shape[0], weight[0].numel()
        low_rank = all(type(d) is LowRankDelta for _, d in terms)
        rank = sum(d.rank for _, d in terms) if low_rank else 0
        with torch.no_grad():
            if low_rank and rank * (out_f + in_flat) < out_f * in_flat:
                ups, downs = [], []
                for w, d in terms:
                    up, down = d.factors()
                    ups.append(up.to(device) * w)
                    downs.append(down.to(device))
                up, down = torch.cat(ups, 1).to(dtype), torch.cat(downs, 0).to(dtype)
                if slot.is_conv:
                    up, down = up.reshape(out_f, rank, 1, 1), down.reshape(rank, *shape[1:])
                slot.up, slot.down = up.contiguous(), down.contiguous()
            else:
                base = slot.pristine_weight if slot.pristine_weight is not None else weight
                dense = torch.zeros(shape, dtype=torch.float32, device=device)
                bias = None
                for w, d in terms:
                    dense.add_(_delta_weight(d, shape, base, device), alpha=w)
                    if isinstance(d, FullDelta) and d.diff_b is not None:
                        db = d.delta_bias().to(device) * w
                        bias = db if bias is None else bias + db
                slot.dense = dense.to(dtype)
                slot.bias = None if bias is None else bias.to(dtype)

    def _refresh(self, keys: Iterable[str]) -> None:
        """Mark the terms of ``keys`` stale and keep a hook exactly on the slots that will have a term.

        Terms are built lazily, on a layer's next forward (or by ``prepare``): a run of set_adapters /
        fuse / unfuse calls costs one rebuild, not one per call, and a fused layer holds no term at all.
        """
        for key in list(keys):
            slot = self._slots.get(key)
            if slot is None:
                continue
            slot.up = slot.down = slot.dense = slot.bias = None
            slot.built_for = None
            wanted = bool(self._terms(slot))
            if wanted and slot.handle is None:
                slot.handle = slot.module.register_forward_hook(slot)
            elif not wanted and slot.handle is not None:
                slot.handle.remove()
                slot.handle = None
            if not slot.loaded and slot.pristine_weight is None and slot.handle is None:
                del self._slots[key]

    def prepare(self) -> None:
        """Build every stale blended term now instead of on the first forward (e.g. before serving).

        >>> pipeline._runtime.prepare()                                     # doctest: +SKIP
        """
        for slot in self._slots.values():
            weight = slot.module.weight
            if slot.handle is not None and slot.built_for != (weight.device, weight.dtype):
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
            raise
        self._fused = state
        still_fused = {k for comps in state.values() for f in comps.values() for k in f.deltas}
        for key in keys:
            if key not in still_fused:  # the weight already equals the pristine copy: release it
                slot = self._slots[key]
                slot.pristine_weight = slot.pristine_bias = None
        self._refresh(keys)

    def _write_fused(self, slot: _Slot, entries: list[tuple[float, Delta]], safe: bool) -> None:
        module = slot.module
        weight = module.weight
        if not entries:
            if slot.pristine_weight is not None:
                with torch.no_grad():
                    weight.copy_(slot.pristine_weight)
                    if slot.pristine_bias is not None:
                        module.bias.copy_(slot.pristine_bias)
            return
        unfused_now = slot.pristine_weight is None  # then the live weight IS the pristine one
        if unfused_now:
            slot.pristine_weight = weight.detach().to(self.pristine_device or weight.device, copy=True)
            if module.bias is not None and any(isinstance(d, FullDelta) and d.diff_b is not None for _, d in entries):
                slot.pristine_bias = module.bias.detach().to(self.pristine_device or weight.device, copy=True)
        device = weight.device
        with torch.no_grad():
            # fp32 weights (not checked first) are summed in place: the same ops in the same order as the
            # separate fp32 buffer the other dtypes need, so the same bits, with one pass less.
            in_place = weight.dtype == torch.float32 and not safe and weight.is_contiguous()
            if in_place:
                base = weight.data
                if not unfused_now:
                    base.copy_(slot.pristine_weight)
            else:
                base = slot.pristine_weight.to(device=device, dtype=torch.float32, copy=True)
            flat = base.view(base.shape[0], -1)
            new_bias = None
            for coef, d in entries:
                if coef == 0.0:
                    continue
                if type(d) is LowRankDelta:
                    up, down = d.factors()
                    flat.addmm_(up.to(device), down.to(device), alpha=coef)
                else:
                    pristine = slot.pristine_weight
                    base.add_(_delta_weight(d, tuple(weight.shape), pristine, device), alpha=coef)
                    if isinstance(d, FullDelta) and d.diff_b is not None:
                        if slot.pristine_bias is None:
                            slot.pristine_bias = module.bias.detach().to(self.pristine_device or device, copy=True)
                        if new_bias is None:
                            new_bias = slot.pristine_bias.to(device=device, dtype=torch.float32, copy=True)
                        new_bias.add_(d.delta_bias().to(device), alpha=coef)
            if safe:  # check what the model will hold: a finite fp32 sum can overflow fp16
                base = base.to(weight.dtype)
            if safe and not bool(torch.isfinite(base).all()):
                raise ValueError(
                    f"fuse_lora(safe_fusing=True): the fused weight of {slot.key} has NaN or Inf values "
                    f"({weight.dtype}); nothing was fused. The adapter or lora_scale is broken for this dtype"
                )
            if not in_place:
                weight.copy_(base)  # the one cast to the module's dtype
            if new_bias is not None:
                module.bias.copy_(new_bias)
            elif slot.pristine_bias is not None:
                module.bias.copy_(slot.pristine_bias)


def _delta_weight(delta: Delta, shape: tuple[int, ...], base: torch.Tensor, device: torch.device) -> torch.Tensor:
    """fp32 ΔW of ``delta`` on ``device``; DoRA is relative to the pristine ``base`` weight."""
    if isinstance(delta, DoRADelta):
        return delta_to(delta, device).delta_weight(shape, base_weight=base.to(device))
    if isinstance(delta, LowRankDelta):
        up, down = delta.factors()
        return (up.to(device) @ down.to(device)).reshape(shape)
    return delta.delta_weight(shape).to(device)
