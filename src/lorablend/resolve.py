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

from .adapter import Adapter, Delta
from .errors import LoraCompatibilityError
from .io import all_finite
from .model_view import COMPONENT_ORDER, ModelView  # (ModelView's old home: kept importable from here)
from .naming import TEXT_COMPONENTS, expand_block_weights
from .report import LoadReport



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
        reason = _module_problem(delta, module) or (None if checked else delta.fit_problem(tuple(module.weight.shape)))
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


# --------------------------------------------------------------------------------------------- weights

_DIFFUSERS_SECTIONS = ("down", "mid", "up")


def _diffusers_block_of(path: str) -> tuple[str, int, int | None] | None:
    """(section, block, layer) of a UNet module path; samplers belong to their block's last layer."""
    parts = path.split(".")
    if parts[0] == "mid_block":
        return ("mid", 0, None)
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 3:
        section = "down" if parts[0] == "down_blocks" else "up"
        block = int(parts[1])
        if parts[2] in ("attentions", "resnets"):
            return (section, block, int(parts[3]))
        return (section, block, -1)  # downsamplers / upsamplers: the block's last layer
    return None


def _check_number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{where}: weight must be finite, got {value!r}")
    return float(value)


def _diffusers_block_weight(spec: Mapping[str, Any], path: str, unet: nn.Module) -> float | None:
    where = _diffusers_block_of(path)
    if where is None:
        return None
    section, block, layer = where
    value = spec.get(section)
    if value is None:
        return None
    if section == "mid":
        return _check_number(value, "unet block weight 'mid'")
    if not isinstance(value, Mapping):
        return _check_number(value, f"unet block weight {section!r}")
    value = value.get(f"block_{block}")
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        blocks = unet.down_blocks if section == "down" else unet.up_blocks
        n_layers = len(blocks[block].resnets)
        if len(value) != n_layers:
            raise ValueError(
                f"unet weight {section}.block_{block} lists {len(value)} values but that block has "
                f"{n_layers} layers (resnet + attention pairs); give {n_layers} values or one number"
            )
        return _check_number(value[layer], f"unet weight {section}.block_{block}[{layer}]")
    return _check_number(value, f"unet weight {section}.block_{block}")


def _validate_diffusers_blocks(spec: Mapping[str, Any], unet: nn.Module) -> None:
    unknown = [k for k in spec if k not in _DIFFUSERS_SECTIONS]
    if unknown:
        raise ValueError(f"unknown unet block key(s) {unknown}; use 'down', 'mid', 'up' or block labels like 'IN04'")
    for section in ("down", "up"):
        value = spec.get(section)
        if isinstance(value, Mapping):
            blocks = unet.down_blocks if section == "down" else unet.up_blocks
            valid = [f"block_{i}" for i in range(len(blocks))]
            bad = [k for k in value if k not in valid]
            if bad:
                raise ValueError(f"unet weight {section!r} names {bad}; this UNet has {valid}")


def layer_weights(spec: Any, bound: BoundAdapter, view: ModelView) -> dict[str, float]:
    """One float per bound layer of ``bound`` from a ``set_adapters`` weight spec.

    ``spec`` is ``None`` (1.0), a number, or a dict with any of:
    ``"unet"``: a number, diffusers' block dict ``{"down": x | {"block_1": x | [x, ...]}, "mid": x, "up": ...}``,
    or block labels ``{"IN04": x, "OUT02": y}``; ``"text_encoder"`` / ``"text_encoder_2"``: a number;
    block labels at the top level (``"BASE"``, ``"IN00"``…, ``"M00"``, ``"OUT00"``…, ``"TIME"``, ``"FINAL"``).
    A block weight covers every layer of that block — resnets, attentions and samplers. Unnamed parts keep 1.0.

    >>> layer_weights({"unet": {"down": 0.5}, "text_encoder": 0.0}, bound, view)   # doctest: +SKIP
    """
    if spec is None:
        return dict.fromkeys(bound.layers, 1.0)
    if not isinstance(spec, Mapping):
        return dict.fromkeys(bound.layers, _check_number(spec, f"weight of adapter {bound.name!r}"))

    labels_known = view.index.block_labels()
    components = set(view.components)
    label_spec: dict[str, Any] = {}
    comp_spec: dict[str, Any] = {}
    for key, value in spec.items():
        if key in COMPONENT_ORDER:
            if key not in components:
                raise ValueError(
                    f"weight for {key!r} but this pipeline's components are {sorted(components)}"
                )
            comp_spec[key] = value
        elif key in labels_known:
            label_spec[key] = value
        else:
            raise ValueError(
                f"unknown weight key {key!r} for adapter {bound.name!r}; use components {sorted(components)} "
                f"or block labels {labels_known}"
            )
    denoiser = "transformer" if "transformer" in components else "unet"  # (Flux / SD3 vs SD1.x / SDXL)
    unet_spec = comp_spec.get(denoiser)
    diffusers_blocks: Mapping[str, Any] | None = None
    if isinstance(unet_spec, Mapping):
        if denoiser == "unet" and any(k in _DIFFUSERS_SECTIONS for k in unet_spec):
            _validate_diffusers_blocks(unet_spec, view.components["unet"])
            diffusers_blocks = unet_spec
        else:
            label_spec.update(unet_spec)
        unet_spec = None
    for comp in TEXT_COMPONENTS:
        if comp in comp_spec:
            comp_spec[comp] = _check_number(comp_spec[comp], f"weight of {comp}")
    unet_default = 1.0 if unet_spec is None else _check_number(unet_spec, f"weight of {denoiser}")
    labels = (
        expand_block_weights({k: _check_number(v, f"block {k}") for k, v in label_spec.items()},
                             view.family or "sd1", labels_known)
        if label_spec
        else {}
    )

    out: dict[str, float] = {}
    for key, layer in bound.layers.items():
        label = view.index.block(key)
        if layer.component == denoiser:
            w = unet_default
            if diffusers_blocks is not None:
                b = _diffusers_block_weight(diffusers_blocks, key.split(".", 1)[1], view.components["unet"])
                w = w if b is None else b
            if label in label_spec:
                w = labels[label]
        else:
            if layer.component in comp_spec:
                w = comp_spec[layer.component]
            elif "BASE" in label_spec:
                w = labels["BASE"]
            else:
                w = 1.0
        out[key] = w
    return out
