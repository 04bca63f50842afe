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

The 2025-26 transformers, one vocabulary each (``TIME`` / ``EMBED`` / ``FINAL`` as above everywhere):

* Qwen-Image: ``B00``…``B59`` (``transformer_blocks.N``; a list: BASE, B00–B59, 61 values);
* Wan 2.1 / 2.2: ``B00``… (``blocks.N``: 30 for 1.3B and 5B, 40 for 14B / A14B; BASE then one per block);
* Flux.2: ``D00``… / ``S00``… as Flux.1 (dev D00–D07, S00–S47; klein 4B D00–D04, S00–S19; klein 9B D00–D07,
  S00–S23); its shared modulations (``double_stream_modulation_*``, ``single_stream_modulation``) are ``TIME``;
* Chroma: as Flux.1 (D00–D18, S00–S37); the distilled guidance approximator is ``TIME``;
* Z-Image: ``NR00``–``NR01`` (noise refiner), ``CR00``–``CR01`` (context refiner), ``L00``–``L29`` (``layers.N``);
  a list: BASE, NR00–NR01, CR00–CR01, L00–L29 (35 values).
"""

from __future__ import annotations

import re

from typing import Mapping, Sequence

_SD1_FULL = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
_SDXL_FULL = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
_SD1_SHORT = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)]
_SDXL_SHORT = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(6)]

_FLUX = ["BASE"] + [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)]

def _numbered(head: str, count: int) -> list[str]:
    return [f"{head}{i:02d}" for i in range(count)]


def _flux_like(double: int, single: int) -> dict[int, list[str]]:
    return {1 + double + single: ["BASE"] + _numbered("D", double) + _numbered("S", single)}


LBW_ORDERS: dict[str, dict[int, list[str]]] = {
    "sd1": {26: _SD1_FULL, 17: _SD1_SHORT},
    "sd2": {26: _SD1_FULL, 17: _SD1_SHORT},
    "sdxl": {20: _SDXL_FULL, 12: _SDXL_SHORT},
    "flux": {58: _FLUX},
    **{family: {n + 1: ["BASE"] + [f"J{i:02d}" for i in range(n)]}
       for family, n in (("sd3", 24), ("sd35-medium", 24), ("sd35-large", 38))},
    **{family: {n + 1: ["BASE"] + _numbered("B", n)}
       for family, n in (("qwen-image", 60), ("wan-1.3b", 30), ("wan-14b", 40), ("wan-i2v-14b", 40), ("wan-5b", 30))},
    "flux2-dev": _flux_like(8, 48),
    "flux2-klein-4b": _flux_like(5, 20),
    "flux2-klein-9b": _flux_like(8, 24),
    "chroma": _flux_like(19, 38),
    "z-image": {35: ["BASE"] + _numbered("NR", 2) + _numbered("CR", 2) + _numbered("L", 30)},
}

_BLOCK_PATH = re.compile(r"^(transformer_blocks|single_transformer_blocks|blocks|layers|noise_refiner|context_refiner)"
                         r"\.(\d+)\.")
_DOUBLE_HEAD = {"flux": "D", "flux2": "D", "chroma": "D", "sd3": "J", "qwen": "B"}  # transformer_blocks.N, per architecture
_STACK_HEAD = {"single_transformer_blocks": "S", "blocks": "B", "layers": "L", "noise_refiner": "NR",
               "context_refiner": "CR"}
_TOP_LABELS = {"time_text_embed": "TIME", "x_embedder": "EMBED", "context_embedder": "EMBED", "pos_embed": "EMBED",
               "norm_out": "FINAL", "proj_out": "FINAL", "scale_shift_table": "FINAL",  # (Wan's head modulation)
               # Qwen-Image, Wan, Flux.2, Chroma, Z-Image
               "img_in": "EMBED", "txt_in": "EMBED", "txt_norm": "EMBED", "cap_embedder": "EMBED",
               "all_x_embedder": "EMBED", "all_final_layer": "FINAL", "time_guidance_embed": "TIME",
               "double_stream_modulation_img": "TIME", "double_stream_modulation_txt": "TIME",
               "single_stream_modulation": "TIME", "distilled_guidance_layer": "TIME", "t_embedder": "TIME",
               "condition_embedder.time_embedder": "TIME", "condition_embedder.time_proj": "TIME",
               "condition_embedder.text_embedder": "EMBED", "condition_embedder.image_embedder": "EMBED"}


def transformer_block_label(path: str, denoiser: str) -> str:
    """The block label of a module path inside a Flux (``denoiser="flux"``) or SD3 (``"sd3"``) transformer.

    >>> transformer_block_label("single_transformer_blocks.7.attn.to_q", "flux")
    'S07'
    >>> transformer_block_label("transformer_blocks.3.attn.to_q", "sd3"), transformer_block_label("proj_out", "sd3")
    ('J03', 'FINAL')
    >>> transformer_block_label("blocks.12.attn2.add_k_proj", "wan"), transformer_block_label("noise_refiner.1.attention.to_q", "zimage")
    ('B12', 'NR01')
    >>> transformer_block_label("blocks.3.scale_shift_table", "wan"), transformer_block_label("scale_shift_table", "wan")
    ('B03', 'FINAL')
    """
    m = _BLOCK_PATH.match(path)
    if m:
        stack = m.group(1)
        head = _DOUBLE_HEAD.get(denoiser, "J") if stack == "transformer_blocks" else _STACK_HEAD[stack]
        return f"{head}{int(m.group(2)):02d}"
    two = ".".join(path.split(".", 2)[:2])
    return _TOP_LABELS.get(two) or _TOP_LABELS.get(path.split(".", 1)[0], "OTHER")


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
