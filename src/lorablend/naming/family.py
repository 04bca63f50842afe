"""Which model family a model is: the one rule, fed by whatever evidence a caller has.

Three callers see a model differently: a live pipeline shows its configs, a single-file checkpoint its tensor
names, a LoRA file the shapes of its layers. Each gathers a :class:`FamilyEvidence` and asks
:func:`detect_family`, so the rule is written here once:

* a transformer denoiser: Flux.1 (dev, schnell and Kontext share one tree) when its names or class say Flux (BFL
  double / single blocks) or its width is 3072; else SD3 / SD3.5 by width — 2432 SD3.5 large, 1536 with dual
  attention layers (``attn2``) SD3.5 medium, 1536 SD3 medium (a tiny test transformer: what its class says);
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
TRANSFORMER_WIDTHS = {3072: "flux", 1536: "sd3", 2432: "sd35-large"}  # the joint attention's width
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
    transformer: str | None = None  # "flux" / "sd3" when a class or a file's names say which transformer
    transformer_width: int | None = None  # the joint attention's width (heads x head dim, a q projection's input)
    dual_attention: bool = False  # SD3.5 medium's second attention (attn2) in its first blocks


def detect_family(evidence: FamilyEvidence) -> str | None:
    """``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"flux"``, ``"sd3"``, ``"sd35-medium"``, ``"sd35-large"``, or ``None``
    when the evidence says nothing (see the module's rule).

    >>> detect_family(FamilyEvidence(text_time_embedding=True, cross_attention_width=768))
    'sdxl'
    >>> detect_family(FamilyEvidence(cross_attention_width=32)) is None
    True
    >>> detect_family(FamilyEvidence(transformer_width=1536, dual_attention=True))
    'sd35-medium'
    """
    transformer = _transformer_family(evidence)
    if transformer is not None:
        return transformer
    if evidence.second_text_encoder or evidence.text_time_embedding:
        return "sdxl"
    if evidence.text_encoder is not None:
        return TEXT_ENCODER_FAMILIES[evidence.text_encoder]
    return CROSS_ATTENTION_WIDTHS.get(evidence.cross_attention_width)  # type: ignore[arg-type]


def _transformer_family(evidence: FamilyEvidence) -> str | None:
    by_width = TRANSFORMER_WIDTHS.get(evidence.transformer_width)  # type: ignore[arg-type]
    if evidence.transformer == "flux" or (evidence.transformer is None and by_width == "flux"):
        return "flux"
    if evidence.dual_attention:
        return "sd35-medium"
    if evidence.transformer == "sd3":
        return by_width if by_width in ("sd3", "sd35-large") else "sd3"
    return by_width


__all__ = ["CROSS_ATTENTION_WIDTHS", "TRANSFORMER_WIDTHS", "FamilyEvidence", "TEXT_ENCODER_FAMILIES", "detect_family"]
