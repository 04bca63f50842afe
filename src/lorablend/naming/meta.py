"""UNet + CLIP text encoders built on the meta device: a model's module tree and weight shapes, no storage.

Used wherever names and shapes are needed without weights: the standard families' data
(:func:`~lorablend.naming.standard.build_standard_index`) and a single-file checkpoint's layout
(:mod:`lorablend.checkpoint`). Imports diffusers and transformers (seconds), so only when called.

>>> comps = build_meta_components(unet_config, [("text_encoder", clip_config, False)])   # doctest: +SKIP
>>> comps["unet"].conv_in.weight.device                                                   # doctest: +SKIP
device(type='meta')
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .index import TEXT_COMPONENTS

TextEncoderSpec = tuple[str, dict[str, Any], bool]  # (component, CLIPTextConfig fields, with text projection)


def build_meta_components(unet_config: dict[str, Any], text_encoders: Iterable[TextEncoderSpec]) -> dict[str, nn.Module]:
    """``{"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel, ...}`` on the meta device.

    ``text_encoders``: ``(component, config fields, with_projection)``; ``with_projection`` builds
    ``CLIPTextModelWithProjection`` (SDXL's second encoder), else ``CLIPTextModel``.

    >>> build_meta_components(SD1_UNET, [("text_encoder", CLIP_L, False)])["unet"].dtype    # doctest: +SKIP
    torch.float32
    """
    # Imported here, not at module level: these imports take seconds and offline work never builds a model.
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        components: dict[str, nn.Module] = {"unet": UNet2DConditionModel.from_config(unet_config)}
        for component, cfg, with_projection in text_encoders:
            cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
            components[component] = cls(CLIPTextConfig(**cfg))
    return components


def folder_meta_components(folder: str | os.PathLike) -> dict[str, nn.Module] | None:
    """The adaptable components of a diffusers pipeline folder on the meta device, from its ``config.json``
    files alone (no weight is read): what a LoRA can be checked against before the model is loaded. ``None``
    when the folder holds no UNet config (a hub id, or another kind of model).

    >>> folder_meta_components("/nonexistent") is None
    True
    """
    root = Path(folder)
    unet_file = root / "unet" / "config.json"
    if not unet_file.is_file():
        return None
    text_encoders = []
    for component in TEXT_COMPONENTS:
        cfg_file = root / component / "config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            with_projection = "CLIPTextModelWithProjection" in (cfg.get("architectures") or [])
            text_encoders.append((component, cfg, with_projection))
    return build_meta_components(json.loads(unet_file.read_text()), text_encoders)


__all__ = ["TextEncoderSpec", "build_meta_components", "folder_meta_components"]
