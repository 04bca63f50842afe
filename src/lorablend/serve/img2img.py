"""AUTOMATIC1111's img2img on the served pipeline: diffusers' image-to-image pipeline built from the SAME components
(``AutoPipelineForImage2Image.from_pipe``: no weight is copied, and the LoRA terms live on the modules, so every
mix, mixed batch and per-sample weight applies as in txt2img), and the init images a request sends, decoded and
checked before anything queues (a bad one: 422 naming ``init_images``).

A pipeline whose family has no image-to-image pipeline in diffusers (Wan, Chroma, ...) answers 422 naming
``init_images`` too: the request cannot be served here, whatever its images.

>>> image_pipeline(pipe)                                                       # doctest: +SKIP
StableDiffusionImg2ImgPipeline { ... }
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any, Sequence

# a decoded init image larger than this (either side) is refused before its pixels are read: a 1 MB PNG can hold
# 8192² pixels; 4096² RGB is 50 MB, decoded one image at a time and resized at once
MAX_INIT_SIDE = 4096


def image_pipeline(pipe: Any) -> Any:
    """The image-to-image pipeline over ``pipe``'s components (``pipe``: a ``lorablend.DiffusionPipeline``);
    ``ValueError`` naming the pipeline where diffusers has none for its family.

    >>> type(image_pipeline(DiffusionPipeline(tiny_pipeline("sd1")))).__name__          # doctest: +SKIP
    'StableDiffusionImg2ImgPipeline'
    """
    from diffusers import AutoPipelineForImage2Image

    inner = getattr(pipe, "pipe", pipe)
    try:
        made = AutoPipelineForImage2Image.from_pipe(inner)
    except ValueError:  # (diffusers: "AutoPipeline can't find a pipeline linked to <class> for None")
        raise ValueError(f"this server's pipeline ({type(inner).__name__}) has no image-to-image pipeline in "
                         "diffusers; use /sdapi/v1/txt2img") from None
    made.set_progress_bar_config(disable=True)
    return made


def decode_init_images(texts: Sequence[str], width: int, height: int) -> tuple[Any, ...]:
    """Each base64 image (a ``data:image/…;base64,`` prefix allowed, as webuiapi sends it) as an RGB PIL image of
    ``width`` × ``height`` (A1111's default resize mode: just resize); ``ValueError`` naming the image's index and
    what is wrong with it.

    >>> decode_init_images(["not base64!"], 32, 32)
    Traceback (most recent call last):
    ...
    ValueError: init_images[0]: not base64 text; send a PNG or JPEG as base64 (a data:image/png;base64, prefix is fine)
    """
    from PIL import Image, UnidentifiedImageError

    images = []
    for i, text in enumerate(texts):
        data = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"init_images[{i}]: not base64 text; send a PNG or JPEG as base64 (a "
                             "data:image/png;base64, prefix is fine)") from None
        try:
            image = Image.open(io.BytesIO(raw))
            if max(image.size) > MAX_INIT_SIDE:  # (read from the header: no pixel decoded yet)
                raise ValueError(f"init_images[{i}]: {image.size[0]}x{image.size[1]} pixels; send at most "
                                 f"{MAX_INIT_SIDE} a side (it is resized to {width}x{height} anyway)")
            image = image.convert("RGB")
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError):
            raise ValueError(f"init_images[{i}]: {len(raw)} bytes that are no image PIL reads (or a damaged one); "
                             "send a PNG or JPEG") from None
        images.append(image if image.size == (width, height) else image.resize((width, height),
                                                                               Image.Resampling.LANCZOS))
    return tuple(images)


__all__ = ["MAX_INIT_SIDE", "decode_init_images", "image_pipeline"]
