"""Files in a transformer's original module names, dotted: ``<prefix><module>.<suffix>``.

The layouts that keep BFL's Flux names (``double_blocks.3.img_attn.qkv``) or SAI's MMDiT names
(``joint_blocks.3.x_block.attn.qkv``) with dots, whatever factor names they use:

* ai-toolkit / ComfyUI: ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`` (also ``lora_down``/``lora_up``,
  ``alpha``, ``diff``, ``diff_b``);
* LyCORIS LoKr / LoHa with BFL names: ``diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1`` …;
* BFL control LoRAs (FLUX.1 Depth / Canny): no prefix, ``lora_A`` / ``lora_B`` with ``lora_B.bias``, and the q/k
  norms' new values as ``….norm.query_norm.scale`` (a replacement: the ``set_weight`` role);
* XLabs: ``double_blocks.0.processor.qkv_lora1.down.weight`` (``lora1`` the image stream, ``lora2`` the text stream);
* fal's Kontext files: ``base_model.model.double_blocks…``;
* ComfyUI's text encoders: ``text_encoders.clip_l.transformer.…``, ``clip_g``, ``t5xxl``;
* the 2025-26 transformers: ComfyUI / ai-toolkit / diffusion-pipe ``diffusion_model.`` + Wan's own names
  (``blocks.0.self_attn.q``), BFL Flux.2 names, Z-Image's (``layers.0.attention.qkv``), or diffusers paths
  (Qwen-Image, Z-Image); dotted paths with kohya / LyCORIS tensor names and no prefix, or behind OneTrainer's
  ``transformer.`` (``transformer.distilled_guidance_layer.layers.0.in_layer.lora_down.weight`` + ``dora_scale``).

A ``diffusion_model.`` name may also be a diffusers path (some ComfyUI exports): the group then also carries that
path as a dotted candidate. Which modules (and rows of a fused layer) a name means is the ModuleIndex's table
(:meth:`~lorablend.naming.ModuleIndex.lookup_rows`), never guessed here.

>>> import torch
>>> groups, _ = parse_original({"double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(2, 3)})
>>> groups[0].lookup[:2], groups[0].parts
(('original', 'double_blocks.0.img_attn.qkv'), {'down': 'double_blocks.0.img_attn.qkv.lora_A.weight'})
"""

from __future__ import annotations

from typing import Mapping

import torch

from .deltas import ModuleGroup
from .read_kohya import refused_reason, suffix_role

# prefix -> the components a name after it may belong to (None: the transformer, by original name or path)
_PREFIXES: dict[str, tuple[str, ...] | None] = {
    "diffusion_model.": None,
    "base_model.model.": None,  # fal Kontext: PEFT's wrapper around BFL names
    "text_encoders.clip_l.transformer.": ("text_encoder",),
    "text_encoders.clip_g.transformer.": ("text_encoder_2",),
    "text_encoders.t5xxl.transformer.": ("text_encoder_2", "text_encoder_3"),  # Flux: 2nd encoder; SD3: 3rd
    # OneTrainer (Chroma, HiDream, Flux.2): diffusers paths behind ``transformer.`` with kohya tensor names; only
    # keys with those names come here (``transformer.…lora_A.weight`` is PEFT's: read_diffusers)
    "transformer.": ("transformer",),
}
# prefixes whose keys come here only with kohya / LyCORIS tensor names (see _kohya_named)
_KOHYA_NAMED_ONLY = ("transformer.",)
# PEFT / diffusers tensor names: a dotted key with one of these and no original head or prefix is read_diffusers'
_PEFT_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora.down.weight", "lora.up.weight", "down.weight",
                  "up.weight", "scale")
# module names that only the original (BFL / SAI) layouts use, so no prefix is needed to know them
ORIGINAL_HEADS = (
    "double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.",
    "final_layer.", "joint_blocks.", "t_embedder.", "y_embedder.", "x_embedder.proj.",
)
# suffixes beyond the kohya / LyCORIS ones (read_kohya.suffix_role), longest first where one ends another
_EXTRA_ROLES = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora_B.bias": "up_bias",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "down.weight": "down",  # XLabs
    "up.weight": "up",
    "scale": "set_weight",  # BFL control LoRA: the norm's new scale
}
_SUFFIXES = sorted({*_EXTRA_ROLES, "lora_down.weight", "lora_up.weight", "lora_mid.weight"}, key=len, reverse=True)


def _strip(key: str) -> tuple[str, tuple[str, ...] | None, bool]:
    """``(rest, components, prefixed)``."""
    for prefix, comps in _PREFIXES.items():
        if key.startswith(prefix):
            return key[len(prefix):], comps, True
    return key, None, False


def is_original_key(key: str) -> bool:
    """True for a key in a transformer's original names (or behind a ComfyUI / ai-toolkit prefix).

    >>> is_original_key("double_blocks.0.processor.qkv_lora1.down.weight"), is_original_key("unet.a.lora_A.weight")
    (True, False)
    """
    rest, comps, prefixed = _strip(key)
    if key.startswith("base_model.model."):
        return rest.startswith(ORIGINAL_HEADS)
    if key.startswith(_KOHYA_NAMED_ONLY):
        return _kohya_named(rest)
    return prefixed or rest.startswith(ORIGINAL_HEADS) or _kohya_named(rest)


def _kohya_named(rest: str) -> bool:
    """A dotted module path with kohya / LyCORIS tensor names (``lora_down.weight``, ``lokr_w1``, ``dora_scale``,
    ``diff``, ``diff_b`` …; ``alpha`` is decided by its module's other keys, :func:`~lorablend.io.detect.sort_keys`):
    OneTrainer, InvokeAI's and DiffSynth's bare paths, LyCORIS files whose ``diffusion_model.`` was stripped.

    >>> _kohya_named("layers.0.attention.to_k.lokr_w1"), _kohya_named("unet.a.to_q.lora_A.weight")
    (True, False)
    """
    module, suffix, role = _split_suffix(rest)
    if not module or suffix in _PEFT_SUFFIXES or role == "alpha":
        return False
    return role is not None or refused_reason(suffix) is not None


def module_of(key: str) -> str:
    """The module part of a key in this reader's spellings (prefix kept), for grouping an ``alpha`` with it.

    >>> module_of("transformer_blocks.0.attn.to_k.lora_down.weight")
    'transformer_blocks.0.attn.to_k'
    """
    return _split_suffix(key)[0]


def _split_suffix(rest: str) -> tuple[str, str, str | None]:
    """``(module, suffix, role)``; role None for a suffix we do not know."""
    for suffix in _SUFFIXES:
        if rest.endswith("." + suffix):
            module = rest[: -len(suffix) - 1]
            return module, suffix, _EXTRA_ROLES.get(suffix) or suffix_role(suffix)
    module, _, suffix = rest.rpartition(".")
    return module, suffix, suffix_role(suffix)


def parse_original(tensors: Mapping[str, torch.Tensor]) -> tuple[list[ModuleGroup], list[tuple[str, str, str]]]:
    """Group original-name keys by module. Returns the groups and the keys that belong to no module as
    ``(key, status, reason)``."""
    groups: dict[tuple[str, tuple], ModuleGroup] = {}
    leftovers: list[tuple[str, str, str]] = []
    for key in tensors:
        rest, comps, _ = _strip(key)
        module, suffix, role = _split_suffix(rest)
        refused = refused_reason(suffix)
        if not module or (role is None and refused is None):
            leftovers.append((key, "unknown", f"unknown suffix '.{suffix}' (expected .lora_A.weight, .lora_B.weight, "
                                              f".lora_down.weight, .alpha, .lokr_*, .hada_*, .diff, .diff_b, .diff_m, .scale)"))
            continue
        candidates = tuple((c, module) for c in (comps or ("transformer", "unet")))
        lookup = ("original", module, candidates) if comps is None else ("dotted", candidates)
        group = groups.get((module, candidates))
        if group is None:
            group = groups[(module, candidates)] = ModuleGroup(name=module, parts={}, lookup=lookup)
        group.keys.append(key)
        if refused is not None:
            group.refused = refused
        elif role in group.parts:
            group.keys.remove(key)
            leftovers.append((key, "unsupported", f"a second {role} tensor for {module} (already given by "
                                                  f"{group.parts[role]!r}); the file is ambiguous"))
        else:
            group.parts[role] = key
    return list(groups.values()), leftovers
