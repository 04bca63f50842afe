"""Adapter × live model -> bound layers, and user weight specs -> one weight per bound layer.

Nothing here changes a model. ``bind_adapter`` checks a whole adapter against the live module tree
(family, module exists, is a Linear/Conv2d, shapes fit, values finite) and either returns every layer bound
or raises one ``LoraCompatibilityError`` that names the first offending keys; with ``strict=False`` it binds
what fits and reports the rest. ``layer_weights`` turns a ``set_adapters`` weight (a float, a per-component
dict, diffusers' per-block dict, or A1111 block labels) into a float for each layer of an adapter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

from ..adapter import Adapter, Delta
from ..errors import LoraCompatibilityError
from ..io import all_finite
from .model_view import COMPONENT_ORDER, ModelView
from ..naming import TEXT_COMPONENTS, expand_block_weights
from ..quant import weight_shape  # (a quantized linear: its logical out × in, not its packed bytes)
from ..report import LoadReport



@dataclass(eq=False)
class BoundLayer:
    """One delta bound to one live module: ``key`` is the canonical target key."""

    key: str
    component: str
    module: nn.Module
    delta: Delta

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d)


@dataclass(eq=False)
class BoundAdapter:
    """An adapter whose layers are all bound to modules of one live model."""

    adapter: Adapter
    layers: dict[str, BoundLayer]
    report: LoadReport = field(default_factory=LoadReport)

    @property
    def name(self) -> str:
        return self.adapter.name

    def components(self) -> list[str]:
        present = {layer.component for layer in self.layers.values()}
        return [c for c in COMPONENT_ORDER if c in present]


def _module_problem(delta: Delta, module: nn.Module) -> str | None:
    """Why ``delta`` cannot apply to this live module beyond its weight shape (None when it can): what only the
    module can tell, not the module index that ``load_adapter`` checks shapes against."""
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
        return f"conv with groups={module.groups}, padding_mode={module.padding_mode!r} is not supported"
    if delta.changes_bias and module.bias is None:
        return "the delta changes a bias but the module has none"
    return None


def _finite(delta: Delta) -> bool:
    return all(all_finite(t) for t in delta.tensors() if t.is_floating_point())


def _family_problem(adapter: Adapter, model_family: str | None) -> str | None:
    if model_family is None or adapter.family == model_family:
        return None
    xl = {adapter.family == "sdxl", model_family == "sdxl"}
    if len(xl) == 2:  # SDXL against SD1/SD2: different architectures, never a fit
        return f"adapter {adapter.name!r} is a {adapter.family} LoRA but the pipeline is {model_family}"
    return None  # sd1 vs sd2 share the module tree; the shape checks decide (attn2 widths differ)


def bind_adapter(adapter: Adapter, view: ModelView, *, strict: bool = True, checked: bool = False) -> BoundAdapter:
    """Bind every delta of ``adapter`` to a module of the live model, or raise before anything changes.

    Returns a ``BoundAdapter`` whose ``report`` accounts for every source key (the adapter's own report,
    with keys whose layer could not be bound turned into ``unknown``/``unsupported`` with the reason).
    ``checked=True`` says the adapter is what ``load_adapter(source, target=view.index)`` returned: its keys
    are already ``view``'s target keys, every delta fits its weight's shape and every value is finite, so
    binding only looks each module up by its key and checks what only the live module can tell (conv groups,
    padding mode, a bias to change). Any other adapter (built in memory, merged, read for another target) is
    checked in full here: name, shape, finite values.

    >>> bound = bind_adapter(adapter, ModelView.of({"unet": pipe.unet}))      # doctest: +SKIP
    >>> len(bound.layers)                                                     # doctest: +SKIP
    64
    """
    problem = _family_problem(adapter, view.family)
    if problem:
        raise LoraCompatibilityError(f"{problem}; load a LoRA made for {view.family} (nothing was changed)")
    layers: dict[str, BoundLayer] = {}
    skipped: dict[str, tuple[str, str]] = {}  # source target key -> (status, reason)
    for key, delta in adapter.deltas.items():
        component, _, path = key.partition(".")
        if component not in view.components:
            skipped[key] = ("unknown", f"the pipeline has no {component!r} (it has {sorted(view.components)})")
            continue
        canonical = key if checked else view.index.lookup(component, path)
        if canonical is None:
            skipped[key] = ("unknown", f"no Linear/Conv2d named {path!r} in {component}")
            continue
        module = view.module(canonical)
        reason = _module_problem(delta, module) or (None if checked else delta.fit_problem(weight_shape(module)))
        if reason:
            skipped[key] = ("unsupported", reason)
            continue
        if not checked and not _finite(delta):
            skipped[key] = ("unsupported", "NaN or Inf in the adapter's tensors")
            continue
        if canonical in layers:
            skipped[key] = ("unsupported", f"a second delta for {canonical}")
            continue
        layers[canonical] = BoundLayer(canonical, component, module, delta)

    source_problems = [r for r in adapter.report.records if r.status != "mapped"]
    if strict and (skipped or source_problems):
        lines = [f"  {k}: {why}" for k, (_, why) in list(skipped.items())[:5]]
        lines += [f"  {r.key}: {r.status}{' (' + r.reason + ')' if r.reason else ''}" for r in source_problems[:5]]
        total = len(skipped) + len(source_problems)
        more = f"\n  … and {total - len(lines)} more" if total > len(lines) else ""
        raise LoraCompatibilityError(
            f"adapter {adapter.name!r} does not fit this {view.family} pipeline: {total} key(s) cannot be applied:\n"
            + "\n".join(lines)
            + more
            + "\nNothing was changed. Pass strict=False to apply the layers that fit and get the report of the rest."
        )
    if not layers:
        raise LoraCompatibilityError(
            f"adapter {adapter.name!r} has no layer that fits this {view.family} pipeline "
            f"({len(adapter.deltas)} deltas, none bound); nothing was changed"
        )
    return BoundAdapter(adapter, layers, _bound_report(adapter, skipped))


def _bound_report(adapter: Adapter, skipped: dict[str, tuple[str, str]]) -> LoadReport:
    src = adapter.report
    report = LoadReport(source=src.source, format=src.format or adapter.format)
    if not src.records:  # built in memory: account for target keys instead
        for key in adapter.deltas:
            status, reason = skipped.get(key, ("mapped", ""))
            report.add(key, status, key if status == "mapped" else None, reason)
        return report
    for rec in src.records:
        if rec.status == "mapped" and rec.target in skipped:
            status, reason = skipped[rec.target]
            report.add(rec.key, status, None, reason)
        else:
            report.add(rec.key, rec.status, rec.target, rec.reason)
    return report
