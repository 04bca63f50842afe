"""The merge evaluation as one PNG: per style, one row per method with a stacked bar (both / subject only /
style only / neither) and the method's first images, so a reader sees the numbers and what they count.

>>> from lorablend.evaluate.merges import MergeEval, Row
>>> rows = [Row("stripes", "cat", {"both": 1, "subject_only": 0, "style_only": 0, "neither": 1})]
>>> merge_chart(MergeEval(rows, [0, 1], 20)).size[0] > 300
True
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..images.drawing import font, text_size
from .merges import OUTCOMES

COLOURS = {"both": (46, 160, 67), "subject_only": (66, 120, 220), "style_only": (240, 160, 40), "neither": (170, 170, 170)}
BAR_W, THUMB, THUMBS = 240, 48, 4


def merge_chart(result: Any) -> Any:
    """A PIL image of ``result`` (a :class:`~.merges.MergeEval`)."""
    from PIL import Image, ImageDraw

    f = font(13)
    styles = list(dict.fromkeys(r.style for r in result.rows))
    methods = list(dict.fromkeys(r.method for r in result.rows))
    label_w = max(text_size(m, f)[0] for m in methods) + 12
    panel_w = BAR_W + 12 + THUMBS * (THUMB + 2) + 16
    row_h, top = THUMB + 6, 48
    sheet = Image.new("RGB", (label_w + panel_w * len(styles), top + row_h * len(methods) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    x = 4
    for outcome in OUTCOMES:  # the legend
        draw.rectangle([x, 6, x + 12, 18], fill=COLOURS[outcome])
        draw.text((x + 16, 5), outcome.replace("_", " "), fill="black", font=f)
        x += 28 + text_size(outcome, f)[0]
    for s, style in enumerate(styles):
        x0 = label_w + s * panel_w
        draw.text((x0, 26), f"subject sks x style {style} ({len(result.seeds)} seeds)", fill="black", font=f)
        for m, method in enumerate(methods):
            row = next(r for r in result.rows if r.style == style and r.method == method)
            y = top + m * row_h
            if s == 0:
                draw.text((4, y + THUMB // 2 - 7), method, fill="black", font=f)
            bx = x0
            for outcome in OUTCOMES:
                w = round(BAR_W * row.share(outcome))
                if w:
                    draw.rectangle([bx, y + 12, bx + w - 1, y + THUMB - 12], fill=COLOURS[outcome])
                bx += w
            draw.text((x0 + 4, y + THUMB // 2 - 7), f"{row.share('both'):.0%}", fill="white", font=f)
            for i, image in enumerate(list(row.images if row.images is not None else [])[:THUMBS]):
                pixels = (np.clip(image, 0, 1) * 255).round().astype("uint8")
                thumb = Image.fromarray(pixels).resize((THUMB, THUMB), Image.NEAREST)
                sheet.paste(thumb, (x0 + BAR_W + 12 + i * (THUMB + 2), y))
    return sheet
