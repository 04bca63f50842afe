"""One vocabulary for per-block weights, the same for SD1.x and SDXL.

Labels are those of A1111's LoRA Block Weight extension, which users already know: ``BASE`` (text
encoders), ``IN00``…``IN11`` (SD1.x) / ``IN00``…``IN08`` (SDXL) for the LDM ``input_blocks``, ``M00`` for the
middle block, ``OUT00``… for ``output_blocks``; we add ``TIME`` (time / label embeddings) and ``FINAL``
(``conv_out``). A label covers every layer of that block — resnets, attentions and samplers alike.

A weight spec is either a dict ``{label: weight}`` (unnamed labels keep ``default``) or a list in LBW order:
26 values for SD1.x (BASE, IN00–IN11, M00, OUT00–OUT11), 20 for SDXL (BASE, IN00–IN08, M00, OUT00–OUT08),
or LBW's short forms of 17 (SD1.x) and 12 (SDXL) values that list only the blocks with attention.
"""

from __future__ import annotations

from typing import Mapping, Sequence

_SD1_FULL = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
_SDXL_FULL = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
_SD1_SHORT = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(3, 12)]
_SDXL_SHORT = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02d}" for i in range(6)]

LBW_ORDERS: dict[str, dict[int, list[str]]] = {
    "sd1": {26: _SD1_FULL, 17: _SD1_SHORT},
    "sd2": {26: _SD1_FULL, 17: _SD1_SHORT},
    "sdxl": {20: _SDXL_FULL, 12: _SDXL_SHORT},
}


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
