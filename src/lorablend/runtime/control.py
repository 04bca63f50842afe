"""Flux control LoRAs (FLUX.1 Depth / Canny as LoRAs): they widen ``transformer.x_embedder`` to read the control
image's latents beside the noise. On a control pipeline (``FluxControlPipeline`` and its img2img / inpaint kin)
the layer is widened once, with zero weights for the new inputs — so the base model's output is unchanged until the
LoRA is applied, as diffusers does it — and the transformer's ``in_channels`` follows; a plain pipeline refuses
the LoRA before anything changes, because it never feeds a control image.

>>> widen_for_control(pipe, adapter, view)                          # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import LoraCompatibilityError


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
        with torch.no_grad():
            weight = module.weight
            wide = torch.zeros(weight.shape[0], width, dtype=weight.dtype, device=weight.device)
            wide[:, : weight.shape[1]] = weight
            module.weight = torch.nn.Parameter(wide, requires_grad=weight.requires_grad)
            module.in_features = width
    transformer = getattr(pipe, "transformer", None)
    if todo and transformer is not None and any(k.endswith(".x_embedder") for k, _, _ in todo):
        width = max(w for k, _, w in todo if k.endswith(".x_embedder"))
        transformer.register_to_config(in_channels=width)  # the pipeline sizes its latents from this
    return [k for k, _, _ in todo]


__all__ = ["widen_for_control"]
