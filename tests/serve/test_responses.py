"""serve/responses.py: images as 8-bit PNGs rounded as diffusers rounds, in the native, A1111 and OpenAI shapes."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from lorablend.serve.responses import b64_png, png_bytes


def test_a_png_holds_the_image_rounded_as_diffusers_numpy_to_pil():
    image = np.random.default_rng(0).random((8, 6, 3), dtype=np.float32)
    pixels = np.asarray(Image.open(io.BytesIO(png_bytes(image))))
    assert pixels.shape == (8, 6, 3) and np.array_equal(pixels, (image * 255).round().astype("uint8"))
    clipped = np.asarray(Image.open(io.BytesIO(png_bytes(np.full((2, 2, 3), 1.7, np.float32)))))
    assert (clipped == 255).all()


def test_json_answers_carry_the_same_png_in_base64():
    image = np.zeros((4, 4, 3), np.float32)
    assert base64.b64decode(b64_png(image)) == png_bytes(image)
