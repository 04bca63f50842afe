"""User weight specs -> one weight per bound layer.

``layer_weights`` turns a ``set_adapters`` weight (a float, a per-component dict, diffusers' per-block dict, or
A1111 / DiT block labels) into a float for each layer of a bound adapter. Nothing here changes a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from torch import nn

from ..errors import LoraCompatibilityError
from ..naming import DENOISER_COMPONENTS, TEXT_COMPONENTS, denoiser_component, expand_block_weights
from .binding import BoundAdapter
from .model_view import COMPONENT_ORDER, ModelView

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
    for comp in TEXT_COMPONENTS:
        if comp in comp_spec:
            comp_spec[comp] = _check_number(comp_spec[comp], f"weight of {comp}")
    main = denoiser_component(components) or "unet"
    denoisers = {d: _DenoiserWeights.of(d, comp_spec.get(d), label_spec, view)
                 for d in DENOISER_COMPONENTS if d in components}
    # text encoders: their BASE label, given at the top level or (as ever) in the main denoiser's label dict
    base = {**label_spec, **(denoisers[main].labels if main in denoisers else {})}.get("BASE")

    out: dict[str, float] = {}
    for key, layer in bound.layers.items():
        if layer.component in denoisers:
            out[key] = denoisers[layer.component].weight(key, view)
        elif layer.component in comp_spec:
            out[key] = comp_spec[layer.component]
        else:
            out[key] = 1.0 if base is None else _check_number(base, "block BASE")
    return out


@dataclass(frozen=True)
class _DenoiserWeights:
    """One denoiser's weights (a pipeline can have two: Wan 2.2 A14B's experts ``transformer`` /
    ``transformer_2``): its default, its block labels (the top-level ones, then those given under its name), and
    diffusers' per-block dict for a UNet."""

    component: str
    default: float
    labels: dict[str, Any]
    expanded: dict[str, float]
    diffusers_blocks: Mapping[str, Any] | None = None

    @classmethod
    def of(cls, component: str, spec: Any, top_labels: Mapping[str, Any], view: ModelView) -> "_DenoiserWeights":
        labels, blocks = dict(top_labels), None
        if isinstance(spec, Mapping):
            if component == "unet" and any(k in _DIFFUSERS_SECTIONS for k in spec):
                _validate_diffusers_blocks(spec, view.components["unet"])
                blocks = spec
            else:
                labels.update(spec)
            spec = None
        default = 1.0 if spec is None else _check_number(spec, f"weight of {component}")
        expanded = (expand_block_weights({k: _check_number(v, f"block {k}") for k, v in labels.items()},
                                         view.family or "sd1", view.index.block_labels()) if labels else {})
        return cls(component, default, labels, expanded, blocks)

    def weight(self, key: str, view: ModelView) -> float:
        label = view.index.block(key)
        if label in self.labels:
            return self.expanded[label]
        if self.diffusers_blocks is not None:
            b = _diffusers_block_weight(self.diffusers_blocks, key.split(".", 1)[1], view.components["unet"])
            return self.default if b is None else b
        return self.default
