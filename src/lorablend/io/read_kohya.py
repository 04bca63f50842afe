"""kohya / A1111 / LyCORIS files: ``<flat module name>.<suffix>``, one algorithm per module.

The flat name (``lora_unet_input_blocks_4_1_proj_in``, ``lora_te1_text_model_encoder_layers_0_mlp_fc1``, …) is
kept whole and looked up in the ModuleIndex later; it is never turned back into a path by guessing which
underscores were dots. SimpleTuner's ``lycoris_<diffusers path>`` names are read as ``lora_unet_<…>``.

Suffixes and their roles:

* LoRA / LoCon: ``lora_down.weight``, ``lora_up.weight``, optional ``lora_mid.weight`` (Tucker), ``alpha``;
* LoHa: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, optional ``hada_t1`` / ``hada_t2``;
* LoKr: ``lokr_w1`` or ``lokr_w1_a`` + ``lokr_w1_b``; ``lokr_w2`` or ``lokr_w2_a`` + ``lokr_w2_b``; optional ``lokr_t2``;
* full: ``diff``, ``diff_b``; DoRA: ``dora_scale`` on any of the above; a replacement: ``set_weight``.

A transformer's kohya names may be its original ones (``lora_unet_double_blocks_0_img_attn_qkv``: fused rows that
the ModuleIndex splits, :meth:`~lorablend.naming.ModuleIndex.lookup_rows`) or OneTrainer's flattened diffusers
paths (``lora_transformer_transformer_blocks_0_attn_to_q``); both are looked up whole, like every flat name.
musubi-tuner writes Wan / Flux.2 LoRAs in their own names (``lora_unet_blocks_0_self_attn_q``), Qwen-Image and
Z-Image ones in diffusers paths (``lora_unet_transformer_blocks_0_img_mod_1``); the index knows both.

Recognised but not applied (reported unsupported, with the reason): OFT / BOFT (``oft_blocks``, ``oft_diag``,
``rescale``), IA3 (``weight`` + ``on_input``), GLoRA (``a1.weight`` …), LyCORIS norms (``w_norm``, ``b_norm``).

>>> import torch
>>> groups, _ = parse_kohya({"lora_unet_x.lora_down.weight": torch.zeros(2, 3), "lora_unet_x.alpha": torch.tensor(1.)})
>>> groups[0].lookup, sorted(groups[0].parts)
(('kohya', 'lora_unet_x'), ['alpha', 'down'])
"""

from __future__ import annotations

from typing import Mapping

import torch

from .deltas import ModuleGroup

# lora_transformer_: OneTrainer's Flux files (diffusers paths, flattened); lora_te3_: SD3's T5
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lycoris_")

_ROLES = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "alpha": "alpha",
    "dora_scale": "dora_scale",
    "diff": "diff",
    "diff_b": "diff_b",
    "diff_m": "diff_m",  # a modulation table's difference (lightx2v / Kijai: a Wan block's ``modulation``)
    "set_weight": "set_weight",  # a replacement weight (ComfyUI's name)
    **{s: s for s in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    **{s: s for s in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")},
}

# suffix -> (algorithm, why we do not apply it)
_REFUSED = {
    "oft_blocks": "OFT/BOFT (orthogonal fine-tuning)",
    "oft_diag": "OFT (orthogonal fine-tuning)",
    "rescale": "OFT/BOFT (orthogonal fine-tuning)",
    "on_input": "IA3",
    "a1.weight": "GLoRA",
    "a2.weight": "GLoRA",
    "b1.weight": "GLoRA",
    "b2.weight": "GLoRA",
    "w_norm": "LyCORIS norm fine-tuning",
    "b_norm": "LyCORIS norm fine-tuning",
    "reshape_weight": "weight reshaping",
}
_WHY = {
    "OFT/BOFT (orthogonal fine-tuning)": "it rotates the base weight instead of adding a delta",
    "OFT (orthogonal fine-tuning)": "it rotates the base weight instead of adding a delta",
    "IA3": "it rescales the base weight's channels instead of adding a delta",
    "GLoRA": "its delta depends on the base weight in a way lorablend does not model",
    "LyCORIS norm fine-tuning": "it changes normalisation layers, which lorablend does not adapt",
    "weight reshaping": "it changes the module's shape",
}


def suffix_role(suffix: str) -> str | None:
    """The role of a LyCORIS / kohya tensor suffix (``lora_down.weight`` -> ``down``), or None.

    >>> suffix_role("lokr_w1"), suffix_role("weight")
    ('lokr_w1', None)
    """
    return _ROLES.get(suffix)


def refused_reason(suffix: str) -> str | None:
    """Why a module with this suffix is not applied (OFT, IA3, GLoRA, norm fine-tuning …), or None.

    >>> refused_reason("oft_blocks")
    'OFT/BOFT (orthogonal fine-tuning) is not applied by lorablend: it rotates the base weight instead of adding a delta'
    """
    algo = _REFUSED.get(suffix)
    return None if algo is None else f"{algo} is not applied by lorablend: {_WHY[algo]}"


def is_kohya_key(key: str) -> bool:
    """True for a key whose module name starts with a kohya prefix (``lora_unet_``, ``lora_te_``, …)."""
    return key.startswith(KOHYA_PREFIXES)


def parse_kohya(tensors: Mapping[str, torch.Tensor]) -> tuple[list[ModuleGroup], list[tuple[str, str, str]]]:
    """Group kohya-named keys by module. Returns the groups and the keys that belong to no module as
    ``(key, status, reason)``."""
    groups: dict[str, ModuleGroup] = {}
    extras: dict[str, list[tuple[str, str]]] = {}
    leftovers: list[tuple[str, str, str]] = []
    for key in tensors:
        flat, dot, suffix = key.partition(".")
        if not dot or not is_kohya_key(flat):
            leftovers.append((key, "unknown", "not a kohya key (expected lora_unet_…/lora_te…_<module>.<suffix>)"))
            continue
        lookup_name = _lookup_name(flat)
        group = groups.setdefault(flat, ModuleGroup(name=flat, parts={}, lookup=("kohya", lookup_name)))
        group.keys.append(key)
        if suffix in _ROLES:
            group.parts[_ROLES[suffix]] = key
        elif suffix in _REFUSED:
            group.refused = refused_reason(suffix)
        else:
            extras.setdefault(flat, []).append((key, suffix))
    out = []
    for flat, group in groups.items():
        for key, suffix in extras.get(flat, []):
            if suffix == "weight" and group.refused and group.refused.startswith("IA3"):
                continue  # IA3's own weight: reported with the module
            group.keys.remove(key)
            leftovers.append((key, "unknown", _bad_suffix(flat, suffix)))
        if group.keys:
            out.append(group)
    return out, leftovers


def _lookup_name(flat: str) -> str:
    """The name to look up: SimpleTuner's ``lycoris_<path>`` and the ``lora_unet__<path>`` some converters write
    (a double underscore: an empty prefix joined with ``_``) are read as ``lora_unet_<path>``.

    >>> _lookup_name("lycoris_layers_0_attention_to_q"), _lookup_name("lora_unet__blocks_0_ffn_0")
    ('lora_unet_layers_0_attention_to_q', 'lora_unet_blocks_0_ffn_0')
    """
    if flat.startswith("lycoris_"):
        return "lora_unet_" + flat[len("lycoris_"):]
    if flat.startswith("lora_unet__"):
        return "lora_unet_" + flat[len("lora_unet__"):]
    return flat


def _bad_suffix(name: str, suffix: str) -> str:
    hint = ""
    for glued in ("_lora_down", "_lora_up"):
        if name.endswith(glued):
            hint = (f"; the name ends in {glued!r} joined with '_' where kohya writes '.{glued[1:]}.weight' "
                    f"(a broken hand conversion)")
    return (f"unknown kohya suffix '.{suffix}' (expected .lora_down.weight, .lora_up.weight, .alpha, "
            f".hada_*, .lokr_*, .diff, .dora_scale){hint}")
