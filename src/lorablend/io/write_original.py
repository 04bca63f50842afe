"""Adapter -> a transformer LoRA in its original module names (BFL Flux, SAI MMDiT), fused rows put back together.

Two layouts name a Flux / SD3 transformer by the names it was released with (the ``naming/fused.py`` table):

* ``"kohya"`` (kohya sd-scripts' ``lora_flux.py`` / ``lora_sd3.py``, what diffusers' kohya-Flux converter,
  ComfyUI and Forge read): ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``; text encoders ``lora_te1_`` (CLIP-L), ``lora_te2_`` / ``lora_te3_`` as the module index names them;
* ``"ai-toolkit"`` (ComfyUI's own saves, ai-toolkit's ComfyUI layout):
  ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`` / ``.lora_B.weight`` (``.lora_B.bias``) /
  ``.alpha``; text encoders ``text_encoders.clip_l.transformer.<path>`` (``clip_g``, ``t5xxl``).

A fused layer (``qkv`` = ``to_q`` / ``to_k`` / ``to_v``; Flux ``single_blocks.N.linear1`` = q / k / v / ``proj_mlp``;
the final modulation's swapped halves) gets ONE delta over its rows, exactly:

* LoRAs that share one down factor and alpha (what a reader makes of a fused file): that down, the ups placed at
  their rows (zero rows for a module the adapter lacks) — the file's own factors, bit for bit;
* other LoRAs: down = the downs stacked (rank = the sum of ranks), up = block diagonal; with one scale among them
  the factors are kept as they are and alpha = scale · rank; with several, each up is scaled by its own
  alpha/rank and alpha is left out (scale 1);
* full differences (``diff`` / ``diff_b``): stacked at their rows, zeros elsewhere.

A modulation table's difference (Wan ``blocks.N.diff_m``, ``head.diff_m``: lightx2v / Lightning distillation LoRAs,
what ``merge`` keeps as a table) is written in ComfyUI names only, ``diffusion_model.blocks.N.diff_m``; ``"kohya"``
refuses it with the key and that layout (no kohya / musubi name holds a table). ``.diff`` / ``.diff_b`` are written in
both (LyCORIS' suffixes, which ComfyUI reads after either name).

LoHa, LoKr, DoRA and replacement weights of a module that is only PART of a fused layer cannot be put back into
one delta of the same kind: refused with the layer's name (save ``format="onetrainer"``, one module each, or
reduce them to a LoRA with ``merge(..., method="svd")``). On a layer a module has whole, every kind is written as
``kohya_tensors`` names it (LyCORIS ``hada_*`` / ``lokr_*`` / ``dora_scale`` with BFL names, as LyCORIS writes them).

>>> from lorablend.naming import module_index
>>> sorted(source_of(module_index(family="flux")))[:1]
['transformer.context_embedder']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from ..adapter import Adapter
from ..kinds import alpha_tensor, written_alpha
from ..naming import ModuleIndex

ORIGINAL_STYLES = ("kohya", "ai-toolkit")
_AITK_TEXT = {"text_encoder": "clip_l", "text_encoder_3": "t5xxl"}  # text_encoder_2: clip_g (SD3) or t5xxl (Flux)
_AITK_FACTORS = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}


@dataclass
class SourceLayer:
    """One original layer (``double_blocks.0.img_attn.qkv``), its output rows, and the adapter's deltas on it:
    ``(target key, the source rows that are its rows or None, delta)``.

    >>> SourceLayer("img_in", 3072).pieces
    []
    """

    name: str
    rows: int
    pieces: list[tuple[str, Any, Any]] = field(default_factory=list)


def source_of(index: ModuleIndex) -> dict[str, tuple[str, Any]]:
    """Target key -> (original name, source rows) for every transformer module an original name covers; the first
    name of the table wins (BFL's ``img_attn.qkv``, not XLabs' ``processor.qkv_lora1``).

    >>> source_of(module_index(family="flux"))["transformer.single_transformer_blocks.0.proj_mlp"]  # doctest: +SKIP
    ('single_blocks.0.linear1', ((9216, 21504),))
    """
    out: dict[str, tuple[str, Any]] = {}
    for name in index.source_names():
        for key, spans in index.lookup_rows(name) or ():
            out.setdefault(key, (name, spans))
    return out


def _rows(index: ModuleIndex, name: str) -> int:
    return max(index.modules[key].weight_shape[0] if spans is None else max(b for _, b in spans)
               for key, spans in index.lookup_rows(name))


def group_by_source(adapter: Adapter, index: ModuleIndex) -> tuple[list[SourceLayer], dict[str, Any]]:
    """The adapter's transformer deltas gathered per original layer, and the other deltas (text encoders) as they
    are. A transformer layer no original name covers is an error naming it."""
    where = source_of(index)
    layers: dict[str, SourceLayer] = {}
    rest: dict[str, Any] = {}
    for key, delta in adapter.deltas.items():
        if not key.startswith("transformer."):
            rest[key] = delta
            continue
        if key not in where:
            raise ValueError(
                f"adapter {adapter.name!r}: layer {key!r} has no name in the original {index.family} layout; "
                f"save it with format='diffusers', which names every module"
            )
        name, spans = where[key]
        if name not in layers:
            layers[name] = SourceLayer(name, _rows(index, name))
        layers[name].pieces.append((key, spans, delta))
    return list(layers.values()), rest


def _place(dst: torch.Tensor, src: torch.Tensor, spans: Any, cols: slice = slice(None)) -> None:
    """Write ``src``'s rows into ``dst`` at the source rows ``spans`` (in order; None: all rows)."""
    if spans is None:
        dst[:, cols] = src
        return
    at = 0
    for a, b in spans:
        dst[a:b, cols] = src[at:at + b - a]
        at += b - a


def _shared_down(pieces: list) -> bool:
    """Whether every LoRA piece has the same down factor and alpha (the rows of one LoRA, as a reader splits it)."""
    first = pieces[0][2]
    return all(d.mid is None and d.alpha == first.alpha and d.down.dtype == first.down.dtype and (
        d.down is first.down or (d.down.shape == first.down.shape and torch.equal(d.down, first.down)))
        for _, _, d in pieces)


def _placed(layer: SourceLayer, what: Callable[[Any], torch.Tensor | None]) -> torch.Tensor | None:
    """A per-row vector (a bias) of the whole layer: each piece's at its rows, zeros elsewhere; None if none has one."""
    parts = [(spans, t) for _, spans, d in layer.pieces if (t := what(d)) is not None]
    if not parts:
        return None
    out = torch.zeros(layer.rows, dtype=parts[0][1].dtype)
    for spans, t in parts:
        _place(out.unsqueeze(1), t.unsqueeze(1), spans)
    return out


def fused_lora(layer: SourceLayer) -> dict[str, Any]:
    """One LoRA over the whole layer from its LoRA pieces: ``{"down", "up", "alpha", "bias", "diff_b"}``."""
    pieces = layer.pieces
    first = pieces[0][2]
    if _shared_down(pieces):
        up = torch.zeros(layer.rows, first.rank, dtype=first.up.dtype)
        for _, spans, d in pieces:
            _place(up, d.up.reshape(d.up.shape[0], -1), spans)
        return {"down": first.down, "up": up, "alpha": first.alpha,
                "bias": _placed(layer, lambda d: d.bias), "diff_b": _placed(layer, lambda d: d.diff_b)}
    if any(d.mid is not None for _, _, d in pieces):
        raise ValueError(f"layer {layer.name}: a Tucker LoRA (lora_mid) on part of a fused layer cannot be fused")
    scales = {d.scale for _, _, d in pieces}
    one = len(scales) == 1
    rank = sum(d.rank for _, _, d in pieces)
    down = torch.cat([d.down.reshape(d.rank, -1) for _, _, d in pieces])
    dtype = torch.promote_types(down.dtype, first.up.dtype) if one else torch.float32
    up = torch.zeros(layer.rows, rank, dtype=dtype)
    col = 0
    for _, spans, d in pieces:
        block = d.up.reshape(d.up.shape[0], -1)
        _place(up, block if one else block.float() * d.scale, spans, slice(col, col + d.rank))
        col += d.rank
    scale = scales.pop() if one else 1.0
    alpha = None if (one and all(d.alpha in (None, 0) for _, _, d in pieces)) or not one else scale * rank
    bias = _placed(layer, lambda d: None if d.bias is None else (d.bias if one else d.bias.float() * d.scale))
    return {"down": down, "up": up, "alpha": alpha, "bias": bias, "diff_b": _placed(layer, lambda d: d.diff_b)}


def fused_diff(layer: SourceLayer, index: ModuleIndex) -> dict[str, Any]:
    """One full difference over the whole layer: ``{"diff", "diff_b"}`` (no ``diff`` when only biases change)."""
    dtype = next(layer.pieces[0][2].tensors()).dtype
    width = index.modules[layer.pieces[0][0]].weight_shape[1]
    weights = any(len(d.shape) > 1 for _, _, d in layer.pieces)  # a bias difference alone has a 1-D shape
    diff = torch.zeros(layer.rows, width, dtype=dtype) if weights else None
    for key, spans, d in layer.pieces:
        if diff is not None:
            _place(diff, d.delta_weight(index.modules[key].weight_shape).to(dtype), spans)
    diff_b = _placed(layer, lambda d: None if d.delta_bias() is None else d.delta_bias().to(dtype))
    return {"diff": diff, "diff_b": diff_b}


def layer_tensors(layer: SourceLayer, index: ModuleIndex) -> Iterator[tuple[str, torch.Tensor]]:
    """``(kohya suffix, tensor)`` of one original layer (``lora_down.weight``, ``alpha``, ``lora_B.bias`` …)."""
    deltas = [d for _, _, d in layer.pieces]
    # the writer needs a LoRA's raw factors and alpha to put them back bit for bit; no kind question gives them
    if all(d.kind == "lora" for d in deltas) and not (len(deltas) == 1 and deltas[0].mid is not None):
        parts = fused_lora(layer)
        alpha = parts["alpha"]
        yield from ((s, t) for s, t in (("lora_down.weight", parts["down"]), ("lora_up.weight", parts["up"]),
                                        ("lora_B.bias", parts["bias"]), ("diff_b", parts["diff_b"])) if t is not None)
        if alpha is not None:
            yield "alpha", alpha_tensor(written_alpha(_Alpha(alpha, parts["down"].shape[0])))
        return
    key, spans, delta = layer.pieces[0]
    if len(deltas) == 1 and spans is None:
        yield from delta.kohya_tensors(index.modules[key].weight_shape)
        return
    if all(d.kind == "full" for d in deltas):  # dense already: stacking their rows is exact and no larger
        yield from ((s, t) for s, t in fused_diff(layer, index).items() if t is not None)
        return
    kinds = sorted({d.kind for d in deltas})
    raise ValueError(
        f"layer {layer.name} is one fused weight in the original layout, and the adapter has {'/'.join(kinds)} "
        f"deltas on its parts ({', '.join(k for k, _, _ in layer.pieces)}), which cannot be put back into one delta "
        f"of that kind. Save with format='onetrainer' (kohya tensors, one module each: lossless) or 'diffusers', "
        f"or reduce the adapter to a LoRA first with lorablend.merge(..., method='svd')"
    )


@dataclass
class _Alpha:
    """What ``written_alpha`` asks of a delta (alpha 0 is written as the rank)."""

    alpha: float
    rank: int


def _text_name(index: ModuleIndex, key: str, style: str) -> str:
    if style == "kohya":
        return index.kohya_name(key)
    info = index.modules[key]
    model = _AITK_TEXT.get(info.component) or ("clip_g" if "text_encoder_3" in index.components else "t5xxl")
    return f"text_encoders.{model}.transformer.{info.path}"


def _kohya_can_hold(adapter: str, name: str, suffix: str) -> None:
    """Refuse, naming the key and the layout that holds it, a tensor kohya names have no spelling for.

    >>> _kohya_can_hold("x", "lora_unet_blocks_0", "diff_m")
    Traceback (most recent call last):
    ...
    ValueError: adapter 'x': lora_unet_blocks_0.diff_m is a modulation table difference, which kohya / musubi names cannot hold (a lora_unet_ name is a Linear's; musubi's converter drops the key): save with format='ai-toolkit', which writes it as diffusion_model.<block>.diff_m (diffusion_model.blocks.0.diff_m), the lightx2v / Kijai spelling
    """
    if suffix == "lora_B.bias":
        raise ValueError(f"adapter {adapter!r}: layer {name} has a LoRA bias (lora_B.bias, a BFL control LoRA), "
                         f"which kohya files cannot hold; save with format='ai-toolkit' or 'diffusers'")
    if suffix == "diff_m":
        raise ValueError(
            f"adapter {adapter!r}: {name}.diff_m is a modulation table difference, which kohya / musubi names cannot "
            f"hold (a lora_unet_ name is a Linear's; musubi's converter drops the key): save with "
            f"format='ai-toolkit', which writes it as diffusion_model.<block>.diff_m "
            f"(diffusion_model.blocks.0.diff_m), the lightx2v / Kijai spelling")


def original_state_dict(
    adapter: Adapter, index: ModuleIndex, style: str = "kohya", progress: Callable[[Iterable], Iterable] | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of ``adapter`` in ``style`` (``"kohya"`` or ``"ai-toolkit"``) original names.

    >>> import torch
    >>> from lorablend import Adapter, LowRankDelta
    >>> from lorablend.naming import module_index
    >>> down = torch.ones(2, 3072)
    >>> a = Adapter("x", "flux", {f"transformer.transformer_blocks.0.attn.to_{n}":
    ...     LowRankDelta(down, torch.ones(3072, 2), alpha=1.0) for n in "qkv"})
    >>> sd = original_state_dict(a, module_index(family="flux"))
    >>> sorted(sd), sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape
    (['lora_unet_double_blocks_0_img_attn_qkv.alpha', 'lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight', \
'lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight'], torch.Size([9216, 2]))
    """
    if style not in ORIGINAL_STYLES:
        raise ValueError(f"style must be one of {ORIGINAL_STYLES}, got {style!r}")
    layers, rest = group_by_source(adapter, index)
    out: dict[str, torch.Tensor] = {}
    items: Iterable = [*layers, *rest.items()]
    for item in progress(items) if progress is not None else items:
        if isinstance(item, SourceLayer):
            name = "lora_unet_" + item.name.replace(".", "_") if style == "kohya" else "diffusion_model." + item.name
            pairs = layer_tensors(item, index)
        else:
            key, delta = item
            name = _text_name(index, key, style)
            pairs = delta.kohya_tensors(index.modules[key].weight_shape)
        for suffix, tensor in pairs:
            if style == "kohya":
                _kohya_can_hold(adapter.name, name, suffix)
            suffix = _AITK_FACTORS.get(suffix, suffix) if style == "ai-toolkit" else suffix
            out[f"{name}.{suffix}"] = tensor
    return out


__all__ = ["ORIGINAL_STYLES", "SourceLayer", "fused_diff", "fused_lora", "group_by_source", "layer_tensors",
           "original_state_dict", "source_of"]
