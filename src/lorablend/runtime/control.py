"""Parameters a LoRA file overwrites rather than adds to, as diffusers' Flux loader does it, and their way back.

* Flux control LoRAs (FLUX.1 Depth / Canny as LoRAs) widen ``transformer.x_embedder`` to read the control image's
  latents beside the noise. On a control pipeline (``FluxControlPipeline`` and its img2img / inpaint kin) the layer
  is widened once, with zero weights for the new inputs — so the base model's output is unchanged until the LoRA is
  applied — and the transformer's ``in_channels`` follows; a plain pipeline refuses the LoRA before anything
  changes, because it never feeds a control image. ``unload_lora_weights(reset_to_overwritten_params=True)`` puts
  the original module width, weight tensor and config back (:func:`restore_overwritten`).
* Norm replacements: a diffusers-format Flux state dict may carry ``…norm_q.weight`` / ``norm_k`` /
  ``norm_added_q`` / ``norm_added_k`` (control LoRAs do): those weights are replaced at load
  (:func:`replace_norms`) and the originals put back, bit for bit, on unload.

The originals live on the component module itself (``_lorablend_overwritten``, as diffusers keeps
``_overwritten_params`` there): every wrapper of a pipeline holding that module finds them, and a copy of the
module carries its own.

>>> widen_for_control(pipe, adapter, view)                          # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..errors import LoraCompatibilityError

_RECORD = "_lorablend_overwritten"


def _record(component: nn.Module) -> dict[str, dict]:
    """The originals of what was overwritten on ``component``: ``widened`` {path: (weight, in_features)},
    ``config`` {field: value}, ``norms`` {path: weight tensor}; created on first use."""
    record = component.__dict__.get(_RECORD)
    if record is None:
        record = {"widened": {}, "config": {}, "norms": {}}
        component.__dict__[_RECORD] = record
    return record


def overwritten(component: nn.Module) -> dict[str, dict]:
    """What is overwritten on ``component`` now (empty dicts when nothing is).

    >>> overwritten(torch.nn.Linear(2, 2))
    {'widened': {}, 'config': {}, 'norms': {}}
    """
    return component.__dict__.get(_RECORD) or {"widened": {}, "config": {}, "norms": {}}


def widen_for_control(pipe: Any, adapter: Any, view: Any, *, busy: set[str] = frozenset()) -> list[str]:
    """Make the modules ``adapter.widened_inputs`` names as wide as it reads, on a control pipeline; refuse it
    on any other, or when a module to widen is ``busy`` (other adapters loaded or fused on it at its width).
    Returns the keys widened (none when they already were).

    >>> widen_for_control(flux_control_pipe, depth_lora, lorablend_pipe.model_view)   # doctest: +SKIP
    ['transformer.x_embedder']
    """
    if not adapter.needs_control:
        return []
    widths = ", ".join(f"{k} to {w} inputs" for k, w in adapter.widened_inputs.items())
    if "Control" not in type(pipe).__name__:
        raise LoraCompatibilityError(
            f"adapter {adapter.name!r} is a Flux control LoRA (it widens {widths} for the control image's "
            f"latents) and {type(pipe).__name__} feeds no control image: load it on a control pipeline, e.g. "
            f"diffusers.FluxControlPipeline.from_pipe(pipe), and pass control_image= when generating"
        )
    todo = []
    for key, width in adapter.widened_inputs.items():
        module = view.module(key)
        if not isinstance(module, torch.nn.Linear):
            raise LoraCompatibilityError(f"adapter {adapter.name!r} widens {key}, which is a "
                                         f"{type(module).__name__}, not a Linear")
        if module.in_features < width:
            if key in busy:
                raise LoraCompatibilityError(
                    f"adapter {adapter.name!r} widens {key} to {width} inputs, and other adapters are loaded or "
                    f"fused on it at {module.in_features}: unload / unfuse them first")
            todo.append((key, module, width))
    for key, module, width in todo:  # (checked all first: nothing changes on a refusal)
        component, path = key.split(".", 1)
        _record(view.components[component])["widened"].setdefault(path, (module.weight, module.in_features))
        with torch.no_grad():
            weight = module.weight
            wide = torch.zeros(weight.shape[0], width, dtype=weight.dtype, device=weight.device)
            wide[:, : weight.shape[1]] = weight
            module.weight = torch.nn.Parameter(wide, requires_grad=weight.requires_grad)
            module.in_features = width
    transformer = getattr(pipe, "transformer", None)
    if todo and transformer is not None and any(k.endswith(".x_embedder") for k, _, _ in todo):
        width = max(w for k, _, w in todo if k.endswith(".x_embedder"))
        _record(transformer)["config"].setdefault("in_channels", transformer.config.in_channels)
        transformer.register_to_config(in_channels=width)  # the pipeline sizes its latents from this
    return [k for k, _, _ in todo]


def unwiden(components: Mapping[str, nn.Module], keys: list[str]) -> None:
    """Undo a widening just made for ``keys`` (the load that asked for it failed after it): each module's original
    tensor and width back, and the config field that followed.

    >>> unwiden({"transformer": pipe.transformer}, ["transformer.x_embedder"])     # doctest: +SKIP
    """
    for key in keys:
        component, path = key.split(".", 1)
        record = _record(components[component])
        module = components[component].get_submodule(path)
        module.weight, module.in_features = record["widened"].pop(path)
        if path == "x_embedder" and "in_channels" in record["config"]:
            components[component].register_to_config(in_channels=record["config"].pop("in_channels"))


def replace_norms(components: Mapping[str, nn.Module], weights: Mapping[str, torch.Tensor]) -> None:
    """Copy ``weights`` ({target key: new weight}) into those norms of ``components``, keeping each original the
    first time (a second replacement of one norm still goes back to the model's own weight on unload). Checked
    first: a missing module or another shape changes nothing.

    >>> replace_norms({"transformer": pipe.transformer}, {"transformer.transformer_blocks.0.attn.norm_q": torch.ones(16)})   # doctest: +SKIP
    """
    for key, value in weights.items():
        component, path = key.split(".", 1)
        weight = getattr(components[component].get_submodule(path), "weight", None)
        if weight is None or tuple(weight.shape) != tuple(value.shape):
            raise LoraCompatibilityError(f"cannot replace the weight of {path}: it is "
                                         f"{None if weight is None else tuple(weight.shape)}, the file's is "
                                         f"{tuple(value.shape)} (nothing was changed)")
    with torch.no_grad():
        for key, value in weights.items():
            component, path = key.split(".", 1)
            weight = components[component].get_submodule(path).weight
            _record(components[component])["norms"].setdefault(path, weight.detach().clone())
            weight.copy_(value)


def restore_overwritten(component: nn.Module, *, widened: bool) -> list[str]:
    """Put back the norms replaced on ``component``, and with ``widened`` the modules widened for a control LoRA
    (their original weight tensor and width) and the config fields that followed. Returns the module paths
    restored.

    >>> restore_overwritten(pipe.transformer, widened=True)                  # doctest: +SKIP
    ['transformer_blocks.0.attn.norm_q', 'x_embedder']
    """
    record = component.__dict__.get(_RECORD)
    if record is None:
        return []
    done = []
    with torch.no_grad():
        for path, original in record["norms"].items():
            component.get_submodule(path).weight.copy_(original)
            done.append(path)
    record["norms"] = {}
    if widened:
        for path, (weight, in_features) in record["widened"].items():
            module = component.get_submodule(path)
            module.weight, module.in_features = weight, in_features
            done.append(path)
        if record["config"]:
            component.register_to_config(**record["config"])
        record["widened"], record["config"] = {}, {}
    return done


__all__ = ["overwritten", "replace_norms", "restore_overwritten", "unwiden", "widen_for_control"]
