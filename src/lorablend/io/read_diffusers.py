"""diffusers / PEFT LoRA files: sort every key into a module and a role.

Spellings read (``C`` is a component: ``unet.``, ``transformer.``, ``text_encoder.``, ``text_encoder_2.``,
``text_encoder_3.``, or nothing; PEFT's ``base_model.model.`` is dropped; a PEFT adapter name such as
``lora_A.default.weight`` is allowed):

* PEFT: ``C<module>.lora_A.weight`` / ``.lora_B.weight`` (+ ``.lora_B.bias`` with ``lora_bias=True``, applied),
  DoRA ``C<module>.lora_magnitude_vector``;
* diffusers >= 0.21: ``C<module>.lora.down.weight`` / ``.lora.up.weight``;
* attention processors: ``C<attn>.processor.to_q_lora.down.weight`` (``to_k``, ``to_v``, ``to_out``; also without
  ``.processor``), on text encoders meaning ``q_proj`` … ``out_proj``;
* text encoders: ``C<module>.lora_linear_layer.down.weight`` / ``.up.weight``;
* ``C<attn>.norm_q.weight`` (``norm_k``, ``norm_added_q``, ``norm_added_k``): a whole new weight for that norm
  (diffusers' Flux loader reads these beside or without LoRA keys, as control LoRAs carry them), role ``replace``;
* ``C<module>.alpha`` (kohya-converted files; PEFT's ``network_alphas``), ``C<module>.lora_A.weight.alpha`` (some Flux
  trainers; a 0-d tensor, or a number in a dict);

Alpha when a module has no ``.alpha`` key: the ``lora_adapter_metadata`` JSON in the safetensors header
(diffusers writes it flattened per component, ``{"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {…}}``;
a model-level save writes it unprefixed; a nested ``{"unet": {…}}`` is read too), else none (scale 1, PEFT's
rule for files without alphas). rsLoRA (``use_rslora``) is folded into the alpha so ``alpha/rank`` is exact.

>>> import torch
>>> groups, leftovers = parse_diffusers({"unet.a.to_q.lora_A.weight": torch.zeros(2, 3),
...                                      "unet.a.to_q.lora_B.weight": torch.zeros(3, 2)}, {})
>>> groups[0].parts, groups[0].lookup
({'down': 'unet.a.to_q.lora_A.weight', 'up': 'unet.a.to_q.lora_B.weight'}, ('dotted', (('unet', 'a.to_q'),)))
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

import torch

from ..naming import COMPONENTS  # the one component list
from .deltas import ModuleGroup

METADATA_KEY = "lora_adapter_metadata"

_ADAPTER = r"(?:\.(?P<adapter>[^.]+))?"
_PATTERNS: list[tuple[re.Pattern, str]] = [
    (re.compile(rf"^(?P<mod>.+)\.lora_A{_ADAPTER}\.weight$"), "down"),
    (re.compile(rf"^(?P<mod>.+)\.lora_B{_ADAPTER}\.weight$"), "up"),
    (re.compile(rf"^(?P<mod>.+)\.lora_B{_ADAPTER}\.bias$"), "up_bias"),
    (re.compile(r"^(?P<mod>.+)\.lora\.(?P<ud>down|up)\.weight$"), "ud"),
    (re.compile(r"^(?P<mod>.+)\.lora_linear_layer\.(?P<ud>down|up)\.weight$"), "ud"),
    (re.compile(r"^(?P<parent>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<ud>down|up)\.weight$"), "proc"),
    (re.compile(rf"^(?P<mod>.+)\.lora_magnitude_vector{_ADAPTER}(?:\.weight)?$"), "magnitude"),
    (re.compile(rf"^(?P<mod>.+)\.lora_A{_ADAPTER}\.weight\.alpha$"), "alpha"),  # some Flux trainers' spelling
    (re.compile(r"^(?P<mod>.+)\.alpha$"), "alpha"),
    (re.compile(r"^(?P<mod>.+\.(?:norm_q|norm_k|norm_added_q|norm_added_k))\.weight$"), "replace"),
]
_TEXT_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_UNET_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}


def is_diffusers_key(key: str) -> bool:
    """True for a key spelled in one of the diffusers / PEFT LoRA conventions above."""
    _, rest = _split_component(key)
    return any(p.match(rest) for p, role in _PATTERNS if role != "alpha") or (
        key.split(".", 1)[0] in COMPONENTS and key.endswith(".alpha")
    )


def _split_component(key: str) -> tuple[str | None, str]:
    if key.startswith("base_model.model."):
        key = key[len("base_model.model."):]
    head, _, rest = key.partition(".")
    if head in COMPONENTS and rest:
        return head, rest
    return None, key


def _candidates(component: str | None, module: str) -> tuple[tuple[str, str], ...]:
    """Where a module may live: an un-prefixed path is tried as a UNet path, a transformer path, then a
    text-encoder path. diffusers once wrote ``to_out`` for the attention output, which is ``to_out.0`` in the
    module tree."""
    comps = (component,) if component else ("unet", "transformer", "text_encoder")
    out: list[tuple[str, str]] = []
    for comp in comps:
        out.append((comp, module))
        if comp == "unet" and module.endswith(".to_out"):
            out.append((comp, module + ".0"))
    return tuple(out)


def _proc_candidates(component: str | None, parent: str, proj: str) -> tuple[tuple[str, str], ...]:
    comps = (component,) if component else ("unet", "text_encoder")
    return tuple(
        (comp, f"{parent}.{(_UNET_PROJ if comp == 'unet' else _TEXT_PROJ)[proj]}") for comp in comps
    )


def parse_diffusers(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> tuple[list[ModuleGroup], list[tuple[str, str, str]]]:
    """Group diffusers / PEFT keys by module. Returns the groups and the keys that belong to no module as
    ``(key, status, reason)``."""
    groups: dict[tuple, ModuleGroup] = {}
    leftovers: list[tuple[str, str, str]] = []
    for key in tensors:
        component, rest = _split_component(key)
        for pattern, role in _PATTERNS:
            m = pattern.match(rest)
            if m:
                break
        else:
            leftovers.append((key, "unknown", "not a diffusers/PEFT LoRA key (expected …lora_A.weight, "
                              "…lora.down.weight, …to_q_lora.down.weight, …lora_linear_layer.down.weight or …alpha)"))
            continue
        if role == "proc":
            lookup = _proc_candidates(component, m["parent"], m["proj"])
            role = m["ud"]
        else:
            lookup = _candidates(component, m["mod"])
            if role == "ud":
                role = m["ud"]
        group = groups.get(lookup)
        if group is None:
            comp_name = component or "(no component prefix)"
            group = groups[lookup] = ModuleGroup(
                name=f"{comp_name}: {lookup[0][1]}", parts={}, lookup=("dotted", lookup), magnitude_source="peft"
            )
        if role in group.parts:
            leftovers.append((key, "unsupported", f"a second {role} tensor for {group.name} "
                              f"(already given by {group.parts[role]!r}); the file is ambiguous"))
            continue
        group.parts[role] = key
        group.keys.append(key)
    out = list(groups.values())
    _apply_metadata_alphas(out, tensors, metadata)
    return out, leftovers


def component_configs(metadata: Mapping[str, str]) -> dict[str | None, dict[str, Any]]:
    """The per-component LoRA configs in a diffusers ``lora_adapter_metadata`` header entry.

    >>> component_configs({"lora_adapter_metadata": '{"unet.r": 4, "unet.lora_alpha": 8}'})
    {'unet': {'r': 4, 'lora_alpha': 8}}
    """
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    if not isinstance(data, dict):
        return {}
    configs: dict[str | None, dict[str, Any]] = {}
    for key, value in data.items():
        head, _, field_name = key.partition(".")
        if head in COMPONENTS and field_name:
            configs.setdefault(head, {})[field_name] = value
        elif key in COMPONENTS and isinstance(value, dict):
            configs.setdefault(key, {}).update(value)
        else:
            configs.setdefault(None, {})[key] = value
    return configs


def _pattern_value(patterns: Mapping[str, Any], paths: list[str]) -> Any:
    # PEFT's get_pattern_key: the first pattern that matches the end of the module name
    for pattern, value in patterns.items():
        for path in paths:
            try:
                if re.match(rf"(.*\.)?({pattern})$", path):
                    return value
            except re.error:
                if path == pattern or path.endswith("." + pattern):
                    return value
    return None


def _apply_metadata_alphas(groups: list[ModuleGroup], tensors: Mapping[str, torch.Tensor],
                           metadata: Mapping[str, str]) -> None:
    configs = component_configs(metadata)
    if not configs:
        return
    for group in groups:
        if "alpha" in group.parts or "down" not in group.parts:
            continue
        comp, path = group.lookup[1][0]
        cfg = configs.get(comp) or configs.get(None)
        if not cfg or cfg.get("lora_alpha") is None:
            continue
        paths = [path, path[len("text_model."):]] if path.startswith("text_model.") else [path]
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, paths)
        if alpha is None:
            alpha = cfg["lora_alpha"]
        rank = int(tensors[group.parts["down"]].shape[0])
        if cfg.get("use_rslora"):
            alpha = float(alpha) * math.sqrt(rank)  # scale alpha/sqrt(r) == (alpha·sqrt(r)) / r
        group.alpha = float(alpha)
