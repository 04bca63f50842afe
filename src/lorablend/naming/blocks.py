"""One vocabulary for per-block weights, the same for SD1.x and SDXL; Flux and SD3 get theirs.

Labels are those of A1111's LoRA Block Weight extension, which users already know: ``BASE`` (text
encoders), ``IN00``…``IN11`` (SD1.x) / ``IN00``…``IN08`` (SDXL) for the LDM ``input_blocks``, ``M00`` for the
middle block, ``OUT00``… for ``output_blocks``; we add ``TIME`` (time / label embeddings) and ``FINAL``
(``conv_out``). A label covers every layer of that block — resnets, attentions and samplers alike.

A weight spec is either a dict ``{label: weight}`` (unnamed labels keep ``default``) or a list in LBW order:
26 values for SD1.x (BASE, IN00–IN11, M00, OUT00–OUT11), 20 for SDXL (BASE, IN00–IN08, M00, OUT00–OUT08),
or LBW's short forms of 17 (SD1.x) and 12 (SDXL) values that list only the blocks with attention.

Transformers: ``D00``…``D18`` Flux's double-stream blocks (``transformer_blocks.N``, BFL ``double_blocks.N``),
``S00``…``S37`` its single-stream blocks (``single_transformer_blocks.N``), ``J00``… SD3's joint blocks
(``transformer_blocks.N``, SAI ``joint_blocks.N``); ``TIME`` (time / guidance / pooled-text embedders), ``EMBED``
(patch and text embedders), ``FINAL`` (``norm_out``, ``proj_out``). A list for Flux is BASE, D00–D18, S00–S37
(58 values); for SD3 BASE then one value per joint block.
"""

from __future__ import annotations

import re

from typing import Mapping, Sequence

_SD1_FULL = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
_SDXL_FULL = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
_SD1_SHORT = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)]
_SDXL_SHORT = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(6)]

_FLUX = ["BASE"] + [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)]

LBW_ORDERS: dict[str, dict[int, list[str]]] = {
    "sd1": {26: _SD1_FULL, 17: _SD1_SHORT},
    "sd2": {26: _SD1_FULL, 17: _SD1_SHORT},
    "sdxl": {20: _SDXL_FULL, 12: _SDXL_SHORT},
    "flux": {58: _FLUX},
    **{family: {n + 1: ["BASE"] + [f"J{i:02d}" for i in range(n)]}
       for family, n in (("sd3", 24), ("sd35-medium", 24), ("sd35-large", 38))},
}

_BLOCK_PATH = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")
_TOP_LABELS = {"time_text_embed": "TIME", "x_embedder": "EMBED", "context_embedder": "EMBED", "pos_embed": "EMBED",
               "norm_out": "FINAL", "proj_out": "FINAL"}


def transformer_block_label(path: str, denoiser: str) -> str:
    """The block label of a module path inside a Flux (``denoiser="flux"``) or SD3 (``"sd3"``) transformer.

    >>> transformer_block_label("single_transformer_blocks.7.attn.to_q", "flux")
    'S07'
    >>> transformer_block_label("transformer_blocks.3.attn.to_q", "sd3"), transformer_block_label("proj_out", "sd3")
    ('J03', 'FINAL')
    """
    m = _BLOCK_PATH.match(path)
    if m:
        head = "S" if m.group(1) == "single_transformer_blocks" else "D" if denoiser == "flux" else "J"
        return f"{head}{int(m.group(2)):02d}"
    return _TOP_LABELS.get(path.split(".", 1)[0], "OTHER")


def expand_block_weights(
    spec: Mapping[str, float] | Sequence[float], family: str, known_labels: Sequence[str], default: float = 1.0
) -> dict[str, float]:
    """Turn a block-weight spec into ``{label: weight}`` over ``known_labels``; unknown labels raise.

    >>> expand_block_weights({"IN04": 0.5}, "sdxl", ["BASE", "IN04", "M00"])
    {'BASE': 1.0, 'IN04': 0.5, 'M00': 1.0}
    """
    weights = {label: float(default) for label in known_labels}
    if isinstance(spec, Mapping):
        unknown = [k for k in spec if k not in weights]
        if unknown:
            raise ValueError(
                f"unknown block label(s) {unknown} for this {family} model; valid labels: {list(known_labels)}"
            )
        weights.update({k: float(v) for k, v in spec.items()})
        return weights
    values = list(spec)
    orders = LBW_ORDERS.get(family, {})
    order = orders.get(len(values))
    if order is None:
        raise ValueError(
            f"a block-weight list for {family} must have one of {sorted(orders)} values (LoRA Block Weight order), "
            f"got {len(values)}; or pass a dict such as {{'IN04': 0.5, 'M00': 0.0}}"
        )
    for label, value in zip(order, values):
        if label in weights:
            weights[label] = float(value)
    return weights
