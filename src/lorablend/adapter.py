"""The canonical model: an Adapter is a name, a family and one Delta per target layer.

Every reader maps its format into this; every writer maps out of it; merge, resolve and the
runtime only ever see these classes. A *target key* is ``component.module_path`` in diffusers
naming, e.g. ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` or
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``.

The Delta kinds (LoRA, LoHa, LoKr, full diff, DoRA), each with its own behaviour and the scale semantics
decided once for all of them, live in :mod:`lorablend.kinds`; they are re-exported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from .kinds import Delta, DeltaKind, DoRADelta, FullDelta, InnerDelta, LoHaDelta, LoKrDelta, LowRankDelta, SetDelta
from .naming import COMPONENTS  # the one component list, in its order
from .report import LoadReport

Family = Literal["sd1", "sd2", "sdxl", "flux", "sd3", "sd35-medium", "sd35-large", "wan-14b", "wan-i2v-14b",
                 "wan-1.3b", "wan-5b", "qwen-image", "flux2-dev", "flux2-klein-4b", "flux2-klein-9b", "z-image",
                 "chroma"]
# the UNet families first: readers prefer them on a tie (an SD file never names a transformer module); then the
# older transformers before the 2025-26 ones (a Flux.1 LoRA on attention only also fits Chroma's and Qwen-Image's
# layers: Flux.1 keeps it), Wan 14B before the I2V tree that only adds the image keys
FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl", "flux", "sd3", "sd35-medium", "sd35-large", "wan-14b",
                             "wan-i2v-14b", "wan-1.3b", "wan-5b", "qwen-image", "flux2-dev", "flux2-klein-4b",
                             "flux2-klein-9b", "z-image", "chroma")


@dataclass(eq=False)
class Adapter:
    """One LoRA-family file in canonical form.

    ``widened_inputs`` names the modules whose input the adapter widens (:attr:`needs_control`).
    ``deltas`` maps target keys (``unet.…`` / ``transformer.…``, ``text_encoder.…``, ``text_encoder_2.…``,
    ``text_encoder_3.…``) to Deltas;
    ``metadata`` is the file's header metadata, kept and written back out; ``report`` accounts for
    every key of the source; ``format`` names the on-disk format it was read from.

    >>> a = Adapter("style", "sd1", {"unet.mid_block.attentions.0.proj_in": FullDelta(torch.zeros(4, 4))})
    >>> a.components()
    ['unet']
    """

    name: str
    family: str
    deltas: dict[str, Delta]
    metadata: dict[str, str] = field(default_factory=dict)
    report: LoadReport = field(default_factory=LoadReport)
    format: str = "canonical"
    # target key -> the input features its delta reads where that is more than the standard model's module has:
    # a Flux control LoRA's x_embedder (img_in) also reads the control image's latents. A control pipeline widens
    # that module (zero columns for the new inputs) before applying; a plain pipeline must refuse the adapter.
    widened_inputs: dict[str, int] = field(default_factory=dict)
    # target key -> a whole new weight for that norm (diffusers-format Flux ``…norm_q.weight`` keys, as control LoRAs
    # carry them): not a delta — the pipeline replaces the norm's weight at load and puts the original back on unload
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)
    # other families every layer of the file fits as well as ``family`` (by names and shapes): the file alone
    # cannot tell them apart (an excerpt on attention only), so ``family`` is the tie order's pick; pass target=
    also_fits: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")

    def components(self) -> list[str]:
        """The model components this adapter touches, in a stable order."""
        order = {c: i for i, c in enumerate(COMPONENTS)}
        return sorted({k.split(".", 1)[0] for k in self.deltas}, key=lambda c: (order.get(c, 9), c))

    @property
    def needs_control(self) -> bool:
        """True for a control LoRA (FLUX.1 Depth / Canny): it widens an input and needs a control pipeline.

        >>> Adapter("depth", "flux", {}, widened_inputs={"transformer.x_embedder": 128}).needs_control
        True
        """
        return bool(self.widened_inputs)

    def kinds(self) -> dict[str, int]:
        """How many layers of each Delta kind."""
        counts: dict[str, int] = {}
        for d in self.deltas.values():
            counts[d.kind] = counts.get(d.kind, 0) + 1
        return counts

    def num_parameters(self) -> int:
        return sum(t.numel() for d in self.deltas.values() for t in d.tensors())

    def __repr__(self) -> str:
        return (
            f"Adapter(name={self.name!r}, family={self.family!r}, format={self.format!r}, "
            f"layers={len(self.deltas)}, kinds={self.kinds()})"
        )
