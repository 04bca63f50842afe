"""Which Stable Diffusion family a model is: the one rule, fed by whatever evidence a caller has.

Three callers see a model differently: a live pipeline shows its configs, a single-file checkpoint its tensor
names, a LoRA file the shapes of its layers. Each gathers a :class:`FamilyEvidence` and asks
:func:`detect_family`, so the rule is written here once:

* a second text encoder, or text-time (pooled text + time ids) embeddings: SDXL;
* else the text encoder a file's layout names: CLIP-L for SD1.x, OpenCLIP-H for SD2.x (a checkpoint's names say
  this even for a tiny test model whose widths are not the real ones);
* else the width of the text the UNet's cross-attention reads: 768 SD1.x, 1024 SD2.x, 2048 SDXL;
* else nothing is known (``None``): the caller decides what that means.

>>> detect_family(FamilyEvidence(cross_attention_width=1024))
'sd2'
"""

from __future__ import annotations

from dataclasses import dataclass

CROSS_ATTENTION_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
TEXT_ENCODER_FAMILIES = {"clip-l": "sd1", "openclip-h": "sd2"}  # the single text encoder of SD1.x / SD2.x


@dataclass(frozen=True)
class FamilyEvidence:
    """What a caller knows about a model; every field may be unknown.

    >>> FamilyEvidence(second_text_encoder=True).second_text_encoder
    True
    """

    second_text_encoder: bool = False
    text_time_embedding: bool = False
    text_encoder: str | None = None  # a key of TEXT_ENCODER_FAMILIES, when a file's layout names the encoder
    cross_attention_width: int | None = None


def detect_family(evidence: FamilyEvidence) -> str | None:
    """``"sd1"``, ``"sd2"``, ``"sdxl"``, or ``None`` when the evidence says nothing (see the module's rule).

    >>> detect_family(FamilyEvidence(text_time_embedding=True, cross_attention_width=768))
    'sdxl'
    >>> detect_family(FamilyEvidence(cross_attention_width=32)) is None
    True
    """
    if evidence.second_text_encoder or evidence.text_time_embedding:
        return "sdxl"
    if evidence.text_encoder is not None:
        return TEXT_ENCODER_FAMILIES[evidence.text_encoder]
    return CROSS_ATTENTION_WIDTHS.get(evidence.cross_attention_width)  # type: ignore[arg-type]


__all__ = ["CROSS_ATTENTION_WIDTHS", "FamilyEvidence", "TEXT_ENCODER_FAMILIES", "detect_family"]
