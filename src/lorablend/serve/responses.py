"""What each API answers: images as PNG bytes, base64 PNGs in JSON, in the native, A1111 and OpenAI shapes.

Images become 8-bit the way diffusers' ``numpy_to_pil`` does (``round(x * 255)``), so a PNG from the server
equals the PIL image the library returns for the same call.

>>> import numpy as np; png_bytes(np.zeros((8, 8, 3), np.float32))[:8]
b'\\x89PNG\\r\\n\\x1a\\n'
"""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any

import numpy as np

from .batch import Generation, Result


def png_bytes(image: np.ndarray) -> bytes:
    """One H×W×3 float image in [0, 1] as PNG bytes (8-bit, rounded as diffusers rounds).

    >>> len(png_bytes(np.ones((8, 8, 3), np.float32))) > 8
    True
    """
    from PIL import Image

    pixels = (np.clip(image, 0.0, 1.0) * 255).round().astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def b64_png(image: np.ndarray) -> str:
    """PNG bytes in base64 (what every JSON answer carries). >>> b64_png(image)[:8]  # doctest: +SKIP"""
    return base64.b64encode(png_bytes(image)).decode("ascii")


def native(gen: Generation, result: Result) -> dict[str, Any]:
    """``POST /v1/images`` as JSON: the images, the seed, the mix, the settings used, and the timings.

    >>> native(gen, result)["timings"]                                      # doctest: +SKIP
    {'queue': 0.001, 'switch': 0.002, 'generate': 0.3}
    """
    return {"images": [b64_png(i) for i in result.images], "seed": gen.seed, "loras": gen.loras,
            "prompt": gen.prompt, "steps": gen.steps, "guidance_scale": gen.guidance_scale, "width": gen.width,
            "height": gen.height, "scale": gen.scale, "timings": result.timings, "batch_images": result.batch_images}


def native_headers(gen: Generation, result: Result) -> dict[str, str]:
    """What a PNG answer carries beside the image: seed, mix and timings as headers.

    >>> native_headers(gen, result)["X-Seed"]                               # doctest: +SKIP
    '3'
    """
    return {"X-Seed": str(gen.seed), "X-Loras": json.dumps(gen.loras), "X-Timings": json.dumps(result.timings)}


def a1111(gen: Generation, result: Result, body: dict[str, Any]) -> dict[str, Any]:
    """``POST /sdapi/v1/txt2img``: ``{"images", "parameters", "info"}`` with ``info`` a JSON string (as A1111).

    >>> sorted(a1111(gen, result, {}))                                      # doctest: +SKIP
    ['images', 'info', 'parameters']
    """
    info = {"prompt": gen.prompt, "negative_prompt": gen.negative_prompt or "", "seed": gen.seed,
            "all_seeds": gen.seeds(len(result.images)), "steps": gen.steps, "cfg_scale": gen.guidance_scale,
            "width": gen.width, "height": gen.height, "loras": gen.loras, "timings": result.timings}
    return {"images": [b64_png(i) for i in result.images], "parameters": body, "info": json.dumps(info)}


def openai(gen: Generation, result: Result) -> dict[str, Any]:
    """``POST /v1/images/generations``: ``{"created", "data": [{"b64_json", "revised_prompt"}]}`` (the prompt
    without its LoRA tokens), plus the seed used.

    >>> openai(gen, result)["data"][0].keys()                               # doctest: +SKIP
    dict_keys(['b64_json', 'revised_prompt'])
    """
    return {"created": int(time.time()), "seed": gen.seed,
            "data": [{"b64_json": b64_png(i), "revised_prompt": gen.prompt} for i in result.images]}


__all__ = ["a1111", "b64_png", "native", "native_headers", "openai", "png_bytes"]
