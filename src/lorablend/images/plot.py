"""Pictures of adapters: ‖ΔW‖ per block and layer type, and how alike two adapters are, layer by layer.

People would rather look than read: ``lorablend inspect FILE --plot out.png`` draws a heatmap whose rows are the
model's blocks in order (``BASE`` text encoders, ``TIME``, ``IN00``…, ``M00``, ``OUT00``…, ``FINAL``: the block
vocabulary of per-block weights) and whose columns are layer types (self-attention, cross-attention,
feed-forward, projections, resnets, samplers, text-encoder attention / MLP). A cell is the Frobenius norm of all
of that cell's deltas together. Given two files, a cell is the cosine similarity of the two adapters' deltas
there, ``⟨ΔA, ΔB⟩_F / (‖ΔA‖_F ‖ΔB‖_F)``.

Low-rank deltas never become dense: ``‖U D‖²_F = trace((UᵀU)(D Dᵀ))`` and
``⟨U_A D_A, U_B D_B⟩_F = trace((U_Aᵀ U_B)(D_B D_Aᵀ))``, products of rank-sized matrices.
Drawn with PIL only (no plotting library).

>>> a = Adapter("a", "sd1", {"unet.mid_block.attentions.0.proj_in": LowRankDelta(torch.ones(1, 2), torch.ones(2, 1))})
>>> round(delta_norm(a.deltas["unet.mid_block.attentions.0.proj_in"]), 3)
2.0
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..adapter import Adapter, Delta, LowRankDelta
from .drawing import font, text_size

# Layer types (columns), in display order: the first pattern that matches a target key wins.
LAYER_TYPES: list[tuple[str, str]] = [
    ("te attn", r"^text_encoder(_[23])?\..*(self_attn|SelfAttention)\."),  # CLIP; T5's SelfAttention
    ("te mlp", r"^text_encoder(_[23])?\..*(mlp|DenseReluDense)\."),
    ("te proj", r"^text_encoder(_[23])?\.text_projection$"),
    ("attn1", r"\.attn1\."),
    ("attn2", r"\.attn2\."),
    # Flux / SD3 transformer: the image stream's attention, the text stream's (context), q/k norms, modulations
    ("attn", r"^transformer\..*\.attn2?\.(to_[qkv]|to_out\.0)$"),
    ("attn ctx", r"^transformer\..*\.attn\.(add_[qkv]_proj|to_add_out)$"),
    ("qk norm", r"^transformer\..*\.norm_(added_)?[qk]$"),
    ("mod", r"^transformer\..*norm(1|1_context|_out)?\.linear$"),
    ("ff", r"\.ff\."),
    ("ff ctx", r"\.ff_context\."),
    ("mlp", r"\.proj_mlp$"),
    ("proj", r"\.proj_(in|out)$"),
    ("resnet", r"\.resnets\.\d+\."),
    ("sampler", r"\.(down|up)samplers\."),
    ("embed", r"^unet\.(time_embedding|add_embedding)\.|^transformer\.(time_text_embed|x_embedder|context_embedder|pos_embed)"),
    ("conv io", r"^unet\.conv_(in|out)$"),
]


def layer_type(target_key: str) -> str:
    """The column a target key belongs to.

    >>> layer_type("unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k")
    'attn2'
    """
    for name, pattern in LAYER_TYPES:
        if re.search(pattern, target_key):
            return name
    return "other"


def block_of(target_key: str, index: Any) -> str:
    """The row a target key belongs to: its block label, with the text encoders told apart (``BASE te2``)."""
    if target_key.startswith("text_encoder_3."):
        return "BASE te3"
    if target_key.startswith("text_encoder_2."):
        return "BASE te2"
    if target_key.startswith("text_encoder."):
        return "BASE te"
    return index.block(target_key) if index is not None else "OTHER"


def _row_order(label: str) -> tuple[int, int, str]:
    # Flux double (D) before single (S) blocks; SD3 joint (J) blocks where a UNet's IN blocks are
    rank = {"BASE": 0, "TIME": 1, "EMBED": 2, "IN": 3, "D": 3, "J": 3, "M": 4, "S": 4, "OUT": 5, "FINAL": 6}
    head = label.split()[0].rstrip("0123456789")
    tail = label.split()[0][len(head):]
    return rank.get(head, 6), int(tail) if tail else 0, label


# ------------------------------------------------------------------------------------------- the maths


def _factors(delta: Delta) -> tuple[torch.Tensor, torch.Tensor] | None:
    return delta.low_rank_factors()


def _dense(delta: Delta) -> torch.Tensor:
    # DoRA's delta depends on the base weight, which an offline file does not have: show the part that does not.
    dense = delta.base_free().delta_weight()
    return dense.reshape(dense.shape[0], -1).float()


def delta_inner(a: Delta, b: Delta) -> float:
    """``⟨ΔA, ΔB⟩_F``; from the factors when both are low-rank (no dense ΔW). DoRA uses its inner delta.

    >>> delta_inner(LowRankDelta(torch.ones(1, 2), torch.ones(3, 1)), LowRankDelta(torch.ones(1, 2), torch.ones(3, 1)))
    6.0
    """
    fa, fb = _factors(a), _factors(b)
    with torch.no_grad():
        if fa is not None and fb is not None:
            (ua, da), (ub, db) = fa, fb
            if ua.shape[0] != ub.shape[0] or da.shape[1] != db.shape[1]:
                raise ValueError(f"deltas of shapes {(ua.shape[0], da.shape[1])} and {(ub.shape[0], db.shape[1])} differ")
            return float(torch.trace((ua.T @ ub) @ (db @ da.T)))
        if fa is not None or fb is not None:  # one low-rank, one dense: ⟨U D, M⟩ = Σ (Uᵀ M) ⊙ D
            (u, d), m = (fa, _dense(b)) if fa is not None else (fb, _dense(a))
            return float(((u.T @ m) * d).sum())
        return float((_dense(a) * _dense(b)).sum())


def delta_norm(delta: Delta) -> float:
    """``‖ΔW‖_F`` with the alpha/rank scale; from the factors for low-rank kinds.

    >>> delta_norm(LowRankDelta(torch.ones(1, 2), torch.ones(3, 1)))
    2.449489742783178
    """
    return math.sqrt(max(delta_inner(delta, delta), 0.0))


@dataclass
class Heatmap:
    """Cells ``values[row][col]`` (None: nothing there) with row/column labels, and per-layer numbers."""

    title: str
    rows: list[str]
    cols: list[str]
    values: list[list[float | None]]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    diverging: bool = False  # cosine: -1..1 around 0; norms: 0..max

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "rows": self.rows, "cols": self.cols, "values": self.values, "layers": self.layers}


def _index_for(adapter: Adapter) -> Any:
    from ..naming import module_index

    try:
        return module_index(family=adapter.family)
    except Exception:  # no diffusers model classes: rows fall back to "OTHER"
        return None


def _layout(keys: Sequence[str], index: Any) -> tuple[list[str], list[str], dict[str, tuple[str, str]]]:
    where = {k: (block_of(k, index), layer_type(k)) for k in keys}
    rows = sorted({r for r, _ in where.values()}, key=_row_order)
    order = [n for n, _ in LAYER_TYPES] + ["other"]
    cols = [c for c in order if any(c == t for _, t in where.values())]
    return rows, cols, where


def norm_heatmap(adapter: Adapter) -> Heatmap:
    """‖ΔW‖_F per (block, layer type) cell of one adapter (the cell's deltas taken together).

    >>> norm_heatmap(adapter).rows[:3]                                          # doctest: +SKIP
    ['BASE te', 'IN01', 'IN02']
    """
    index = _index_for(adapter)
    rows, cols, where = _layout(list(adapter.deltas), index)
    sq = {(r, c): 0.0 for r in rows for c in cols}
    seen = set()
    layers = {}
    for key, delta in adapter.deltas.items():
        n = delta_norm(delta)
        layers[key] = {"block": where[key][0], "type": where[key][1], "norm": n}
        sq[where[key]] += n * n
        seen.add(where[key])
    values = [[math.sqrt(sq[(r, c)]) if (r, c) in seen else None for c in cols] for r in rows]
    return Heatmap(f"{adapter.name}: ||dW||_F per block and layer type ({adapter.family})", rows, cols, values, layers)


def similarity_heatmap(a: Adapter, b: Adapter) -> Heatmap:
    """Cosine similarity of two adapters per (block, layer type) cell and per shared layer, from the factors.

    A layer only one adapter has counts as a zero delta in the other (it lowers that cell's similarity).

    >>> similarity_heatmap(a, a).values[0][0]                                  # doctest: +SKIP
    1.0
    """
    if a.family != b.family:
        raise ValueError(f"cannot compare a {a.family} adapter ({a.name!r}) with a {b.family} one ({b.name!r})")
    index = _index_for(a)
    keys = list(a.deltas) + [k for k in b.deltas if k not in a.deltas]
    rows, cols, where = _layout(keys, index)
    dot = {cell: 0.0 for cell in where.values()}
    na = dict(dot)
    nb = dict(dot)
    layers = {}
    for key in keys:
        da, db = a.deltas.get(key), b.deltas.get(key)
        cell = where[key]
        sa = delta_inner(da, da) if da is not None else 0.0
        sb = delta_inner(db, db) if db is not None else 0.0
        ab = delta_inner(da, db) if da is not None and db is not None else 0.0
        na[cell] += sa
        nb[cell] += sb
        dot[cell] += ab
        cos = ab / math.sqrt(sa * sb) if sa > 0 and sb > 0 else None
        layers[key] = {"block": cell[0], "type": cell[1], "cosine": cos, "norm_a": math.sqrt(sa), "norm_b": math.sqrt(sb)}
    values = [
        [dot[(r, c)] / math.sqrt(na[(r, c)] * nb[(r, c)]) if (r, c) in dot and na[(r, c)] > 0 and nb[(r, c)] > 0 else None
         for c in cols]
        for r in rows
    ]
    return Heatmap(f"cosine similarity {a.name} vs {b.name} per block and layer type", rows, cols, values, layers, diverging=True)


# ------------------------------------------------------------------------------------------- drawing


def _colour(t: float, diverging: bool) -> tuple[int, int, int]:
    """Colour of a value scaled to 0..1 (sequential: white to dark blue) or -1..1 (blue, white, red)."""
    def mix(c0, c1, u):
        return tuple(int(round(a + (b - a) * u)) for a, b in zip(c0, c1))

    if diverging:
        t = max(-1.0, min(1.0, t))
        return mix((255, 255, 255), (178, 24, 43), t) if t >= 0 else mix((255, 255, 255), (33, 102, 172), -t)
    t = max(0.0, min(1.0, t))
    return mix((247, 251, 255), (8, 48, 107), t)


def render_heatmap(heat: Heatmap, cell: int = 56) -> Any:
    """A PIL image of ``heat``: coloured cells with their values, row and column labels, title and colour scale.

    >>> render_heatmap(Heatmap("t", ["IN01"], ["attn1"], [[1.0]])).size[0] > 56
    True
    """
    from PIL import Image, ImageDraw

    f, small = font(14), font(11)
    line_h = text_size("Ag", f)[1] + 4
    left = max(text_size(r, f)[0] for r in heat.rows) + 16
    top = line_h * 2 + 12
    width = left + cell * len(heat.cols) + 90
    height = top + cell * len(heat.rows) + 16
    width = max(width, text_size(heat.title, f)[0] + 16)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 4), heat.title, fill="black", font=f)
    present = [v for row in heat.values for v in row if v is not None]
    vmax = 1.0 if heat.diverging else (max(present) if present else 1.0) or 1.0
    for c, name in enumerate(heat.cols):
        draw.text((left + c * cell + 3, top - line_h), name, fill="black", font=small)
    for r, name in enumerate(heat.rows):
        y = top + r * cell
        draw.text((8, y + cell // 2 - line_h // 2), name, fill="black", font=f)
        for c, value in enumerate(heat.values[r]):
            x = left + c * cell
            box = (x, y, x + cell - 2, y + cell - 2)
            if value is None:
                draw.rectangle(box, fill=(235, 235, 235))
                continue
            t = value if heat.diverging else value / vmax
            rgb = _colour(t, heat.diverging)
            draw.rectangle(box, fill=rgb)
            ink = "white" if sum(rgb) < 380 else "black"
            label = f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
            tw, th = text_size(label, small)
            draw.text((x + (cell - 2 - tw) // 2, y + (cell - 2 - th) // 2), label, fill=ink, font=small)
    # colour scale: top = max (or +1), bottom = 0 (or -1)
    bar_x, bar_h = left + cell * len(heat.cols) + 16, max(cell * len(heat.rows) - 2, 40)
    for i in range(bar_h):
        u = 1 - i / max(bar_h - 1, 1)
        t = 2 * u - 1 if heat.diverging else u
        draw.line([(bar_x, top + i), (bar_x + 14, top + i)], fill=_colour(t, heat.diverging))
    hi, lo = ("+1", "-1") if heat.diverging else (f"{vmax:.3g}", "0")
    draw.text((bar_x + 18, top), hi, fill="black", font=small)
    draw.text((bar_x + 18, top + bar_h - text_size(lo, small)[1]), lo, fill="black", font=small)
    return img


def plot_files(first: str, out: str, second: str | None = None, *, overwrite: bool = False) -> tuple[Heatmap, Any]:
    """Read one LoRA file (norm heatmap) or two (similarity heatmap) and write the PNG to ``out``.

    >>> heat, path = plot_files("style.safetensors", "style.png")              # doctest: +SKIP
    """
    from .drawing import save_png
    from ..io import load_adapter

    if not str(out).lower().endswith(".png"):
        raise ValueError(f"--plot {out}: name a .png file")
    a = load_adapter(first)
    heat = norm_heatmap(a) if second is None else similarity_heatmap(a, load_adapter(second))
    if not heat.rows:
        raise ValueError(f"{first}: no layer to plot (the adapter is empty)")
    path = save_png(render_heatmap(heat), out, overwrite=overwrite, inputs=[p for p in (first, second) if p])
    return heat, path


__all__ = [
    "Heatmap",
    "delta_inner",
    "delta_norm",
    "layer_type",
    "norm_heatmap",
    "plot_files",
    "render_heatmap",
    "similarity_heatmap",
]
