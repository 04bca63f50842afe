"""The bookkeeping room of the runtime: the adapters loaded on one pipeline, the active blend and its weights,
the call-time scale, and which adapters are fused where (add / delete / set_adapters / fuse / unfuse).

What each touched layer adds in its forward hook, and when that is current, lives in :mod:`lorablend.runtime.layer_state`;
this module tells the layers which adapters contribute to them and bumps the one version number when anything
they add may have changed. Fusing decides what each layer holds; the layer writes ``W0 + Σ c·ΔW`` from its
pristine weight (``LayerState.write_fused`` → ``fusion.fused_weight``) and unfusing puts the pristine tensor back,
bit for bit.

>>> rt = LoraRuntime({"unet": pipe.unet})                              # doctest: +SKIP
>>> rt.add(bind_adapter(adapter, rt.view)); rt.set_adapters(["style"], [0.7])   # doctest: +SKIP
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..adapter import Delta
from .layer_state import LayerState, LayerTable
from .sample_weights import SampleWeights
from .model_view import COMPONENT_ORDER, ModelView, ModulationTable
from .binding import BoundAdapter
from .weight_specs import layer_weights
from .transfer import deltas_to
from ..quant import format_of
from ..quant import fuse as quant_fuse

logger = logging.getLogger(__name__)

# Distinct context variables per runtime: two pipelines in one thread never see each other's scale.
_runtime_ids = itertools.count()


@dataclass
class _Fused:
    """One adapter fused into one component: the coefficients and deltas it was fused with."""

    lora_scale: float
    coefs: dict[str, float]  # target key -> lora_scale * set_adapters weight at fuse time
    deltas: dict[str, Delta]


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
    frees them. Without it, unfuse still holds the fused tensors until the next forward of a component they belong to (or
    ``prepare()`` / ``release_fuse_buffers()``), so a switch (unfuse → set_adapters → fuse, nothing run in
    between) writes into warm memory too: on a CPU a fresh 1 GiB costs up to ~2 s of first-touch page faults
    (measured here: an SD1.5 switch 440 → 265 ms). Memory is never above what the fused state held.

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
        self._release_hooks: dict[str, Any] = {}  # component -> pre-hook that frees the spares on its next forward
        self.adapters: dict[str, BoundAdapter] = {}
        self.active: list[str] = []
        self.enabled = True
        self._weight_specs: dict[str, Any] = {}  # adapter -> the set_adapters weight as given
        self._fused: dict[str, dict[str, _Fused]] = {}
        self._scale = contextvars.ContextVar(f"lorablend_scale_{next(_runtime_ids)}", default=1.0)
        self._layers = LayerTable(self._scale)  # the per-layer room: terms, weight vectors, the version number
        self._weights = self._layers.weights  # adapter -> target key -> weight (the layers read it)

    # ----------------------------------------------------------------------------------- queries
    @property
    def layers(self) -> LayerTable:
        """The per-layer room (terms, per-layer weights, the version): what static mode (``compiled.py``) reads."""
        return self._layers

    @property
    def weight_specs(self) -> dict[str, Any]:
        """Each loaded adapter's ``set_adapters`` weight as it was given (a float, or a per-component / per-block
        spec), a copy: what a caller needs to set the same mix again."""
        return dict(self._weight_specs)

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
            "blended": sum(nbytes((s.up, s.down, s.svec, s.dense, s.bias)) for s in self._layers.by_key.values()),
            "pristine": sum(nbytes((s.pristine_weight, s.pristine_bias)) for s in self._layers.by_key.values()),
            "fuse_buffers": nbytes(self._spare.values()),
        }

    def release_fuse_buffers(self) -> None:
        """Free the fused tensors kept for reuse (``keep_fuse_buffers=True``, or since the last unfuse)."""
        self._spare.clear()
        for handle in self._release_hooks.values():
            handle.remove()
        self._release_hooks.clear()

    def _hold_spare(self, layer: LayerState, fused: torch.Tensor) -> None:
        """Keep an unfused layer's fused tensor for the next fuse: for good with ``keep_fuse_buffers``, else
        until the next forward of its component (a pre-hook that frees every spare and removes itself)."""
        self._spare[layer.key] = fused
        if self.keep_fuse_buffers or layer.component in self._release_hooks:
            return
        module = self.view.components[layer.component]
        runtime = weakref.ref(self)  # (the module must not keep a runtime whose wrappers are gone alive)
        self._release_hooks[layer.component] = module.register_forward_pre_hook(
            lambda *_: (rt := runtime()) is not None and rt.release_fuse_buffers())

    def pristine_weight(self, key: str) -> torch.Tensor:
        """The pristine weight of a target key (the backup when the layer is fused, else the live weight); for a
        quantized layer the fp32 weight its original bytes stand for (never its packed storage)."""
        layer = self._layers.by_key.get(key)
        module = self.view.module(key)
        if layer is not None and layer.quant is not None:
            return quant_fuse.dequantized_weight(layer)
        if layer is not None and layer.pristine_weight is not None:
            return layer.pristine_weight
        fmt = format_of(module)
        return fmt.dequantize(module, fmt.snapshot(module)) if fmt is not None else module.weight.detach()

    def check_names(self, names: Sequence[str], what: str) -> None:
        """Raise ``ValueError`` (starting with ``what``) unless every name is a loaded adapter.

        >>> rt.check_names(["style"], "set_adapters")                       # doctest: +SKIP
        """
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
            self._layers.add(key, layer.component, layer.module).loaded[name] = layer.delta
        if activate and not replace_existing:
            touched |= {k for n in self.active for k in self.adapters[n].layers}
            self.active = [name]
        self._refresh(touched)

    def _detach(self, name: str) -> None:
        for key in self.adapters[name].layers:
            self._layers.by_key[key].loaded.pop(name, None)

    def delete(self, names: Sequence[str]) -> None:
        """Forget adapters. A fused adapter stays fused (its record is kept so it can still be unfused)."""
        self.check_names(names, "delete_adapters")
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

    def follow(self, components: Mapping[str, nn.Module], *, reindex: bool = False) -> list[str]:
        """Serve these components from now on (a pipeline's component replaced after wrapping): the layers on a
        replaced module are handed back as they were loaded (unfused from it, hooks removed) and dropped from
        their adapters, as diffusers' adapters stay on the module they were loaded into; an adapter left with no
        layer is gone. ``reindex`` re-reads the module index (a module widened in place). Returns what changed.

        >>> rt.follow({"unet": new_unet, "text_encoder": pipe.text_encoder})     # doctest: +SKIP
        ['unet']
        """
        comps = {c: m for c, m in components.items() if c in COMPONENT_ORDER and isinstance(m, nn.Module)}
        old = self.view.components
        changed = [c for c in COMPONENT_ORDER if old.get(c) is not comps.get(c)]
        if changed:
            for component in changed:  # a static-mode (compiled) owner of the old module gives it its forwards back
                owner = self._layers.static.get(component)
                if owner is not None:
                    owner.close()
            gone = {k for cs in self._fused.values() for c, f in cs.items() if c in changed for k in f.deltas}
            if gone:  # (restored first, from the pristine copies the runtime holds: nothing left it cannot undo)
                kept = {n: {c: f for c, f in cs.items() if c not in changed} for n, cs in self._fused.items()}
                self._apply_fused({n: cs for n, cs in kept.items() if cs}, gone, safe=False)
            self.release_fuse_buffers()
            for name, bound in list(self.adapters.items()):
                keep = {k: layer for k, layer in bound.layers.items() if layer.component not in changed}
                if len(keep) < len(bound.layers):
                    self.adapters[name] = BoundAdapter(bound.adapter, keep, bound.report)
                    self._weights[name] = {k: w for k, w in self._weights[name].items() if k in keep}
                if not keep:
                    del self.adapters[name], self._weights[name], self._weight_specs[name]
            self.active = [n for n in self.active if n in self.adapters]
            for key, layer in list(self._layers.by_key.items()):
                if layer.component in changed:
                    layer.set_contributors(())
                    del self._layers.by_key[key]
        if changed or reindex:
            self.view = ModelView.of(comps)
            self._refresh(self._layers.by_key)
        return changed

    def move_adapters(self, names: Sequence[str], device: torch.device | str) -> None:
        """Move the stored tensors of ``names`` to ``device`` (blended terms stay on each module's device)."""
        self.check_names(names, "set_lora_device")
        for name in names:
            bound = self.adapters[name]
            layers = list(bound.layers.values())
            for layer, delta in zip(layers, deltas_to([layer.delta for layer in layers], device)):
                layer.delta = self._layers.by_key[layer.key].loaded[name] = delta

    # ----------------------------------------------------------------------------------- blending
    def set_adapters(self, names: Sequence[str], weights: Sequence[Any]) -> None:
        """Activate exactly ``names`` with one weight spec each (see ``resolve.layer_weights``)."""
        self.check_names(names, "set_adapters")
        if len(set(names)) != len(names):
            raise ValueError(f"set_adapters: adapter names repeat: {list(names)}")
        new = {n: layer_weights(w, self.adapters[n], self.view) for n, w in zip(names, weights)}
        # Same adapters, same order, zero on the same layers: every layer keeps its contributors, so only the
        # weights move. Bumping the version is all it takes (the layers refresh their weight vectors lazily,
        # all in one tensor operation), whatever the number of loaded adapters.
        same_blend = self.enabled and list(names) == self.active and all(
            _same_zeros(self._weight_specs[n], w, self._weights[n], new[n]) for n, w in zip(names, weights))
        touched = () if same_blend else {k for n in set(self.active) | set(names) for k in self.adapters[n].layers}
        for n, w in zip(names, weights):
            self._weights[n] = new[n]
            self._weight_specs[n] = w
        self._layers.version += 1
        if not same_blend:
            self.active = list(names)
            self._refresh(touched)

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = bool(enabled)
        self._refresh(self._layers.by_key)

    def _contributors(self, layer: LayerState) -> list[tuple[str, Delta]]:
        """``(name, delta)`` of the active, unfused adapters with a non-zero weight on this layer, by name: a mix
        is a set, and its blend gets the same bits whatever order ``set_adapters`` named it in (float sums depend on
        order, and a strong mix on a small model turned that into 0.85 of an 8-bit level)."""
        if not self.enabled:
            return []
        return [(name, delta) for name in sorted(self.active)
                if (delta := layer.loaded.get(name)) is not None
                and layer.component not in self._fused.get(name, {}) and self._weights[name][layer.key] != 0.0]

    def _refresh(self, keys: Iterable[str]) -> None:
        """Tell the layers of ``keys`` their contributors now and bump the version. Terms are rebuilt lazily, on a
        layer's next forward (or by ``prepare``): a run of set_adapters / fuse / unfuse calls costs one rebuild,
        not one per call, and a fused layer holds no term at all."""
        layers = self._layers.by_key
        for key in list(keys):
            layer = layers.get(key)
            if layer is None:
                continue
            layer.set_contributors(self._contributors(layer))
            if not layer.loaded and layer.pristine_weight is None and layer.handle is None:
                del layers[key]
        self._layers.version += 1

    def prepare(self) -> None:
        """Build every stale blended term now instead of on the first forward (e.g. before serving).

        >>> pipeline.prepare()                                     # doctest: +SKIP
        """
        if not self.keep_fuse_buffers:
            self.release_fuse_buffers()  # what a forward would free first
        self._layers.prepare()

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

    def sample_weight_blockers(self, names: Iterable[str]) -> list[str]:
        """The adapters among ``names`` that cannot take per-sample weights: a layer that is not one low-rank pair
        (LoHa, LoKr, full, a norm), that changes a bias, or that is a modulation table.

        >>> pipeline.runtime.sample_weight_blockers(["ink"])                  # doctest: +SKIP
        []
        """
        return [n for n in names if any(b.delta.low_rank_factors() is None or b.delta.changes_bias
                                        or isinstance(b.module, ModulationTable)  # (its owner reads a dense term)
                                        for b in self.adapters[n].layers.values())]

    @contextmanager
    def call_sample_weights(self, rows: Sequence[Mapping[str, float]]) -> Iterator[SampleWeights]:
        """Give each image of the calls inside the block its own mix: row ``b`` maps active adapters to a factor on
        their ``set_adapters`` weight for image ``b`` (absent: 0), so one batch holds different mixes (classifier-free
        guidance's doubled batch included); each image gets the terms of its own row, as its own call would.
        Yields the :class:`SampleWeights` (rewrite ``matrix`` and bump ``generation`` between steps for a schedule).
        Needs the active adapters unfused and low-rank (:meth:`sample_weight_blockers`): else ``ValueError`` naming
        the cause, nothing changed. A compiled denoiser takes them as data (``compiled.StaticDenoiser``: no recompile).

        >>> pipeline.set_adapters(["ink", "paper"], [1.0, 1.0])                # doctest: +SKIP
        >>> with pipeline.runtime.call_sample_weights([{"ink": 0.8}, {"paper": 0.5}]):   # doctest: +SKIP
        ...     images = pipeline(["a cat", "a dog"]).images
        """
        names = list(self.active)
        unknown = sorted({n for row in rows for n in row} - set(names))
        if unknown or not rows:
            raise ValueError(f"per-sample weights: {unknown or 'no rows'}; name only active adapters "
                             f"({names}: set_adapters first), one row per image")
        blockers = self.sample_weight_blockers(names)
        if blockers or self._fused:
            raise ValueError(f"per-sample weights need unfused low-rank adapters: {blockers or self.fused_names} "
                             "cannot; run those mixes apart")
        if not self._layers.low_rank_only:  # a pair costlier than its ΔW is kept low-rank from now on
            self._layers.low_rank_only = True
            self._layers.version += 1
        matrix = torch.tensor([[float(row.get(n, 0.0)) for n in names] for row in rows], dtype=torch.float32)
        samples = SampleWeights({n: i for i, n in enumerate(names)}, matrix)
        token = self._layers.sample_var.set(samples)
        try:
            yield samples
        finally:
            self._layers.sample_var.reset(token)

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
        self.check_names(names, "fuse_lora")
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
        def entries_of(fused: dict[str, dict[str, _Fused]], layer: LayerState) -> list[tuple[float, Delta]]:
            return [
                (f.coefs[layer.key], f.deltas[layer.key])
                for comps in fused.values()
                for comp, f in comps.items()
                if comp == layer.component and layer.key in f.deltas
            ]

        if self._layers.quantized_fuse_dtype is not None:  # (a float copy computes through its own forward, which
            static = [k for k in keys  # static mode has replaced: it would never run)
                      if self._layers.by_key[k].quant is not None and self._layers.by_key[k].component in self._layers.static]
            if static:
                raise ValueError(f"fuse_lora: {static[0]} is quantized and its component is compiled (static mode); a "
                                 "float-copy fuse (quantized_fuse_dtype) does not run there. Set quantized_fuse_dtype="
                                 "None (requantized fused weights work compiled), or close() the compiled denoiser first")
        written: list[tuple[LayerState, bool]] = []
        try:
            for key in keys:
                layer = self._layers.by_key[key]
                written.append((layer, layer.pristine_weight is not None))
                self._write_fused(layer, entries_of(state, layer), safe)
        except BaseException:
            for layer, was_fused in reversed(written):
                if was_fused:
                    self._write_fused(layer, entries_of(self._fused, layer), safe=False)
                else:
                    layer.undo_first_fuse()
            raise
        self._fused = state
        still_fused = {k for comps in state.values() for f in comps.values() for k in f.deltas}
        for key in keys:
            if key not in still_fused:  # the weight already equals the pristine copy: release it
                self._layers.by_key[key].release_pristine()
        self._refresh(keys)

    def _write_fused(self, layer: LayerState, entries: list[tuple[float, Delta]], safe: bool) -> None:
        """Have ``layer`` write its fused weight (``LayerState.write_fused``) with this runtime's backup place
        and spare tensors; a fused tensor the layer lets go of is kept as a spare for the next fuse."""
        freed = layer.write_fused(entries, safe=safe, pristine_device=self.pristine_device, spares=self._spare)
        if freed is not None:
            self._hold_spare(layer, freed)
