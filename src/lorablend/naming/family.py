"""Which model family a model is: the one rule, fed by whatever evidence a caller has.

Three callers see a model differently: a live pipeline shows its configs, a single-file checkpoint its tensor
names, a LoRA file the shapes of its layers. Each gathers a :class:`FamilyEvidence` and asks
:func:`detect_family`, so the rule is written here once:

* a transformer of the 2025-26 families, by its class (architecture) then its width: Qwen-Image; Wan — 1536 wide
  the 1.3B, 3072 the TI2V 5B, else the 14B, with the CLIP image branch (Wan 2.1 I2V / FLF2V) ``wan-i2v-14b``; Flux.2
  — 6144 dev, 4096 klein 9B, 3072 klein 4B (a tiny test model: dev); Z-Image; Chroma. A LoRA *file* is told by
  names and shapes instead (``lorablend.io.load``: the family whose modules the most layers fit);
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
from typing import Iterable

CROSS_ATTENTION_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
TRANSFORMER_WIDTHS = {3072: "flux", 1536: "sd3", 2432: "sd35-large"}  # the joint attention's width
TEXT_ENCODER_FAMILIES = {"clip-l": "sd1", "openclip-h": "sd2"}  # the single text encoder of SD1.x / SD2.x
# architecture (naming.meta's name for the class) -> {width: family}, and the family when the width says nothing
NEW_ARCHITECTURE_WIDTHS = {
    "qwen": ({3072: "qwen-image"}, "qwen-image"),
    "wan": ({1536: "wan-1.3b", 3072: "wan-5b", 5120: "wan-14b"}, "wan-14b"),
    "flux2": ({6144: "flux2-dev", 4096: "flux2-klein-9b", 3072: "flux2-klein-4b"}, "flux2-dev"),
    "zimage": ({3840: "z-image"}, "z-image"),
    "chroma": ({3072: "chroma"}, "chroma"),
}


# Families lorablend knows of but does not cover, and layer names only they have (underscored too: kohya /
# LyCORIS flatten them). Their LoRAs are refused by name: HunyuanVideo's double blocks are BFL-named like Flux.1's
# with the same widths, so without these a HunyuanVideo file would half-apply to Flux.1.
UNCOVERED_FAMILIES = {
    "HiDream-I1": ("double_stream_blocks", "single_stream_blocks", "ff_i.experts", "ff_i_experts"),
    # 20 double blocks (Flux.1 has 19: double_blocks.19 is HunyuanVideo's), the token refiner, the text time embedder,
    # the video patch embedding (a Conv3d ``img_in.proj``; Flux.1's ``img_in`` is a Linear)
    "HunyuanVideo": ("individual_token_refiner", "txt_in.t_embedder", "txt_in_t_embedder", "double_blocks.19.",
                     "double_blocks_19_", "img_in.proj.", "img_in_proj."),
}


def uncovered_family(keys: Iterable[str]) -> tuple[str, str] | None:
    """``(family, key)`` for the first key that names a layer only an uncovered family has, else None.

    >>> uncovered_family(["diffusion_model.double_stream_blocks.0.block.attn1.to_q.lora_A.weight"])[0]
    'HiDream-I1'
    >>> uncovered_family(["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"]) is None
    True
    """
    for key in keys:
        for family, markers in UNCOVERED_FAMILIES.items():
            if any(marker in key for marker in markers):
                return family, key
    return None


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
    transformer: str | None = None  # "flux" / "sd3" / "qwen" / "wan" / … when a class or names say which transformer
    transformer_width: int | None = None  # the joint attention's width (heads x head dim, a q projection's input)
    dual_attention: bool = False  # SD3.5 medium's second attention (attn2) in its first blocks
    image_branch: bool = False  # Wan 2.1 I2V / FLF2V: the CLIP image keys (k_img / v_img) in cross-attention


def detect_family(evidence: FamilyEvidence) -> str | None:
    """``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"flux"``, ``"sd3"``, ``"sd35-medium"``, ``"sd35-large"``, or ``None``
    when the evidence says nothing (see the module's rule).

    >>> detect_family(FamilyEvidence(text_time_embedding=True, cross_attention_width=768))
    'sdxl'
    >>> detect_family(FamilyEvidence(cross_attention_width=32)) is None
    True
    >>> detect_family(FamilyEvidence(transformer_width=1536, dual_attention=True))
    'sd35-medium'
    >>> detect_family(FamilyEvidence(transformer="wan", transformer_width=5120, image_branch=True))
    'wan-i2v-14b'
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
    if evidence.transformer in NEW_ARCHITECTURE_WIDTHS:
        widths, default = NEW_ARCHITECTURE_WIDTHS[evidence.transformer]
        family = widths.get(evidence.transformer_width, default)  # type: ignore[arg-type]
        return "wan-i2v-14b" if family == "wan-14b" and evidence.image_branch else family
    by_width = TRANSFORMER_WIDTHS.get(evidence.transformer_width)  # type: ignore[arg-type]
    if evidence.transformer == "flux" or (evidence.transformer is None and by_width == "flux"):
        return "flux"
    if evidence.dual_attention:
        return "sd35-medium"
    if evidence.transformer == "sd3":
        return by_width if by_width in ("sd3", "sd35-large") else "sd3"
    return by_width


__all__ = ["CROSS_ATTENTION_WIDTHS", "NEW_ARCHITECTURE_WIDTHS", "UNCOVERED_FAMILIES", "uncovered_family", "TRANSFORMER_WIDTHS", "FamilyEvidence",
           "TEXT_ENCODER_FAMILIES", "detect_family"]
