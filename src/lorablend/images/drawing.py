"""Drawing on images: fonts and text measures, a labelled sheet of images, and the one PNG writer (atomic).

>>> from PIL import Image
>>> render_grid([[Image.new("RGB", (8, 8))]], ["w=0"], ["a cat"]).size[0] > 8
True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence


def font(size: int = 14) -> Any:
    """PIL's bundled font at ``size`` (scalable in Pillow >= 10.1), else its bitmap default."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow: fixed bitmap font
        return ImageFont.load_default()


def text_size(text: str, f: Any) -> tuple[int, int]:
    """Width and height of ``text`` drawn in font ``f``."""
    left, top, right, bottom = f.getbbox(text or " ")
    return int(right - left), int(bottom - min(top, 0))


def wrap(text: str, width: int, f: Any) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels (long words are cut)."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if text_size(candidate, f)[0] <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
        while text_size(line, f)[0] > width and len(line) > 1:
            cut = len(line)
            while cut > 1 and text_size(line[:cut], f)[0] > width:
                cut -= 1
            lines.append(line[:cut])
            line = line[cut:]
    return (lines + [line]) if line else (lines or [""])


def first_picture(output: Any) -> Any:
    """The first picture of a diffusers pipeline's output: its first image, or for a video (``output.frames``,
    Wan) its first clip's frames side by side — one strip, frame 0 on the left — PIL or numpy as the output holds.

    >>> from types import SimpleNamespace
    >>> import numpy as np
    >>> first_picture(SimpleNamespace(frames=np.zeros((1, 5, 16, 8, 3)))).shape
    (16, 40, 3)
    """
    return output.images[0] if not hasattr(output, "frames") else frame_strip(output.frames[0])


def pictures(output: Any) -> list[Any]:
    """Every picture of a pipeline's output, in order: its images, or each video clip as a frame strip.

    >>> from types import SimpleNamespace
    >>> import numpy as np
    >>> [p.shape for p in pictures(SimpleNamespace(frames=np.zeros((2, 3, 4, 4, 3))))]
    [(4, 12, 3), (4, 12, 3)]
    """
    return list(output.images) if not hasattr(output, "frames") else [frame_strip(clip) for clip in output.frames]


def frame_strip(clip: Any) -> Any:
    """A clip's frames side by side (frame 0 on the left), PIL or numpy as the clip holds. >>> see ``pictures``"""
    frames = list(clip)
    if not hasattr(frames[0], "paste"):  # numpy / torch frames (H, W, C)
        import numpy as np

        return np.concatenate([np.asarray(f) for f in frames], axis=1)
    from PIL import Image

    strip = Image.new(frames[0].mode, (sum(f.width for f in frames), frames[0].height))
    for i, frame in enumerate(frames):
        strip.paste(frame, (sum(f.width for f in frames[:i]), 0))
    return strip


def render_grid(images: Sequence[Sequence[Any]], col_labels: Sequence[str], row_labels: Sequence[str], title: str = ""):
    """Paste equally sized PIL images into one labelled sheet (column labels on top, row labels at the left).

    >>> from PIL import Image
    >>> render_grid([[Image.new("RGB", (8, 8))]], ["w=0"], ["a cat"]).size[0] > 8
    True
    """
    from PIL import Image, ImageDraw

    f = font()
    w, h = images[0][0].size
    line_h = text_size("Ag", f)[1] + 4
    # a column is as wide as its image, or its label when the images are small: labels are never cut mid-number
    col_w = max(w, max(text_size(str(t), f)[0] for t in col_labels) + 8)
    left = min(max(text_size(str(t), f)[0] for t in row_labels) + 12, max(160, w))
    row_text = [wrap(str(t), left - 12, f) for t in row_labels]
    top = line_h * (2 if title else 1) + 8
    width = max(left + col_w * len(col_labels), text_size(title, f)[0] + 8)
    sheet = Image.new("RGB", (width, top + h * len(row_labels)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 4), title, fill="black", font=f)
    for c, label in enumerate(col_labels):
        tw = text_size(str(label), f)[0]
        draw.text((left + c * col_w + (col_w - tw) // 2, top - line_h - 2), str(label), fill="black", font=f)
    pad = (col_w - w) // 2
    for r, (line_imgs, lines) in enumerate(zip(images, row_text)):
        for i, line in enumerate(lines[: max(1, h // line_h)]):
            draw.text((4, top + r * h + 4 + i * line_h), line, fill="black", font=f)
        for c, img in enumerate(line_imgs):
            sheet.paste(img.convert("RGB"), (left + c * col_w + pad, top + r * h))
    return sheet


def save_png(
    image: Any, output: str | os.PathLike, *, overwrite: bool = False, inputs: Sequence[str | os.PathLike] = ()
) -> Path:
    """Write a PIL image as PNG, atomically (``lorablend.outputs``): never a partial file, never over ``inputs``.

    >>> save_png(image, "out.png")                                              # doctest: +SKIP
    PosixPath('out.png')
    """
    from ..outputs import atomic_file

    with atomic_file(output, overwrite=overwrite, inputs=inputs) as tmp:
        image.save(tmp, format="PNG")
    return Path(output)
