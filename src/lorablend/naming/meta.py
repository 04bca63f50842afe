"""A denoiser (UNet, Flux or SD3 transformer) + text encoders (CLIP, T5) built on the meta device: a model's module
tree and weight shapes, no storage.

Used wherever names and shapes are needed without weights: the standard families' data
(:func:`~lorablend.naming.standard.build_standard_index`) and a single-file checkpoint's layout
(:mod:`lorablend.offline.checkpoint`). Imports diffusers and transformers (seconds), so only when called.

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

from .configs import DENOISER_CLASSES
from .index import TEXT_COMPONENTS

# (component, config fields, encoder): encoder False builds CLIPTextModel, True CLIPTextModelWithProjection (SDXL's
# and SD3's CLIP encoders), "t5" T5EncoderModel (Flux's text_encoder_2, SD3's text_encoder_3)
TextEncoderSpec = tuple[str, dict[str, Any], Any]
# denoiser name -> (component, diffusers class name)
def _text_encoder(cfg: dict[str, Any], encoder: Any) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if encoder == "t5":
        return T5EncoderModel(T5Config(**cfg))
    cls = CLIPTextModelWithProjection if encoder else CLIPTextModel
    return cls(CLIPTextConfig(**cfg))


def build_meta_components(
    unet_config: dict[str, Any], text_encoders: Iterable[TextEncoderSpec], denoiser: str = "unet"
) -> dict[str, nn.Module]:
    """``{"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel, ...}`` on the meta device.

    ``unet_config`` is the denoiser's config: a UNet's, or a Flux / SD3 transformer's with ``denoiser="flux"`` /
    ``"sd3"`` (component ``"transformer"``). ``text_encoders``: ``(component, config fields, encoder)``.

    >>> build_meta_components(SD1_UNET, [("text_encoder", CLIP_L, False)])["unet"].dtype    # doctest: +SKIP
    torch.float32
    """
    # Imported here, not at module level: these imports take seconds and offline work never builds a model.
    import diffusers

    if denoiser not in DENOISER_CLASSES:
        raise ValueError(f"unknown denoiser {denoiser!r}; expected one of {sorted(DENOISER_CLASSES)}")
    component, class_name = DENOISER_CLASSES[denoiser]
    with torch.device("meta"):
        components: dict[str, nn.Module] = {component: getattr(diffusers, class_name).from_config(unet_config)}
        for name, cfg, encoder in text_encoders:
            components[name] = _text_encoder(cfg, encoder)
    return components


def _encoder_of(cfg: dict[str, Any]) -> Any:
    architectures = cfg.get("architectures") or []
    if "T5EncoderModel" in architectures or cfg.get("model_type") == "t5":
        return "t5"
    return "CLIPTextModelWithProjection" in architectures


def folder_meta_components(folder: str | os.PathLike) -> dict[str, nn.Module] | None:
    """The adaptable components of a diffusers pipeline folder on the meta device, from its ``config.json``
    files alone (no weight is read): what a LoRA can be checked against before the model is loaded. ``None``
    when the folder holds no UNet, Flux or SD3 transformer config (a hub id, or another kind of model).

    >>> folder_meta_components("/nonexistent") is None
    True
    """
    root = Path(folder)
    denoiser, config = None, None
    if (root / "unet" / "config.json").is_file():
        denoiser, config = "unet", json.loads((root / "unet" / "config.json").read_text())
    elif (root / "transformer" / "config.json").is_file():
        config = json.loads((root / "transformer" / "config.json").read_text())
        by_class = {cls: name for name, (_, cls) in DENOISER_CLASSES.items()}
        denoiser = by_class.get(config.get("_class_name"))
    if denoiser is None or config is None:
        return None
    text_encoders = []
    for component in TEXT_COMPONENTS:
        cfg_file = root / component / "config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text())
            text_encoders.append((component, cfg, _encoder_of(cfg)))
    return build_meta_components(config, text_encoders, denoiser=denoiser)


__all__ = ["DENOISER_CLASSES", "TextEncoderSpec", "build_meta_components", "folder_meta_components"]
